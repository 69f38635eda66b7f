"""RotaryEmbedding (ONNX opset 23 and com.microsoft) lowered to the HF rotate_half form."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from tests.lower._util import F32, MS, assert_lowers_exactly, lower, node_model, rand, refusal

I64 = TensorProto.INT64
MAX_POS = 12


def _caches(rng, half):
    angles = rng.uniform(0, 6.3, size=(MAX_POS, half))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@pytest.mark.parametrize(
    ("layout", "interleaved", "rotary_dim", "positions", "const_cache"),
    [
        ("bhsd", 0, 0, "2d", True),
        ("bhsd", 1, 0, "2d", True),
        ("bshd3", 0, 0, "2d", False),
        ("bshd3", 1, 8, "2d", True),  # partial, interleaved
        ("bhsd", 0, 8, "2d", False),  # partial, half split
        ("bhsd", 0, 0, "none", False),  # caches given per position [B, S, r/2]
        ("bshd3", 1, 0, "none", False),
    ],
)
def test_onnx_rotary(layout, interleaved, rotary_dim, positions, const_cache):
    rng = np.random.default_rng(7)
    b, h, s, d = 2, 4, 3, 16
    rd = rotary_dim or d
    x_shape = (b, h, s, d) if layout == "bhsd" else (b, s, h * d)
    feeds = {"x": rand(rng, *x_shape)}
    cos, sin = _caches(rng, rd // 2)
    inits = {}
    if positions == "2d":
        feeds["pos"] = rng.integers(0, MAX_POS, size=(b, s)).astype(np.int64)
        cache_shape = cos.shape
        caches = {"cos": cos, "sin": sin}
    else:
        idx = rng.integers(0, MAX_POS, size=(b, s))
        caches = {"cos": cos[idx], "sin": sin[idx]}
        cache_shape = caches["cos"].shape
    if const_cache:
        inits.update(caches)
    else:
        feeds.update(caches)
    inputs = [("x", F32, x_shape), ("cos", F32, cache_shape), ("sin", F32, cache_shape)]
    if positions == "2d":
        inputs.append(("pos", I64, (b, s)))
    attrs = {"interleaved": interleaved}
    if rotary_dim:
        attrs["rotary_embedding_dim"] = rotary_dim
    if layout == "bshd3":
        attrs["num_heads"] = h
    model = node_model("RotaryEmbedding", inputs, ["y"], opset=23, initializers=inits, **attrs)
    assert_lowers_exactly(model, feeds)


@pytest.mark.parametrize(
    ("layout", "interleaved", "rotary_dim", "positions", "num_heads"),
    [
        ("bhsd", 0, 0, "2d", 0),
        ("bhsd", 1, 0, "offset", 0),
        ("bshd3", 0, 0, "2d", 0),  # full rotation: the head size is the rotary dim
        ("bshd3", 1, 0, "offset", 4),
        ("bshd3", 0, 8, "2d", 4),  # partial rotation needs num_heads
        ("bshd3", 1, 8, "offset", 4),
    ],
)
def test_ms_rotary(layout, interleaved, rotary_dim, positions, num_heads):
    rng = np.random.default_rng(3)
    b, h, s, d = 2, 4, 5, 16
    rd = rotary_dim or d
    x_shape = (b, h, s, d) if layout == "bhsd" else (b, s, h * d)
    cos, sin = _caches(rng, rd // 2)
    feeds = {"x": rand(rng, *x_shape)}
    if positions == "2d":
        feeds["pos"] = rng.integers(0, MAX_POS, size=(b, s)).astype(np.int64)
    else:
        feeds["pos"] = np.array([4], np.int64)
    inputs = [
        ("x", F32, x_shape),
        ("pos", I64, feeds["pos"].shape),
        ("cos", F32, cos.shape),
        ("sin", F32, sin.shape),
    ]
    attrs = {"interleaved": interleaved}
    if rotary_dim:
        attrs["rotary_embedding_dim"] = rotary_dim
    if num_heads:
        attrs["num_heads"] = num_heads
    model = node_model(
        "RotaryEmbedding", inputs, ["y"], domain=MS, initializers={"cos": cos, "sin": sin}, **attrs
    )
    assert_lowers_exactly(model, feeds)


def test_ms_rotary_scale_is_ignored_like_the_cpu_kernel():
    rng = np.random.default_rng(4)
    cos, sin = _caches(rng, 8)
    inputs = [
        ("x", F32, (1, 4, 3, 16)),
        ("pos", I64, (1, 3)),
        ("cos", F32, cos.shape),
        ("sin", F32, sin.shape),
    ]
    model = node_model(
        "RotaryEmbedding", inputs, ["y"], domain=MS, initializers={"cos": cos, "sin": sin}, scale=2.0
    )
    feeds = {"x": rand(rng, 1, 4, 3, 16), "pos": np.array([[0, 5, 9]], np.int64)}
    assert_lowers_exactly(model, feeds)
    assert "scale ignored" in lower(model)[1].notes[0][2]


def test_ms_rotary_refuses_packed_batching():
    model = node_model(
        "RotaryEmbedding",
        [("x", F32, (1, 3, 32)), ("pos", I64, (1, 3)), ("cos", F32, (8, 8)), ("sin", F32, (8, 8))],
        ["y"],
        domain=MS,
        is_packed_batching=1,
    )
    assert "is_packed_batching" in refusal(model)
