"""Several graphs of one model, one weights file: each variant's ``.onnx`` points into the same
``<name>.data`` at the same offsets.

The AR/CL variants of a model differ only in shapes and a few small shape constants; every weight
is the same tensor. So the weights are written once and each variant references them by
``location`` / ``offset`` / ``length``. When the input keeps its weights in one external file, that
file is copied whole (direct I/O or the kernel's ``copy_file_range``, never mapped) and every
tensor keeps its offset: the cost of a ``cp``. Otherwise tensors are copied one by one in the order of their source
offsets (a cold read streams), each on a 4096-byte boundary like :func:`mha2sha.io.save.save_model`
writes them. A constant that one variant rewrote, and any integer tensor below
:data:`SHARE_MIN_BYTES`, stays inside that variant's ``.onnx``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import onnx_ir as ir

from mha2sha.errors import UserError
from mha2sha.io.direct_io import copy_range
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
    tensors = {name: first.graph.initializers[name].const_value for name in names}
    placed: dict[str, tuple[int, int]] = {}
    with open(data, "wb") as f:
        source = _single_source(tensors)
        if source is not None:  # one copy of the input's weights file, every offset kept (= cp)
            _copy_file(source, f)
            for name, tensor in tensors.items():
                if isinstance(tensor, ir.ExternalTensor) and Path(tensor.path) == source:
                    placed[name] = (tensor.offset or 0, tensor.nbytes)
        # the rest in the order of their source offsets, so a cold read streams through the input
        rest = sorted((n for n in names if n not in placed), key=lambda n: _source_order(tensors[n]))
        for name in rest:
            tensor = tensors[name]
            assert tensor is not None
            f.seek(0, os.SEEK_END)
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
                shape=ir.Shape(tensor.shape.numpy()),
                name=name,
                base_dir=str(data.parent),
            )
        ir.save(model, path)
        files.append(path)
    logger.info(
        "%d tensors (%d bytes) shared by %d graphs in %s", len(placed), data.stat().st_size, len(models), data
    )
    return files


def _source_order(tensor) -> tuple[str, int]:
    if isinstance(tensor, ir.ExternalTensor):
        return (str(tensor.path), tensor.offset or 0)
    return ("~", 0)  # in-memory tensors after the external ones


def _single_source(tensors: dict) -> Path | None:
    """The one external file that holds (nearly) all shared weights, when there is one: then it is
    copied whole and every offset stays, which is exactly what ``cp`` of the weights costs."""
    files: dict[Path, int] = {}
    total = 0
    for tensor in tensors.values():
        total += tensor.nbytes
        if isinstance(tensor, ir.ExternalTensor):
            path = Path(tensor.path)
            files[path] = files.get(path, 0) + tensor.nbytes
    if len(files) != 1:
        return None
    ((path, covered),) = files.items()
    size = path.stat().st_size
    return path if covered >= 0.9 * total and covered >= 0.9 * size else None


def _copy_file(source: Path, out) -> None:
    """``source`` appended to ``out`` with direct I/O or by the kernel (``copy_file_range``),
    read/write as a fallback."""
    out.flush()
    with open(source, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        if copy_range(source, 0, size, out):
            out.seek(0, os.SEEK_END)
            return
        start = out.tell()
        done = 0
        copy = getattr(os, "copy_file_range", None)
        try:
            while copy is not None and done < size:
                n = copy(src.fileno(), out.fileno(), min(1 << 30, size - done), done, start + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass
        src.seek(done)
        out.seek(start + done)
        while done < size:
            chunk = src.read(min(64 << 20, size - done))
            if not chunk:
                raise UserError(f"external data file {source} became shorter while copying it")
            out.write(chunk)
            done += len(chunk)
        out.seek(0, os.SEEK_END)


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
