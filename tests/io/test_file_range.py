"""A head's piece that is one byte range of the input's external file becomes an external tensor of
its own (copied in the kernel when saved); anything else stays a lazy slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from mha2sha.io.load import StreamedExternalTensor
from mha2sha.io.pieces import file_range_of


def _external(tmp_path: Path, array: np.ndarray, pad: int = 100) -> StreamedExternalTensor:
    data = tmp_path / "w.data"
    data.write_bytes(b"\x07" * pad + array.tobytes())  # an offset that is not page-aligned
    return StreamedExternalTensor(
        data.name, pad, array.nbytes, ir.DataType.from_numpy(array.dtype), shape=ir.Shape(array.shape),
        name="w", base_dir=str(tmp_path),
    )  # fmt: skip


CONTIGUOUS = [
    (slice(128, 256), slice(None), slice(None), slice(None)),  # a head's rows of a Conv weight
    (slice(0, 1), slice(3, 5), slice(None), slice(None)),  # leading axis of extent 1
]
STRIDED = [
    (slice(None), slice(0, 4), slice(None), slice(None)),  # a head's columns: strided
    (slice(0, 2), slice(3, 5), slice(None), slice(None)),
    (slice(None), slice(None), slice(None), slice(None)),  # the whole tensor: not a piece
]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int8])
@pytest.mark.parametrize("index", CONTIGUOUS)
def test_contiguous_piece_is_its_own_byte_range(tmp_path: Path, dtype, index) -> None:
    array = (np.arange(384 * 8).reshape(384, 8, 1, 1) % 97).astype(dtype)
    piece = file_range_of(_external(tmp_path, array), index, "w.h1")
    assert piece is not None
    assert piece.name == "w.h1"
    np.testing.assert_array_equal(piece.numpy(), array[index])
    assert piece.tobytes() == np.ascontiguousarray(array[index]).tobytes()


@pytest.mark.parametrize("index", STRIDED)
def test_strided_or_whole_piece_stays_a_slice(tmp_path: Path, index) -> None:
    array = np.zeros((384, 8, 1, 1), np.float16)
    assert file_range_of(_external(tmp_path, array), index, "w.h") is None


def test_in_memory_tensor_stays_a_slice() -> None:
    tensor = ir.tensor(np.zeros((4, 4), np.float32))
    assert file_range_of(tensor, (slice(0, 2), slice(None)), "w.h") is None
