"""Write results atomically: everything goes to a hidden staging folder, then is moved in place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from mha2sha.errors import UserError

__all__ = ["staging_dir", "save_model", "EMBED_LIMIT_BYTES"]

# Above this many bytes of weights the model is saved with one external data file (protobuf: 2 GB).
EMBED_LIMIT_BYTES = 1 << 30


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder inside ``out_dir``; its files are moved into ``out_dir`` only on success."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".mha2sha-", dir=out_dir))
    except OSError as e:
        raise UserError(f"output folder not writable: {out_dir} ({e.strerror})") from None
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            target = out_dir / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    except OSError as e:
        raise UserError(f"could not write to {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, path: Path) -> list[Path]:
    """Save ``model`` to ``path``; large models get a single ``<name>.data`` external file."""
    try:
        data = path.with_suffix(".data")
        if _weight_bytes(model) > EMBED_LIMIT_BYTES:
            # Every external tensor starts on a 4096-byte boundary (onnx_ir aligns to
            # max(4096, alignment)); align_threshold=0 also aligns the small ones, which onnx_ir
            # would otherwise pack densely. ir.save streams: one tensor materialised at a time.
            ir.save(model, path, external_data=data.name, alignment=64, align_threshold=0)
            return [path, data]
        # Naming an external file with a threshold above every tensor embeds them all, including
        # weights the input kept in external files (a plain save would keep dangling references).
        ir.save(model, path, external_data=data.name, size_threshold_bytes=EMBED_LIMIT_BYTES + 1)
        if data.exists() and data.stat().st_size == 0:
            data.unlink()
        return [path]
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}") from None
