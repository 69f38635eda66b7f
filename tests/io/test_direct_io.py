"""Direct-I/O range copies give the bytes a plain copy gives, or decline and write nothing."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from mha2sha.errors import UserError
from mha2sha.io import direct_io
from mha2sha.io.direct_io import ALIGN, copy_range


def _direct_io_works(folder) -> bool:
    probe = folder / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
    except OSError:
        return False
    return hasattr(os, "O_DIRECT")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 blocks and no minimum size, so that small files take every path."""
    monkeypatch.setattr(direct_io, "CHUNK_BYTES", 3 * ALIGN)
    monkeypatch.setattr(direct_io, "DIRECT_MIN_BYTES", 1)


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 10 * ALIGN),  # aligned, whole chunks and a partial one
        (ALIGN, 9 * ALIGN),  # aligned start, chunks only
        (1000, 7 * ALIGN + 123),  # mid-block start (shifted in memory), partial last block
        (4095, 3 * ALIGN),  # one chunk, shifted by all but one byte
        (17, 100),  # shorter than a block: only the tail path
    ],
)
@pytest.mark.parametrize("from_cache", [True, False])
def test_bytes_equal_a_plain_copy(tmp_path, small_chunks, monkeypatch, offset, length, from_cache):
    """``from_cache``: the input was just written, so its chunks are read from the page cache;
    else every chunk is read from the disk (direct, aligned cover, shifted)."""
    if not from_cache:
        monkeypatch.setattr(direct_io, "_USE_CACHE", False)
    hits: list[bool] = []
    real = direct_io._read_cached
    monkeypatch.setattr(direct_io, "_read_cached", lambda *a: hits.append(real(*a)) or hits[-1])
    source = tmp_path / "in.data"
    data = np.random.default_rng(offset).integers(0, 256, 12 * ALIGN, dtype=np.uint8).tobytes()
    source.write_bytes(data)
    out_path = tmp_path / "out.data"
    with open(out_path, "wb") as out:
        out.write(b"h" * 10)
        out.seek(2 * ALIGN)  # the save aligns every tensor's start
        used = copy_range(source, offset, length, out)
        assert out.tell() == 2 * ALIGN + length  # positioned like after out.write
        out.write(b"next")
    if _direct_io_works(tmp_path):
        assert used
    if not used:  # declined: nothing written, the caller copies
        return
    fd = os.open(source, os.O_RDONLY)
    try:  # cachestat needs Linux >= 6.5; without it every chunk comes from the disk
        kernel_tells = sys.platform == "linux" and direct_io._cached_pages(fd, 0, 1) > 0
    finally:
        os.close(fd)
    assert any(hits) == (from_cache and kernel_tells)
    written = out_path.read_bytes()
    assert written[:10] == b"h" * 10
    assert written[2 * ALIGN : 2 * ALIGN + length] == data[offset : offset + length]
    assert written[2 * ALIGN + length :] == b"next"
    assert len(written) == 2 * ALIGN + length + 4  # no padding past the range


def test_declines_without_writing(tmp_path, small_chunks, monkeypatch):
    source = tmp_path / "in.data"
    source.write_bytes(bytes(4 * ALIGN))
    with open(tmp_path / "out.data", "wb") as out:
        out.write(b"x" * 5)  # an unaligned start
        assert not copy_range(source, 0, 2 * ALIGN, out)
        assert out.tell() == 5
    monkeypatch.setattr(direct_io, "_O_DIRECT", 0)  # a platform or filesystem without it
    with open(tmp_path / "out2.data", "wb") as out:
        assert not copy_range(source, 0, 2 * ALIGN, out)
        assert out.tell() == 0
    assert (tmp_path / "out2.data").stat().st_size == 0


def test_a_source_shorter_than_its_range_is_one_line(tmp_path, small_chunks):
    if not _direct_io_works(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT: copy_range declines (test_declines_without_writing)")
    source = tmp_path / "in.data"
    source.write_bytes(bytes(2 * ALIGN))
    with open(tmp_path / "out.data", "wb") as out, pytest.raises(UserError, match="became shorter"):
        copy_range(source, 0, 5 * ALIGN, out)


def test_a_saved_model_reads_back_the_same_weights(tmp_path, monkeypatch):
    """load_model -> save_model with weights at unaligned offsets of the input's data file: the big
    one goes through direct I/O (where the filesystem has it), every weight reads back equal."""
    import onnx
    from onnx import TensorProto, helper

    from mha2sha.io import load
    from mha2sha.io.load import load_model
    from mha2sha.io.save import save_model

    rng = np.random.default_rng(0)
    weights = {
        "big": rng.standard_normal((700, 501)).astype(np.float32),  # 1.4 MB
        "small": rng.standard_normal((3, 5)).astype(np.float16),
    }
    src = tmp_path / "in"
    src.mkdir()
    inits, offset, blob = [], 123, bytearray(b"\0" * 123)
    for name, array in weights.items():
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in {"location": "in.data", "offset": str(offset), "length": str(array.nbytes)}.items():
            t.external_data.add(key=k, value=v)
        inits.append(t)
        blob += array.tobytes()
        offset += array.nbytes
    (src / "in.data").write_bytes(bytes(blob))
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in weights]
    outputs = [
        helper.make_tensor_value_info(f"{n}_out", helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for n, a in weights.items()
    ]
    graph = helper.make_graph(nodes, "g", [], outputs, initializer=inits)
    onnx.save(helper.make_model(graph), src / "in.onnx")

    used: list[bool] = []
    real = load.copy_range
    monkeypatch.setattr(load, "copy_range", lambda *a: used.append(real(*a)) or used[-1])
    model = load_model(src / "in.onnx")
    out = tmp_path / "out"
    out.mkdir()
    save_model(model, out / "m.onnx")
    if _direct_io_works(out):
        assert True in used
    saved = load_model(out / "m.onnx")
    for name, array in weights.items():
        np.testing.assert_array_equal(saved.graph.initializers[name].const_value.numpy(), array)
    assert (src / "in.data").read_bytes() == bytes(blob)  # the input untouched


def _write_through(path, pieces: list[bytes], at: int, nbytes: int | None = None) -> bool:
    """``pieces`` written at ``at`` through direct_writer, then b"next"; True when it went direct."""
    with open(path, "wb") as out:
        out.write(b"h" * 10)
        out.seek(at)
        with direct_io.direct_writer(out, nbytes or sum(map(len, pieces))) as writer:
            for piece in pieces:
                writer.write(piece)
        assert out.tell() == at + sum(map(len, pieces))
        out.write(b"next")
        return writer is not out


@pytest.mark.parametrize("sizes", [[3 * ALIGN], [5, ALIGN - 5, 7 * ALIGN + 1, 3], [9 * ALIGN + 17], [1, 2, 3]])
def test_written_bytes_equal_plain_writes(tmp_path, small_chunks, sizes):
    rng = np.random.default_rng(len(sizes))
    pieces = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    direct = _write_through(tmp_path / "out.data", pieces, 2 * ALIGN)
    assert direct == _direct_io_works(tmp_path)
    written = (tmp_path / "out.data").read_bytes()
    assert written == b"h" * 10 + bytes(2 * ALIGN - 10) + b"".join(pieces) + b"next"  # no padding


def test_writer_declines_small_or_unaligned(tmp_path):
    assert not _write_through(tmp_path / "a.data", [b"x" * 100], 2 * ALIGN)  # below DIRECT_MIN_BYTES
    assert not _write_through(tmp_path / "b.data", [b"x" * (2 << 20)], ALIGN + 1)  # unaligned start
    assert (tmp_path / "b.data").read_bytes()[ALIGN + 1 : -4] == b"x" * (2 << 20)


def test_writer_falls_back_when_the_device_refuses_the_alignment(tmp_path, small_chunks, monkeypatch):
    """EINVAL from a direct write: the rest goes through the page cache, no byte lost."""
    import errno

    real = os.pwrite
    direct_fds: set[int] = set()
    real_open = direct_io._open_direct

    def open_direct(path, flags):
        fd = real_open(path, flags)
        if fd is not None:
            direct_fds.add(fd)
        return fd

    def pwrite(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct_io, "_open_direct", open_direct)
    monkeypatch.setattr(os, "pwrite", pwrite)
    pieces = [bytes([k]) * (2 * ALIGN + k) for k in range(1, 6)]
    _write_through(tmp_path / "out.data", pieces, ALIGN)
    assert (tmp_path / "out.data").read_bytes()[ALIGN:] == b"".join(pieces) + b"next"


def test_transposed_weights_written_direct_are_c_order(tmp_path, small_chunks, monkeypatch):
    """The ``--target htp`` writer (save._write_chunked) through a DirectWriter: numpy's bytes."""
    from mha2sha.io import save

    monkeypatch.setattr(save, "_CHUNK_BYTES", 64 << 10)
    a = np.random.default_rng(1).standard_normal((300, 1000)).astype(np.float16)
    for view in (a.T, a.T[3:200], a[:, 1:].T[..., None, None]):
        path = tmp_path / "w.data"
        with open(path, "wb") as out, direct_io.direct_writer(out, view.nbytes) as writer:
            save._write_chunked(writer, view)
        assert path.read_bytes() == np.ascontiguousarray(view).tobytes()
