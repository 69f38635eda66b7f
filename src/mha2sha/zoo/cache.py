"""On-disk cache of exported zoo models, safe under concurrent pytest processes.

Exports take seconds each and the whole zoo is exported for two exporters, so every file is built
once per (case, exporter, torch, transformers, zoo source) and reused. A change to any zoo source
file changes the key, so editing a builder can never serve a stale model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

MODEL_FILE = "model.onnx"
META_FILE = "meta.json"


def base_root() -> Path:
    """``$MHA2SHA_CACHE`` (default ``~/.cache/mha2sha``): zoo exports, tool venvs, corpus outputs."""
    base = os.environ.get("MHA2SHA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mha2sha")
    return Path(base)


def cache_root() -> Path:
    """``$MHA2SHA_CACHE/zoo`` (default ``~/.cache/mha2sha/zoo``)."""
    return base_root() / "zoo"


@lru_cache(maxsize=1)
def source_hash() -> str:
    """Hash of every zoo module: builders, weight init and exporter all shape the exported file."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@lru_cache(maxsize=1)
def _versions() -> str:
    import diffusers
    import onnxscript
    import peft
    import torch
    import transformers

    parts = [
        f"torch{torch.__version__}",
        f"tf{transformers.__version__}",
        f"peft{peft.__version__}",
        f"diff{diffusers.__version__}",
        f"osc{onnxscript.__version__}",
    ]
    return "-".join(p.replace("+", "_") for p in parts)


def cache_key(case: str, exporter: str) -> str:
    """Directory name for one export: human-readable prefix, hash-protected suffix."""
    return f"{case}-{exporter}-{_versions()}-{source_hash()}"


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_build(key: str, produce: Callable[[Path], dict]) -> Path:
    """Return ``<root>/<key>/model.onnx``, calling ``produce(tmp_model_path) -> meta`` if missing.

    The export goes into a private temp dir next to the final one and is published with a single
    ``os.rename`` of the directory, under an exclusive ``fcntl`` lock on ``<root>/.locks/<key>.lock``: readers
    either see no directory or a complete one, and two processes never export the same key twice.
    """
    root = cache_root()
    final = root / key
    model = final / MODEL_FILE
    if model.is_file():
        return model
    with locked(root / ".locks" / f"{key}.lock"):
        if model.is_file():  # another process finished while we waited
            return model
        if final.exists():  # a directory without model.onnx was not published by us: replace it
            shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            meta = produce(tmp / MODEL_FILE)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the published cache entry is shared
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return model
