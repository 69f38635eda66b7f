"""On-device artifacts: raw inputs, qnn-net-run input lists and golden outputs.

Replaces the old Qualcomm tool's ``--create-input-lists``: after converting, a user pushes
``out_dir`` to the device, runs ``qnn-net-run --input_list on_device_input_list.txt`` from it
and diffs the results against ``goldens/`` (the ORIGINAL model's outputs from onnxruntime).

Layout under ``out_dir``::

    inputs/<name>.raw            tensor bytes, C order, little-endian, the input's own dtype
    goldens/<output>.raw         original model's outputs, same encoding
    input_list.txt               one line: ``name:=/abs/host/path/inputs/<name>.raw ...``
    on_device_input_list.txt     same line with paths relative to the device working dir
    shapes.json                  name, file, shape and dtype of every input and golden output

The input list is qnn-net-run's by-name format: one inference per line, its inputs separated by
spaces as ``<input name>:=<path>``, in model input order.  Raw files hold the tensor's native
dtype (e.g. int64 ids, float16 KV), so run qnn-net-run with ``--use_native_input_files`` when
any input is not float32.  ``<name>`` in file names is the tensor name with characters other
than letters, digits, ``_``, ``-`` and ``.`` replaced by ``_`` (deduplicated), so a tensor name
can never write outside ``out_dir``; shapes.json maps every file back to its tensor.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mha2sha.errors import UserError

__all__ = ["write_input_lists"]

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _file_stems(names: Sequence[str]) -> dict[str, str]:
    """Map tensor names to unique, filesystem-safe stems (case-insensitive unique for macOS/Windows)."""
    stems: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = _UNSAFE.sub("_", name).lstrip(".") or "tensor"
        stem, k = base, 1
        while stem.lower() in used:
            stem = f"{base}_{k}"
            k += 1
        used.add(stem.lower())
        stems[name] = stem
    return stems


def _le_bytes(arr: np.ndarray) -> bytes:
    """Raw C-order bytes, little-endian whatever the host or array byte order."""
    arr = np.asarray(arr)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes(order="C")


def _write(path: Path, data: bytes | str, written: list[Path]) -> None:
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    written.append(path)


def _entry(name: str, rel: str, arr: np.ndarray) -> dict[str, object]:
    return {"name": name, "file": rel, "shape": [int(d) for d in arr.shape], "dtype": str(arr.dtype)}


def write_input_lists(
    out_dir: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    goldens: Mapping[str, np.ndarray],
    input_order: Sequence[str],
    *,
    host_dir: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Write raw inputs, both input lists, golden outputs and shapes.json under ``out_dir``.

    ``host_dir`` is where the files will finally live when ``out_dir`` is a staging folder that
    is moved into place afterwards: ``input_list.txt`` names host paths under it.

    ``input_order`` is the model's input order (qnn-net-run maps by name, but a stable order makes
    the files diffable) and must name exactly the keys of ``inputs``.  Returns the written files,
    all under ``out_dir``; the caller handles atomic placement of the directory.
    """
    if sorted(input_order) != sorted(inputs) or len(set(input_order)) != len(input_order):
        raise ValueError(f"input_order {list(input_order)} must list each input once: {sorted(inputs)}")
    for name in input_order:
        if not name or any(c.isspace() for c in name) or ":=" in name:
            raise UserError(
                f"input {name!r} cannot be written to a qnn-net-run input list (whitespace or ':=' in its name)"
            )

    out = Path(out_dir).resolve()
    host = Path(host_dir).resolve() if host_dir is not None else out
    if any(c.isspace() for c in str(host)):
        # qnn-net-run splits list lines at whitespace and knows no quoting: name files relative to
        # the output folder instead (run qnn-net-run from there)
        logger.warning(
            "input_list.txt names files relative to %s (its path has whitespace, which the list format "
            "cannot hold): run qnn-net-run from that folder", host
        )
        host = Path(".")
    (out / "inputs").mkdir(parents=True, exist_ok=True)
    (out / "goldens").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    in_stems = _file_stems(input_order)
    host_items, device_items, in_entries = [], [], []
    for name in input_order:
        arr = np.asarray(inputs[name])
        rel = f"inputs/{in_stems[name]}.raw"
        _write(out / rel, _le_bytes(arr), written)
        host_items.append(f"{name}:={(host / rel).as_posix() if host != Path('.') else rel}")
        device_items.append(f"{name}:={rel}")
        in_entries.append(_entry(name, rel, arr))

    out_stems = _file_stems(list(goldens))
    out_entries = []
    for name, arr in goldens.items():
        arr = np.asarray(arr)
        rel = f"goldens/{out_stems[name]}.raw"
        _write(out / rel, _le_bytes(arr), written)
        out_entries.append(_entry(name, rel, arr))

    _write(out / "input_list.txt", " ".join(host_items) + "\n", written)
    _write(out / "on_device_input_list.txt", " ".join(device_items) + "\n", written)
    manifest = {
        "format": "raw tensor bytes, C order, little-endian, dtype as listed",
        "input_list": "input_list.txt (host absolute paths), on_device_input_list.txt (relative to this directory)",
        "note": "run qnn-net-run with --use_native_input_files unless every input is float32",
        "inputs": in_entries,
        "outputs": out_entries,
    }
    _write(out / "shapes.json", json.dumps(manifest, indent=2) + "\n", written)
    return written
