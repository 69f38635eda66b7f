"""Head pieces of a weight, made without copying it: a byte range of the input's external file when
the piece is contiguous there (:func:`file_range_of`), else a lazy numpy slice (:class:`SlicedTensor`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mha2sha.io.load import StreamedExternalTensor

__all__ = ["SlicedTensor", "file_range_of", "piece_of"]


class SlicedTensor(ir.LazyTensor):
    """``source[index]``, read when saved or verified. ``source`` and ``index`` stay visible so a
    reader of many pieces of one weight (a block's heads) can map the weight once for all of them."""

    def __init__(self, source: ir.TensorProtocol, index: tuple[slice, ...], shape: ir.Shape, name: str):
        self.source = source
        self.index = index
        super().__init__(self._view, source.dtype, shape, name=name)

    def _view(self) -> ir.TensorProtocol:
        return ir.tensor(self.source.numpy()[self.index])  # a view; the saver copies it in chunks


def piece_of(
    source: ir.TensorProtocol, index: tuple[slice, ...], shape: ir.Shape, name: str
) -> ir.TensorProtocol:
    """The piece ``source[index]``: a byte range of the input's file when it is one, else a lazy slice."""
    return file_range_of(source, index, name) or SlicedTensor(source, index, shape, name)


def file_range_of(
    tensor: ir.TensorProtocol, index: tuple[slice, ...], name: str
) -> StreamedExternalTensor | None:
    """``tensor[index]`` as an external tensor of its own, when ``tensor`` lives in an external
    file and the slice is one contiguous byte range of it (one index on every axis before the last
    sliced axis, every axis after it whole): a head's rows of a Conv weight, a head's
    bias. The save then copies it in the kernel like an unchanged weight, and verification reads
    exactly the bytes the saved file will hold. ``None`` for anything else (strided slices,
    in-memory tensors, sub-byte types): those stay lazy numpy slices."""
    if not isinstance(tensor, ir.ExternalTensor) or tensor.dtype.bitwidth < 8:
        return None
    if tensor.dtype == ir.DataType.STRING:
        return None
    dims = [int(d) for d in tensor.shape.numpy()]
    if len(index) != len(dims) or any(s.step not in (None, 1) for s in index):
        return None
    ranges = [s.indices(d)[:2] for s, d in zip(index, dims, strict=True)]
    partial = [axis for axis, (a, b) in enumerate(ranges) if (a, b) != (0, dims[axis])]
    if not partial:
        return None  # the whole tensor: nothing to slice
    cut = partial[-1]  # every axis after it is whole; every axis before it must be one index
    if any(b - a != 1 for a, b in ranges[:cut]):
        return None
    itemsize = tensor.dtype.bitwidth // 8
    strides = [itemsize * int(np.prod(dims[axis + 1 :], dtype=np.int64)) for axis in range(len(dims))]
    start = sum(a * stride for (a, _), stride in zip(ranges, strides, strict=True))
    shape = [b - a for a, b in ranges]
    length = int(np.prod(shape, dtype=np.int64)) * itemsize
    return StreamedExternalTensor(
        tensor.location,
        (tensor.offset or 0) + start,
        length,
        tensor.dtype,
        shape=ir.Shape(shape),
        name=name,
        base_dir=tensor.base_dir,
    )
