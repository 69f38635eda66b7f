"""com.microsoft.GroupQueryAttention (as onnxruntime-genai's builder writes it) lowered to primitives."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.lower._util import F32, MS, assert_lowers_exactly, node_model, rand, refusal

I32 = TensorProto.INT32
MAX_POS = 32
MAX_ERR: dict[str, float] = {}


@dataclasses.dataclass(frozen=True)
class GqaCase:
    name: str
    b: int = 1
    s: int = 1
    past: int = 6
    heads: int = 4
    kv_heads: int = 2
    d: int = 16
    seqlens: tuple[int, ...] | None = None  # default: every row full (past + s - 1)
    total: int | None = None
    rope: str | None = None  # "half" | "interleaved"
    rotary_half: int | None = None  # cos/sin cache width (partial rotary when < d / 2)
    packed: bool = False
    present_len: int | None = None  # declared static present length (shared buffer when == past)
    attrs: tuple[tuple[str, object], ...] = ()
    head_sink: bool = False
    empty_past: bool = False  # genai's first prompt: past inputs of length 0
    sliding: bool = False  # sliding_window_cache: the past is a window cache of capacity `past`


CASES = [
    GqaCase("prompt", s=5, past=0, seqlens=(4,), total=5),
    GqaCase("prompt_empty_past", s=5, past=0, empty_past=True, seqlens=(4,), total=5, rope="half"),
    GqaCase("token", s=1, past=6),
    GqaCase("chunk", s=3, past=4),
    GqaCase("mqa_token", kv_heads=1, s=1, past=5, rope="half"),
    GqaCase("batch_token_ragged", b=2, s=1, past=5, seqlens=(5, 3), total=6, rope="half"),
    GqaCase("batch_prompt_padded", b=2, s=5, past=0, seqlens=(4, 2), total=5, rope="half"),
    GqaCase("short_sequence_in_long_cache", s=1, past=6, seqlens=(4,), total=7),
    GqaCase("window_token", s=1, past=6, attrs=(("local_window_size", 3),)),
    GqaCase("window_prompt", s=6, past=0, seqlens=(5,), total=6, attrs=(("local_window_size", 2),)),
    GqaCase(
        "window_chunk_ragged_past", s=3, past=5, seqlens=(6,), total=8, attrs=(("local_window_size", 2),)
    ),
    GqaCase("softcap_scale", s=3, past=4, attrs=(("softcap", 1.5), ("scale", 0.3))),
    GqaCase("smooth_softmax", s=3, past=4, attrs=(("smooth_softmax", 1),)),
    GqaCase("head_sink", s=2, past=4, head_sink=True),
    GqaCase("rope_prompt", s=5, past=0, seqlens=(4,), total=5, rope="half"),
    GqaCase("rope_token", s=1, past=6, rope="half"),
    GqaCase("rope_chunk_interleaved", s=3, past=4, rope="interleaved"),
    GqaCase("rope_partial", s=2, past=4, d=32, rope="half", rotary_half=8),
    GqaCase("rope_partial_interleaved", s=1, past=4, d=32, rope="interleaved", rotary_half=8),
    GqaCase("packed_qkv_rope", s=3, past=4, packed=True, rope="half"),
    GqaCase("packed_qkv_prompt", s=4, past=0, seqlens=(3,), total=4, packed=True, rope="interleaved"),
    GqaCase("shared_buffer_token", s=1, past=8, seqlens=(4,), total=5, present_len=8, rope="half"),
    GqaCase("shared_buffer_prompt", s=3, past=8, seqlens=(2,), total=3, present_len=8),
    GqaCase("bidirectional", s=3, past=4, attrs=(("causal", 0),)),
    GqaCase("ar_eq_heads", s=4, past=3, heads=4, kv_heads=2, rope="half"),
    GqaCase("head_dim_eq_heads", s=2, past=3, heads=8, kv_heads=2, d=8),
    # sliding_window_cache (genai's CPU default for sliding-window layers): capacity 6, window 4
    *(
        GqaCase(
            f"window_cache_s{s}_c{c}_w{w}_t{t}",
            s=s,
            past=c,
            seqlens=(t - 1,),
            total=t,
            sliding=True,
            attrs=(("local_window_size", w),),
        )
        for s, c, w, t in [
            (1, 6, 4, 5),
            (1, 6, 4, 7),
            (1, 6, 4, 10),
            (3, 6, 4, 9),
            (1, 4, 4, 9),
            (3, 8, 4, 5),
            (5, 6, 3, 12),
        ]
    ),
    GqaCase(
        "window_cache_rope_batch",
        b=2,
        s=1,
        past=6,
        seqlens=(9, 4),
        total=10,
        sliding=True,
        rope="half",
        attrs=(("local_window_size", 4),),
    ),
]


def resident(total: int, capacity: int, window: int) -> int:
    """Rows a window cache holds after ``total`` tokens (the schema's L(T))."""
    g = capacity - window + 1
    return total if total <= capacity else total - g * -(-(total - capacity) // g)


def _model_and_feeds(c: GqaCase):
    rng = np.random.default_rng(sum(map(ord, c.name)))
    hidden, kv_hidden = c.heads * c.d, c.kv_heads * c.d
    feeds: dict = {}
    if c.packed:
        feeds["query"] = rand(rng, c.b, c.s, hidden + 2 * kv_hidden)
        inputs: list = [("query", F32, feeds["query"].shape), None, None]
    else:
        feeds.update(query=rand(rng, c.b, c.s, hidden), key=rand(rng, c.b, c.s, kv_hidden))
        feeds["value"] = rand(rng, c.b, c.s, kv_hidden)
        inputs = [(n, F32, feeds[n].shape) for n in ("query", "key", "value")]
    if c.past or c.empty_past:
        shape = (c.b, c.kv_heads, c.past, c.d)
        feeds["past_key"], feeds["past_value"] = rand(rng, *shape), rand(rng, *shape)
        inputs += [("past_key", F32, shape), ("past_value", F32, shape)]
    else:
        inputs += [None, None]
    total = c.total if c.total is not None else c.past + c.s
    seqlens = c.seqlens if c.seqlens is not None else (total - 1,) * c.b
    feeds["seqlens_k"] = np.array(seqlens, np.int32)
    feeds["total_sequence_length"] = np.array(total, np.int32)
    inputs += [("seqlens_k", I32, (c.b,)), ("total_sequence_length", I32, ())]
    inits = {}
    attrs = dict(c.attrs)
    if c.rope:
        half = c.rotary_half or c.d // 2
        angles = rng.uniform(0, 6.3, size=(MAX_POS, half))
        inits["cos_cache"], inits["sin_cache"] = (
            np.cos(angles).astype(np.float32),
            np.sin(angles).astype(np.float32),
        )
        inputs += [("cos_cache", F32, None), ("sin_cache", F32, None)]
        attrs.update(do_rotary=1, rotary_interleaved=int(c.rope == "interleaved"))
    elif c.head_sink:
        inputs += [None, None]
    if c.head_sink:
        inputs += [None, None, ("head_sink", F32, (c.heads,))]
        inits["head_sink"] = rand(rng, c.heads)
    present = c.present_len if c.present_len is not None else c.past + c.s
    if c.sliding:
        attrs["sliding_window_cache"] = 1
    shapes = (
        {n: (c.b, c.kv_heads, present, c.d) for n in ("present_key", "present_value")}
        if c.present_len
        else None
    )
    model = node_model(
        "GroupQueryAttention",
        inputs,
        ["output", "present_key", "present_value"],
        domain=MS,
        initializers=inits,
        output_shapes=shapes,
        name="/model/layers.0/attn/GroupQueryAttention",
        num_heads=c.heads,
        kv_num_heads=c.kv_heads,
        **attrs,
    )
    rows = None
    if c.seqlens is not None and c.past == 0 and any(n + 1 < c.s for n in seqlens):
        valid = np.arange(c.s)[None, :] <= np.array(seqlens)[:, None]  # right-padded prompt rows
        rows = {"output": valid[:, :, None]}
    if c.sliding:  # cache rows past the resident count are unspecified
        window = dict(c.attrs)["local_window_size"]
        kept = np.array([resident(n + 1, c.past, window) for n in seqlens])
        valid = (np.arange(c.past)[None, :] < kept[:, None])[:, None, :, None]
        rows = {"present_key": valid, "present_value": valid}
    return model, feeds, rows


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gqa_lowers_exactly(case):
    model, feeds, rows = _model_and_feeds(case)
    MAX_ERR[case.name] = assert_lowers_exactly(model, feeds, row_mask=rows)


@pytest.mark.parametrize(
    ("what", "edit"),
    [
        ("position_ids", lambda n: n.input.append("position_ids")),
        ("output_qk", lambda n: n.output.append("qk")),
        (
            "sliding_window_cache",
            lambda n: n.attribute.append(helper.make_attribute("sliding_window_cache", 1)),
        ),
    ],
)
def test_gqa_refusals(what, edit):
    model, _, _ = _model_and_feeds(GqaCase("r", rope="half"))
    edit(model.graph.node[0])
    if what == "position_ids":
        model.graph.input.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, (1, 1)))
    if what == "output_qk":
        model.graph.output.append(helper.make_tensor_value_info("qk", F32, None))
    assert what in refusal(model)


@pytest.mark.parametrize("case", [CASES[3], CASES[14]], ids=lambda c: c.name)
def test_gqa_float16(case):
    """fp16 graphs are lowered in fp16 arithmetic; onnxruntime's kernel accumulates in fp32, so the
    outputs agree to fp16 precision (~5e-4 observed), not to 1e-5."""
    from onnx import numpy_helper

    model, feeds, rows = _model_and_feeds(case)
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    assert_lowers_exactly(model, feeds, rtol=2e-3, row_mask=rows)
