"""ONNX Attention (opset 23/24) lowered to primitives gives onnxruntime's outputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx import TensorProto

from tests.lower._util import F32, assert_lowers_exactly, node_model, rand, refusal

MAX_ERR: dict[str, float] = {}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    rank: int = 4
    b: int = 1
    s: int = 3
    kv: int = 3  # new keys (kv_sequence_length)
    past: int = 0
    hq: int = 4
    hkv: int = 4
    d: int = 8
    mask: str | None = None  # "bool" | "float" | "bool_dead_row" | "float_lowest_row"
    mask_shape: str = "b1st"  # "st" | "b1st" | "bhst" | "1hst"
    causal: int = 0
    softcap: float = 0.0
    scale: float | None = None
    qk_mode: int | None = None  # request the 4th output with this mode
    nonpad: bool = False
    opset: int = 23
    softmax_precision: bool = False


CASES = [
    Case("mha_4d"),
    Case("mha_4d_opset24", opset=24),
    Case("gqa_3d_past_causal", rank=3, b=2, s=3, past=5, hkv=2, causal=1),
    Case("mqa_3d_causal", rank=3, s=5, kv=5, hkv=1, causal=1, d=16),
    Case("gqa_4d_bool_mask", hkv=2, mask="bool"),
    Case("bool_mask_dead_row", mask="bool_dead_row", mask_shape="st"),
    Case("float_mask_causal_softcap", mask="float", mask_shape="st", causal=1, softcap=2.0),
    Case("float_mask_bhst_scale", b=2, mask="float", mask_shape="bhst", scale=0.3),
    Case("float_mask_1hst_lowest_row", mask="float_lowest_row", mask_shape="1hst"),
    Case("past_bool_mask_causal", rank=3, past=4, s=2, kv=2, hkv=2, mask="bool", causal=1),
    Case("qk_mode0", qk_mode=0),
    Case("qk_mode1_softcap", qk_mode=1, softcap=1.5, causal=1),
    Case("qk_mode2_mask", qk_mode=2, mask="bool", causal=1, opset=24),
    Case("qk_mode3_dead_row", qk_mode=3, mask="bool_dead_row", opset=24),
    Case("nonpad", b=2, s=3, kv=6, nonpad=True, opset=24),
    Case("nonpad_causal", b=2, s=3, kv=6, nonpad=True, causal=1, opset=24, hkv=2),
    Case("nonpad_causal_3d_mask", rank=3, b=2, s=2, kv=5, nonpad=True, causal=1, mask="float", opset=24),
    Case("ar_eq_heads", s=4, kv=4, past=3, hq=4, hkv=2, causal=1, rank=3),
    Case("head_dim_eq_heads", hq=4, hkv=4, d=4, s=4, kv=4, causal=1),
    Case("single_query", rank=3, s=1, kv=1, past=6, hkv=2, causal=1),
    Case("softmax_precision_ignored", softmax_precision=True),
]


def _model_and_feeds(c: Case):
    rng = np.random.default_rng(abs(hash(c.name)) % 2**32)
    total = c.past + c.kv
    if c.rank == 4:
        shapes = {"Q": (c.b, c.hq, c.s, c.d), "K": (c.b, c.hkv, c.kv, c.d), "V": (c.b, c.hkv, c.kv, c.d)}
    else:
        shapes = {"Q": (c.b, c.s, c.hq * c.d), "K": (c.b, c.kv, c.hkv * c.d), "V": (c.b, c.kv, c.hkv * c.d)}
    feeds = {n: rand(rng, *s) for n, s in shapes.items()}
    inputs: list = [(n, F32, s) for n, s in shapes.items()]
    mask_dims = {
        "st": (c.s, total),
        "b1st": (c.b, 1, c.s, total),
        "bhst": (c.b, c.hq, c.s, total),
        "1hst": (1, c.hq, c.s, total),
    }[c.mask_shape]
    if c.mask is None:
        inputs.append(None)
    elif c.mask.startswith("bool"):
        mask = rng.random(mask_dims) > 0.3
        mask[..., 0] = True
        if c.mask == "bool_dead_row":
            mask[..., 1, :] = False
        inputs.append(("attn_mask", TensorProto.BOOL, mask_dims))
        feeds["attn_mask"] = mask
    else:
        mask = rand(rng, *mask_dims)
        if c.mask == "float_lowest_row":
            mask[..., 1, :] = np.finfo(np.float32).min
        inputs.append(("attn_mask", F32, mask_dims))
        feeds["attn_mask"] = mask
    if c.past:
        pshape = (c.b, c.hkv, c.past, c.d)
        inputs += [("past_key", F32, pshape), ("past_value", F32, pshape)]
        feeds["past_key"], feeds["past_value"] = rand(rng, *pshape), rand(rng, *pshape)
    else:
        inputs += [None, None]
    if c.nonpad:
        inputs.append(("nonpad_kv_seqlen", TensorProto.INT64, (c.b,)))
        feeds["nonpad_kv_seqlen"] = np.array([total - 1, 2][: c.b], np.int64)
    outputs = ["Y", "present_key" if c.past else None, "present_value" if c.past else None]
    attrs: dict = {}
    if c.qk_mode is not None:
        outputs.append("qk")
        if c.qk_mode:
            attrs["qk_matmul_output_mode"] = c.qk_mode
    if c.rank == 3:
        attrs.update(q_num_heads=c.hq, kv_num_heads=c.hkv)
    if c.causal:
        attrs["is_causal"] = 1
    if c.softcap:
        attrs["softcap"] = c.softcap
    if c.scale is not None:
        attrs["scale"] = c.scale
    if c.softmax_precision:
        attrs["softmax_precision"] = 1
    model = node_model("Attention", inputs, outputs, opset=c.opset, **attrs)
    return model, feeds


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_onnx_attention_lowers_exactly(case):
    model, feeds = _model_and_feeds(case)
    MAX_ERR[case.name] = assert_lowers_exactly(model, feeds)


def test_refuses_window_attributes():
    model, _ = _model_and_feeds(Case("w", opset=24))
    model.opset_import[0].version = 25
    model.graph.node[0].attribute.append(__import__("onnx").helper.make_attribute("left_window_size", 2))
    assert "left_window_size" in refusal(model)


def test_refuses_short_mask():
    model, _ = _model_and_feeds(Case("short", mask="float", mask_shape="st"))
    vi = model.graph.input[3]
    vi.type.tensor_type.shape.dim[-1].dim_value = 2
    assert "total sequence length" in refusal(model)
