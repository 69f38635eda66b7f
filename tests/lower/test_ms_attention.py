"""com.microsoft.Attention and MultiHeadAttention lowered to primitives give onnxruntime's outputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx import TensorProto

from tests.lower._util import (
    F32,
    MS,
    assert_lowered_matches,
    assert_lowers_exactly,
    node_model,
    rand,
    refusal,
    run_ort,
)

I32 = TensorProto.INT32
MAX_ERR: dict[str, float] = {}


@dataclasses.dataclass(frozen=True)
class AttnCase:
    name: str
    b: int = 2
    s: int = 3
    heads: int = 4
    d: int = 8
    din: int = 24
    bias: bool = True
    mask: str | None = None  # "raw2d" | "raw3d" | "lengths" | "start_end" | "dead_row"
    past: int = 0
    unidirectional: int = 0
    attention_bias: str | None = None  # "1hst" | "b1st"
    qkv_hidden_sizes: tuple[int, int, int] | None = None
    scale: float | None = None
    mask_filter_value: float | None = None


ATTN_CASES = [
    AttnCase("plain"),
    AttnCase("no_bias", bias=False),
    AttnCase("raw2d_mask", mask="raw2d"),
    AttnCase("raw3d_mask", mask="raw3d"),
    AttnCase("key_lengths", mask="lengths"),
    AttnCase("key_start_end", mask="start_end"),
    AttnCase("fully_masked_batch", mask="dead_row", mask_filter_value=-50.0),
    AttnCase("unidirectional", unidirectional=1),
    AttnCase("past_unidirectional_mask", past=4, unidirectional=1, mask="raw2d"),
    AttnCase("single_token_past", s=1, past=5, unidirectional=1),
    AttnCase("attention_bias", attention_bias="1hst", mask="raw2d"),
    AttnCase("attention_bias_b1st", attention_bias="b1st", unidirectional=1),
    AttnCase("qkv_hidden_sizes", qkv_hidden_sizes=(32, 32, 16)),
    AttnCase("scale", scale=0.2),
    AttnCase("ar_eq_heads", s=4, heads=4, d=8, unidirectional=1),
    AttnCase("head_dim_eq_heads", s=5, heads=4, d=4, din=16, mask="raw2d"),
]


def _attention_model(c: AttnCase):
    rng = np.random.default_rng(sum(map(ord, c.name)))
    sizes = c.qkv_hidden_sizes or (c.heads * c.d,) * 3
    total = c.past + c.s
    inits = {"w": rand(rng, c.din, sum(sizes), scale=c.din**-0.5)}
    if c.bias:
        inits["bias"] = rand(rng, sum(sizes))
    feeds = {"x": rand(rng, c.b, c.s, c.din)}
    inputs: list = [("x", F32, (c.b, c.s, c.din)), ("w", F32, None), ("bias", F32, None) if c.bias else None]
    if c.mask in ("raw2d", "dead_row"):
        mask = (rng.random((c.b, total)) > 0.3).astype(np.int32)
        mask[:, 0] = 1
        if c.mask == "dead_row":
            mask[1] = 0
        feeds["mask"] = mask
    elif c.mask == "raw3d":
        mask = (rng.random((c.b, c.s, total)) > 0.3).astype(np.int32)
        mask[..., 0] = 1
        feeds["mask"] = mask
    elif c.mask == "lengths":
        feeds["mask"] = np.array([total, total - 1][: c.b], np.int32)
    elif c.mask == "start_end":
        feeds["mask"] = np.array([total, total - 1, 1, 0][: 2 * c.b] if c.b == 2 else [total, 1], np.int32)
    inputs.append(("mask", I32, feeds["mask"].shape) if c.mask else None)
    if c.past:
        shape = (2, c.b, c.heads, c.past, c.d)
        feeds["past"] = rand(rng, *shape)
        inputs.append(("past", F32, shape))
    else:
        inputs.append(None)
    if c.attention_bias:
        shape = (1, c.heads, c.s, total) if c.attention_bias == "1hst" else (c.b, 1, c.s, total)
        feeds["attention_bias"] = rand(rng, *shape)
        inputs.append(("attention_bias", F32, shape))
    attrs: dict = {"num_heads": c.heads}
    for key in ("unidirectional", "scale", "mask_filter_value"):
        if getattr(c, key):
            attrs[key] = getattr(c, key)
    if c.qkv_hidden_sizes:
        attrs["qkv_hidden_sizes"] = list(c.qkv_hidden_sizes)
    outputs = ["y", "present" if c.past else None]
    return node_model("Attention", inputs, outputs, domain=MS, initializers=inits, **attrs), feeds


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: c.name)
def test_ms_attention(case):
    model, feeds = _attention_model(case)
    MAX_ERR[f"Attention/{case.name}"] = assert_lowers_exactly(model, feeds)


def test_ms_attention_refusals():
    model, _ = _attention_model(AttnCase("r"))
    model.graph.node[0].attribute.append(__import__("onnx").helper.make_attribute("do_rotary", 1))
    assert "do_rotary" in refusal(model)
    model, _ = _attention_model(AttnCase("r", past=2))
    model.graph.node[0].attribute.append(
        __import__("onnx").helper.make_attribute("past_present_share_buffer", 1)
    )
    assert "past_present_share_buffer" in refusal(model)
    model, _ = _attention_model(AttnCase("r", mask="lengths"))
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 3 * 2 + 2
    assert "[2B]" in refusal(model)


@dataclasses.dataclass(frozen=True)
class MhaCase:
    name: str
    form: str = "qkv"  # "qkv" | "packed_qkv" | "packed_kv" | "cross_bnsh"
    b: int = 2
    s: int = 3
    kv: int = 3
    heads: int = 4
    d: int = 8
    dv: int = 8
    bias: bool = False
    mask: str | None = None  # "2d" | "3d" | "lengths"
    attention_bias: bool = False
    past: int = 0
    unidirectional: int = 0
    scale: float | None = None


MHA_CASES = [
    MhaCase("self"),
    MhaCase("self_bias", bias=True),
    MhaCase("cross_len", kv=5, bias=True, mask="2d"),
    MhaCase("v_head_size", dv=16, bias=True),
    MhaCase("packed_qkv", form="packed_qkv", bias=True),
    MhaCase("packed_qkv_nobias", form="packed_qkv", unidirectional=1),
    MhaCase("packed_kv", form="packed_kv", kv=6, bias=True, mask="lengths"),
    MhaCase("cross_bnsh", form="cross_bnsh", kv=7, attention_bias=True),
    MhaCase("past", past=4, mask="2d", unidirectional=1, bias=True),
    MhaCase("past_single_token", s=1, kv=1, past=6, unidirectional=1),
    MhaCase("mask_3d", mask="3d", scale=0.5),
    MhaCase("ar_eq_heads", s=4, kv=4, heads=4, unidirectional=1),
    MhaCase("head_dim_eq_heads", d=4, dv=4, s=5, kv=5, mask="2d"),
]


def _mha_model(c: MhaCase):
    rng = np.random.default_rng(sum(map(ord, c.name)) + 1)
    total = c.past + c.kv
    hid, vhid = c.heads * c.d, c.heads * c.dv
    feeds: dict = {}
    inputs: list = []
    if c.form == "packed_qkv":
        feeds["query"] = rand(rng, c.b, c.s, c.heads, 3, c.d)
        inputs += [("query", F32, feeds["query"].shape), None, None]
    else:
        feeds["query"] = rand(rng, c.b, c.s, hid)
        inputs.append(("query", F32, feeds["query"].shape))
        if c.form == "packed_kv":
            feeds["key"] = rand(rng, c.b, c.kv, c.heads, 2, c.d)
            inputs += [("key", F32, feeds["key"].shape), None]
        elif c.form == "cross_bnsh":
            feeds["key"] = rand(rng, c.b, c.heads, c.kv, c.d)
            feeds["value"] = rand(rng, c.b, c.heads, c.kv, c.dv)
            inputs += [("key", F32, feeds["key"].shape), ("value", F32, feeds["value"].shape)]
        else:
            feeds["key"] = rand(rng, c.b, c.kv, hid)
            feeds["value"] = rand(rng, c.b, c.kv, vhid)
            inputs += [("key", F32, feeds["key"].shape), ("value", F32, feeds["value"].shape)]
    inits = {}
    if c.bias:
        inits["bias"] = rand(rng, 2 * hid + vhid)
    inputs.append(("bias", F32, None) if c.bias else None)
    if c.mask == "2d":
        mask = (rng.random((c.b, total)) > 0.3).astype(np.int32)
        mask[:, 0] = 1
    elif c.mask == "3d":
        mask = (rng.random((c.b, c.s, total)) > 0.3).astype(np.int32)
        mask[..., 0] = 1
    elif c.mask == "lengths":
        mask = np.array([total, 2][: c.b], np.int32)
    if c.mask:
        feeds["mask"] = mask
    inputs.append(("mask", I32, mask.shape) if c.mask else None)
    if c.attention_bias:
        feeds["attention_bias"] = rand(rng, 1, c.heads, c.s, total)
    inputs.append(("attention_bias", F32, (1, c.heads, c.s, total)) if c.attention_bias else None)
    if c.past:
        feeds["past_key"] = rand(rng, c.b, c.heads, c.past, c.d)
        feeds["past_value"] = rand(rng, c.b, c.heads, c.past, c.dv)
        inputs += [("past_key", F32, feeds["past_key"].shape), ("past_value", F32, feeds["past_value"].shape)]
    attrs: dict = {"num_heads": c.heads}
    for key in ("unidirectional", "scale"):
        if getattr(c, key):
            attrs[key] = getattr(c, key)
    outputs = ["y", "present_key" if c.past else None, "present_value" if c.past else None]
    return node_model("MultiHeadAttention", inputs, outputs, domain=MS, initializers=inits, **attrs), feeds


def _unpacked(c: MhaCase, feeds: dict) -> tuple[MhaCase, dict]:
    """The same attention with separate Q/K/V (onnxruntime's CPU kernel runs no packed form)."""
    feeds = dict(feeds)
    if c.form == "packed_qkv":
        q, k, v = (feeds["query"][:, :, :, i, :].reshape(c.b, c.s, -1) for i in range(3))
        feeds.update(query=q, key=k, value=v)
    else:
        k, v = (feeds["key"][:, :, :, i, :].reshape(c.b, c.kv, -1) for i in range(2))
        feeds.update(key=k, value=v)
    return dataclasses.replace(c, form="qkv"), feeds


@pytest.mark.parametrize("case", MHA_CASES, ids=lambda c: c.name)
def test_multi_head_attention(case):
    model, feeds = _mha_model(case)
    if case.form.startswith("packed"):
        reference, ref_feeds = _unpacked(case, feeds)
        ref_model = _mha_model(reference)[0]
        del ref_model.graph.initializer[:]
        ref_model.graph.initializer.extend(model.graph.initializer)  # the same bias
        expected = run_ort(ref_model, ref_feeds)
        MAX_ERR[f"MultiHeadAttention/{case.name}"] = assert_lowered_matches(model, feeds, expected)
    else:
        MAX_ERR[f"MultiHeadAttention/{case.name}"] = assert_lowers_exactly(model, feeds)
