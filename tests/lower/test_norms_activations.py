"""Contrib norms and activations lowered to standard ONNX give onnxruntime's outputs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from tests.lower._util import F32, MS, assert_lowered_matches, assert_lowers_exactly, node_model, rand

F16 = TensorProto.FLOAT16
I32 = TensorProto.INT32
B, S, C = 2, 5, 16


@pytest.mark.parametrize(
    ("axis", "epsilon", "opset", "shape"),
    [(-1, 1e-5, 23, (B, S, C)), (-2, 1e-6, 23, (B, S, C)), (1, 1e-5, 23, (B, S, C)), (-1, 1e-6, 24, (S, C))],
)
def test_rms_normalization(axis, epsilon, opset, shape):
    rng = np.random.default_rng(0)
    scale_shape = shape[axis:] if axis >= 0 else shape[len(shape) + axis :]
    model = node_model(
        "RMSNormalization",
        [("x", F32, shape), ("scale", F32, scale_shape)],
        ["y"],
        opset=opset,
        initializers={"scale": rand(rng, *scale_shape)},
        axis=axis,
        epsilon=epsilon,
    )
    assert_lowers_exactly(model, {"x": rand(rng, *shape, scale=3.0)})


def test_rms_normalization_float16_stash_float():
    rng = np.random.default_rng(1)
    model = node_model(
        "RMSNormalization",
        [("x", F16, (B, S, C)), ("scale", F16, (C,))],
        ["y"],
        opset=23,
        initializers={"scale": rand(rng, C).astype(np.float16)},
        output_types={"y": F16},
        stash_type=1,
    )
    assert_lowers_exactly(model, {"x": rand(rng, B, S, C).astype(np.float16)}, rtol=1e-3)


@pytest.mark.parametrize("inv_std_used", [False, True])
def test_simplified_layer_norm(inv_std_used):
    rng = np.random.default_rng(2)
    model = node_model(
        "SimplifiedLayerNormalization",
        [("x", F32, (B, S, C)), ("scale", F32, (C,))],
        ["y", "inv_std_var" if inv_std_used else None],
        opset=17,
        initializers={"scale": rand(rng, C)},
        axis=-1,
        epsilon=1e-6,
    )
    assert_lowers_exactly(model, {"x": rand(rng, B, S, C)})


@pytest.mark.parametrize(
    ("op", "bias", "beta", "outputs", "opset"),
    [
        ("SkipLayerNormalization", False, True, ["y"], 17),
        ("SkipLayerNormalization", True, True, ["y", None, None, "sum"], 17),
        ("SkipLayerNormalization", True, False, ["y", None, None, "sum"], 14),  # primitive form
        ("SkipLayerNormalization", False, True, ["y", "mean", "inv_std"], 17),
        ("SkipSimplifiedLayerNormalization", False, False, ["y"], 17),
        ("SkipSimplifiedLayerNormalization", True, False, ["y", None, None, "sum"], 17),
        ("SkipSimplifiedLayerNormalization", True, False, ["y", None, "inv_std", "sum"], 14),
    ],
)
def test_skip_norms(op, bias, beta, outputs, opset):
    rng = np.random.default_rng(3)
    inits = {"gamma": rand(rng, C)}
    inputs = [("x", F32, (B, S, C)), ("skip", F32, (B, S, C)), ("gamma", F32, (C,))]
    if op == "SkipLayerNormalization":
        inputs.append(("beta", F32, (C,)) if beta else None)
        if beta:
            inits["beta"] = rand(rng, C)
    if bias:
        inputs.append(("bias", F32, (C,)))
        inits["bias"] = rand(rng, C)
    model = node_model(op, inputs, outputs, domain=MS, opset=opset, initializers=inits, epsilon=1e-5)
    assert_lowers_exactly(model, {"x": rand(rng, B, S, C), "skip": rand(rng, B, S, C)})


@pytest.mark.parametrize(
    "op", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization"]
)
def test_default_epsilon(op):
    """Small activations make the epsilon visible: the contrib default is 1e-12, not 1e-5."""
    rng = np.random.default_rng(8)
    if op == "EmbedLayerNormalization":
        inits = {
            "w": rand(rng, 10, C, scale=1e-3),
            "p": rand(rng, 8, C, scale=1e-3),
            "g": rand(rng, C),
            "bt": rand(rng, C),
        }
        inputs = [
            ("ids", I32, (B, S)),
            None,
            ("w", F32, None),
            ("p", F32, None),
            None,
            ("g", F32, None),
            ("bt", F32, None),
        ]
        feeds = {"ids": rng.integers(0, 10, (B, S)).astype(np.int32)}
        model = node_model(op, inputs, ["y"], domain=MS, initializers=inits, mask_index_type=0)
    else:
        inits = {"g": rand(rng, C)}
        inputs = [("x", F32, (B, S, C)), ("skip", F32, (B, S, C)), ("g", F32, None)]
        feeds = {"x": rand(rng, B, S, C, scale=1e-3), "skip": rand(rng, B, S, C, scale=1e-3)}
        model = node_model(op, inputs, ["y"], domain=MS, initializers=inits)
    assert_lowers_exactly(model, feeds)


@pytest.mark.parametrize("stash", [1])
def test_layer_norm_of_ort_opset1_schema(stash):
    rng = np.random.default_rng(4)
    model = node_model(
        "LayerNormalization",
        [("x", F32, (B, S, C)), ("g", F32, (C,)), ("bt", F32, (C,))],
        ["y"],
        opset=14,
        initializers={"g": rand(rng, C), "bt": rand(rng, C)},
        axis=-1,
        epsilon=1e-5,
        stash_type=stash,
    )
    assert_lowers_exactly(model, {"x": rand(rng, B, S, C)})


@pytest.mark.parametrize(
    ("segments", "position_ids", "outputs"),
    [
        (True, False, ["y", "mask_index", "embedding_sum"]),
        (False, True, ["y", "mask_index"]),
        (True, True, ["y"]),
    ],
)
def test_embed_layer_norm(segments, position_ids, outputs):
    rng = np.random.default_rng(5)
    vocab, max_pos = 30, 16
    inits = {
        "words": rand(rng, vocab, C),
        "positions": rand(rng, max_pos, C),
        "gamma": rand(rng, C),
        "beta": rand(rng, C),
    }
    feeds = {
        "ids": rng.integers(0, vocab, (B, S)).astype(np.int32),
        "mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32),
    }
    inputs = [("ids", I32, (B, S)), ("segment_ids", I32, (B, S)) if segments else None, ("words", F32, None)]
    inputs += [("positions", F32, None), ("segments", F32, None) if segments else None]
    inputs += [("gamma", F32, None), ("beta", F32, None), ("mask", I32, (B, S))]
    if segments:
        inits["segments"] = rand(rng, 2, C)
        feeds["segment_ids"] = rng.integers(0, 2, (B, S)).astype(np.int32)
    if position_ids:
        inputs.append(("position_ids", I32, (B, S)))
        feeds["position_ids"] = rng.integers(0, max_pos, (B, S)).astype(np.int32)
    model = node_model(
        "EmbedLayerNormalization",
        inputs,
        outputs,
        domain=MS,
        initializers=inits,
        output_types={"mask_index": I32},
        epsilon=1e-12,
        mask_index_type=1 if "mask_index" in outputs else 0,
    )
    assert_lowers_exactly(model, feeds)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize(
    ("op", "bias", "attrs"),
    [
        ("Gelu", False, {}),
        ("BiasGelu", True, {}),
        ("FastGelu", False, {}),
        ("FastGelu", True, {}),
        ("QuickGelu", False, {}),
        ("QuickGelu", False, {"alpha": 1.5}),
        ("BiasAdd", True, {}),
        ("BiasSplitGelu", True, {}),
    ],
)
def test_activations(op, bias, attrs, opset):
    rng = np.random.default_rng(6)
    shape = (B, S, C)
    feeds = {"x": rand(rng, *shape, scale=3.0)}
    inputs = [("x", F32, shape)]
    inits = {}
    if bias:
        width = 2 * C if op == "BiasSplitGelu" else C
        if op == "BiasSplitGelu":
            shape = (B, S, width)
            inputs = [("x", F32, shape)]
            feeds["x"] = rand(rng, *shape, scale=3.0)
        inputs.append(("bias", F32, (width,)))
        inits["bias"] = rand(rng, width)
    if op == "BiasAdd":
        inputs.append(("skip", F32, shape))
        feeds["skip"] = rand(rng, *shape)
    model = node_model(op, inputs, ["y"], domain=MS, opset=opset, initializers=inits, **attrs)
    if op == "BiasAdd":  # CUDA-only kernels in onnxruntime: checked against the contrib spec
        assert_lowered_matches(model, feeds, {"y": feeds["x"] + inits["bias"] + feeds["skip"]})
    elif op == "BiasSplitGelu":
        left, right = np.split(feeds["x"] + inits["bias"], 2, axis=-1)
        gelu = 0.5 * right * (1 + _erf(right / np.sqrt(2)))
        assert_lowered_matches(model, feeds, {"y": (left * gelu).astype(np.float32)})
    else:
        assert_lowers_exactly(model, feeds)


def _erf(x: np.ndarray) -> np.ndarray:
    import math

    return np.vectorize(math.erf)(x.astype(np.float64))
