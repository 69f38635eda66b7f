"""The streamed weight writer (``--target htp`` Conv weights, per-head slices) writes exactly
numpy's C-order bytes of the view it is given, for every shape the tiles and chunks cut."""

from __future__ import annotations

import io
import mmap

import numpy as np
import pytest

from mha2sha.io import save


def _views(a: np.ndarray) -> list[np.ndarray]:
    """A transposed weight, a head's rows of it, a ragged slice, and 4-D Conv-shaped forms."""
    m, n = a.shape
    t = a.T
    return [
        t,
        t[3 : 3 + min(130, n - 3)],
        a[:, 1:].T,
        t.reshape(n, m, 1, 1),
        a[:, : max(1, n // 2)].T[..., None, None],
    ]


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((512, 512), np.float16), ((768, 300), np.float32), ((300, 1000), np.float16), ((5000, 7), np.float32),
     ((7, 600), np.float16), ((1, 64), np.float32), ((257, 259), np.float16)],
)  # fmt: skip
def test_transposed_views_are_written_in_c_order(shape, dtype, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(save, "_CHUNK_BYTES", 64 << 10)  # several chunks per tensor at these sizes
    a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    path = tmp_path / "w.bin"
    a.tofile(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        source = np.frombuffer(mapped, dtype=dtype).reshape(shape)  # as a memory-mapped weight is read
        for view in _views(source):
            out = io.BytesIO()
            save._write_chunked(out, view)
            assert out.getvalue() == np.ascontiguousarray(view).tobytes(), view.shape
        del source, view
