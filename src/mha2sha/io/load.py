"""Load a model lazily (external weights stay on disk) and reject bad input with one line.

External weights are :class:`StreamedExternalTensor` s: ``numpy()`` maps only that tensor's bytes
and the mapping goes away with the array, so reading weights one after the other (slicing every
head's piece while saving) never keeps more than the tensor being read resident. onnx_ir's own
``ExternalTensor`` caches a mapping of the whole file per tensor; every page read through it stays
in the process's RSS until the model is freed (3.2 GB for the q/k/v weights of a 7B model).
Copying an unchanged weight to the output goes through ``tofile`` (``copy_file_range``, in the
kernel) and never maps it at all.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mha2sha.errors import UserError

__all__ = ["load_model", "fix_input_shapes", "require_static_inputs", "StreamedExternalTensor"]


class StreamedExternalTensor(ir.ExternalTensor):
    """An external tensor whose data is mapped per call and never cached on the tensor.

    ``numpy()`` returns a read-only array over a private mapping of just this tensor's byte range;
    when the caller drops the array the mapping is closed, so the pages leave the process RSS
    (they stay in the page cache, shared and reclaimable). Sub-byte types use the cached path.
    """

    __slots__ = ()

    @classmethod
    def like(cls, tensor: ir.ExternalTensor) -> StreamedExternalTensor:
        return cls(
            tensor.location,
            tensor.offset,
            tensor.length,
            tensor.dtype,
            shape=tensor.shape,
            name=tensor.name,
            doc_string=tensor.doc_string,
            metadata_props=tensor.metadata_props,
            base_dir=tensor.base_dir,
        )

    def _map(self) -> np.ndarray:
        self._check_validity()
        self._check_path_containment()
        shape = self.shape.numpy()
        dtype = np.dtype(self.dtype.numpy()).newbyteorder("<")
        nbytes = self.nbytes
        if nbytes == 0:
            return np.empty(shape, dtype=dtype)
        offset = self.offset or 0
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            raw = mmap.mmap(f.fileno(), offset - start + nbytes, access=mmap.ACCESS_READ, offset=start)
        return np.frombuffer(raw, dtype=dtype, count=self.size, offset=offset - start).reshape(shape)

    def _streamable(self) -> bool:
        return self.dtype.bitwidth >= 8 and self.dtype != ir.DataType.STRING

    def numpy(self) -> np.ndarray:
        return self._map() if self._streamable() else super().numpy()

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def tobytes(self) -> bytes:
        if not self._streamable():
            return super().tobytes()
        return self._map().tobytes()


def _stream_external_tensors(model: ir.Model) -> None:
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if type(tensor) is ir.ExternalTensor:
                value.const_value = StreamedExternalTensor.like(tensor)


def load_model(path: str | os.PathLike) -> ir.Model:
    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    if not path.is_file():
        raise UserError(f"not a file: {path}")
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf decode errors have many types
        raise UserError(f"not a valid ONNX model: {path} ({type(e).__name__}: {_first_line(e)})") from None
    if not model.graph.outputs:
        raise UserError(f"not a valid ONNX model: {path} (the graph has no outputs)")
    _check_external_data(model, path)
    _stream_external_tensors(model)
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "unreadable"


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Every external weight file must exist and be long enough: fail now, not midway."""
    sizes: dict[Path, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        file = Path(tensor.base_dir) / tensor.location
        if file not in sizes:
            if not file.is_file():
                raise UserError(
                    f"external data file missing: {file} (needed by '{value.name}' of {path.name})"
                )
            sizes[file] = file.stat().st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[file]:
            raise UserError(
                f"external data file truncated: {file} ends before '{value.name}' (needs {end} bytes)"
            )


def fix_input_shapes(model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Apply ``--input-shape name=1,128`` overrides to the graph inputs."""
    inputs = {v.name: v for v in model.graph.inputs}
    for name, dims in shapes.items():
        if name not in inputs:
            raise UserError(
                f"--input-shape names '{name}', which is not a model input (inputs: {', '.join(inputs)})"
            )
        value = inputs[name]
        if value.shape is not None and len(value.shape) != len(dims):
            raise UserError(
                f"--input-shape {name}: rank {len(dims)} given, the input has rank {len(value.shape)}"
            )
        value.shape = ir.Shape(dims)


def require_static_inputs(model: ir.Model) -> None:
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        shape = value.shape
        if shape is None or not all(isinstance(d, int) for d in shape):
            dims = "?" if shape is None else ",".join(str(d) if isinstance(d, int) else "1" for d in shape)
            raise UserError(
                f"input '{value.name}' has a dynamic shape {shape}; the split needs static shapes: "
                f"pass --input-shape {value.name}={dims}"
            )
