"""Load a model lazily (external weights stay on disk) and reject bad input with one line.

External weights are :class:`StreamedExternalTensor` s: ``numpy()`` maps only that tensor's bytes
and the mapping goes away with the array, so reading weights one after the other (slicing every
head's piece while saving) never keeps more than the tensor being read resident. onnx_ir's own
``ExternalTensor`` caches a mapping of the whole file per tensor; every page read through it stays
in the process's RSS until the model is freed (3.2 GB for the q/k/v weights of a 7B model).
Copying an unchanged weight to the output goes through ``tofile`` (direct I/O, or
``copy_file_range`` in the kernel) and never maps it at all.

Because weights are read only while saving, an external file deleted or truncated after loading
would surface midway through the save, and a read through a mapping of a truncated file is a
SIGBUS that kills the process (Python cannot turn it into an exception). So the files' sizes are
recorded at load (``model.meta``), :func:`check_external_data_unchanged` re-checks them right
before saving, and every streamed read checks its file again just before mapping or copying it.
The remaining window (a file truncated while one tensor's mapping is alive) is microseconds long.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mha2sha.errors import UserError
from mha2sha.graph import name_of
from mha2sha.io.direct_io import copy_range

__all__ = [
    "load_model",
    "fix_input_shapes",
    "require_static_inputs",
    "StreamedExternalTensor",
    "check_external_data_unchanged",
]

# model.meta key: {external data file: bytes its tensors need}, recorded by load_model.
EXTERNAL_FILES_META = "mha2sha.external_files"


def _data_end(tensor: ir.ExternalTensor) -> int:
    """The byte of its external file right after ``tensor``'s data: the size the file needs."""
    return (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)


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

    def _require_data(self, size: int | None = None) -> None:
        """The file must still hold this tensor: it may have changed since it was loaded."""
        try:
            size = os.stat(self.path).st_size if size is None else size
        except FileNotFoundError:
            raise UserError(
                f"external data file missing: {self.path} (needed by '{self.name}'; "
                "removed after the model was loaded)"
            ) from None
        if size < _data_end(self):
            raise UserError(
                f"external data file truncated: {self.path} is {size} bytes, '{self.name}' needs "
                f"{_data_end(self)} (it changed after the model was loaded)"
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
        try:
            with open(self.path, "rb") as f:
                self._require_data(os.fstat(f.fileno()).st_size)
                raw = mmap.mmap(f.fileno(), offset - start + nbytes, access=mmap.ACCESS_READ, offset=start)
        except FileNotFoundError:
            self._require_data()  # the file is gone: say so as one line
            raise
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

    def tofile(self, file) -> None:
        """Direct I/O where the filesystem allows it (:mod:`mha2sha.io.direct_io`), else
        onnx_ir's kernel copy (``copy_file_range``)."""
        self._require_data()
        length = self.length if self.length is not None else self.nbytes
        if not copy_range(self.path, self.offset or 0, length, file):
            super().tofile(file)


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
    model.meta[EXTERNAL_FILES_META] = _check_external_data(model, path)
    _stream_external_tensors(model)
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "unreadable"


def _check_external_data(model: ir.Model, path: Path) -> dict[Path, int]:
    """Every external weight file must exist and be long enough: fail now, not midway.

    Returns the bytes each file must hold (the end of its last tensor)."""
    sizes: dict[Path, int] = {}
    ends: dict[Path, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        file = Path(tensor.base_dir) / tensor.location
        folder = os.path.join(os.path.realpath(tensor.base_dir), "")
        if Path(tensor.location).is_absolute() or not os.path.realpath(file).startswith(folder):
            raise UserError(
                f"external data '{tensor.location}' of '{value.name}' lies outside the model's folder "
                f"{tensor.base_dir} (onnx and onnxruntime refuse such paths): move it next to {path.name}"
            )
        if file not in sizes:
            if not file.is_file():
                raise UserError(
                    f"external data file missing: {file} (needed by '{value.name}' of {path.name})"
                )
            sizes[file] = file.stat().st_size
        end = _data_end(tensor)
        if end > sizes[file]:
            raise UserError(
                f"external data file truncated: {file} ends before '{value.name}' (needs {end} bytes)"
            )
        ends[file] = max(ends.get(file, 0), end)
    return ends


def check_external_data_unchanged(model: ir.Model) -> None:
    """Right before saving: the external files recorded at load (and any external initializer)
    must still exist and be long enough. Weights are read lazily while saving, so a file deleted
    or truncated since loading would otherwise fail midway, or kill the process with SIGBUS."""
    needed: dict[Path, int] = dict(model.meta.get(EXTERNAL_FILES_META) or {})
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and tensor.base_dir:
                file = Path(tensor.base_dir) / tensor.location
                end = _data_end(tensor)
                needed[file] = max(needed.get(file, 0), end)
    for file, end in needed.items():
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise UserError(
                f"external data file missing: {file} (removed after the model was loaded)"
            ) from None
        if size < end:
            raise UserError(
                f"external data file truncated: {file} is {size} bytes, the model needs {end} "
                "(it changed after the model was loaded)"
            )


def fix_input_shapes(model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Apply ``--input-shape name=1,128`` overrides to the graph inputs."""
    inputs = {name_of(v): v for v in model.graph.inputs}
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
        if value.shape is not None and any(
            isinstance(d, int) and d != n for d, n in zip(value.shape, dims, strict=True)
        ):
            declared = ",".join(str(d) if isinstance(d, int) else "?" for d in value.shape)
            raise UserError(
                f"--input-shape {name}={','.join(map(str, dims))} conflicts with the model's static shape [{declared}]"
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
