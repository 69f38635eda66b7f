"""Several graphs of one model, one weights file: each variant's ``.onnx`` points into the same
``<name>.data`` at the same offsets.

The AR/CL variants of a model differ only in shapes and a few small shape constants; every weight
is the same tensor. So the weights are written once (external weights are copied file to file by
the kernel, ``copy_file_range``, never mapped; in-memory ones are written from their array), and
each variant references them by ``location`` / ``offset`` / ``length``. A constant that one variant
rewrote, and any integer tensor below :data:`SHARE_MIN_BYTES`, stays inside that variant's
``.onnx``. Every tensor starts on a 4096-byte boundary, like :func:`mha2sha.io.save.save_model`
writes them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import onnx_ir as ir

from mha2sha.errors import UserError
from mha2sha.io.load import EXTERNAL_FILES_META, check_external_data_unchanged

__all__ = ["SHARE_MIN_BYTES", "save_sharing_weights"]

logger = logging.getLogger(__name__)

#: Integer initializers smaller than this stay in each graph (shape constants); float ones are
#: always shared, whatever their size.
SHARE_MIN_BYTES = 1024
_ALIGN = 4096


def _shared(value: ir.Value, exclude: Collection[str]) -> bool:
    tensor = value.const_value
    if tensor is None or value.name in exclude:
        return False
    return tensor.dtype.is_floating_point() or tensor.nbytes >= SHARE_MIN_BYTES


def _write(tensor: ir.TensorProtocol, file) -> None:
    if isinstance(tensor, ir.ExternalTensor):
        tensor.tofile(file)  # kernel copy from the input's external file
    else:
        file.write(tensor.tobytes())


def save_sharing_weights(
    models: Sequence[tuple[ir.Model, Path]], data: Path, *, exclude: Collection[str] = ()
) -> list[Path]:
    """Save every ``(model, path)``; initializers they share go once into ``data``.

    An initializer is written once, from the first model, when every model has one of that name and
    shape and it is not in ``exclude`` (tensors some variant rewrote). Returns the files written,
    ``data`` first. The models' initializers point into ``data`` afterwards.
    """
    for model, _ in models:
        check_external_data_unchanged(model)
    _refuse_overwriting_inputs([m for m, _ in models], [data, *(p for _, p in models)])
    first = models[0][0]
    names = []
    for name, value in first.graph.initializers.items():
        if not _shared(value, exclude):
            continue
        shape = tuple(value.const_value.shape)  # type: ignore[union-attr]
        others = [m.graph.initializers.get(name) for m, _ in models[1:]]
        if all(
            o is not None and o.const_value is not None and tuple(o.const_value.shape) == shape
            for o in others
        ):
            names.append(name)
    placed: dict[str, tuple[int, int]] = {}
    with open(data, "wb") as f:
        for name in names:
            tensor = first.graph.initializers[name].const_value
            assert tensor is not None
            offset = f.tell()
            if offset % _ALIGN:
                f.write(b"\0" * (_ALIGN - offset % _ALIGN))
                offset = f.tell()
            _write(tensor, f)
            f.seek(0, os.SEEK_END)
            length = f.tell() - offset
            if length != tensor.nbytes:
                raise RuntimeError(f"wrote {length} bytes for '{name}', expected {tensor.nbytes}")
            placed[name] = (offset, length)
    files = [data]
    for model, path in models:
        for name, (offset, length) in placed.items():
            value = model.graph.initializers[name]
            tensor = value.const_value
            assert tensor is not None
            value.const_value = ir.ExternalTensor(
                data.name,
                offset,
                length,
                tensor.dtype,
                shape=tensor.shape,
                name=name,
                base_dir=str(data.parent),
            )
        ir.save(model, path)
        files.append(path)
    logger.info(
        "%d tensors (%d bytes) shared by %d graphs in %s", len(placed), data.stat().st_size, len(models), data
    )
    return files


def _refuse_overwriting_inputs(models: Sequence[ir.Model], files: Sequence[Path]) -> None:
    """No output may end up on top of an input's external data file (same name, same folder)."""
    from mha2sha.io.save import _same, _shown

    inputs = {p for m in models for p in (m.meta.get(EXTERNAL_FILES_META) or {})}
    for file in files:
        final = _shown(file)
        if any(_same(final, i) for i in inputs):
            raise UserError(
                f"output {final} would overwrite the input's external data; choose another -o folder or --name"
            )
