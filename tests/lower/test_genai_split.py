"""GroupQueryAttention decoders shaped like onnxruntime-genai's builder: lowered exactly, then split."""

from __future__ import annotations

import pytest

from tests.lower._genai import GenaiSpec, genai_decoder, genai_feeds
from tests.lower._util import assert_same, convert_and_check, lower, run_ort
from tests.lower.test_gqa import resident

SPECS = {
    "step": GenaiSpec(),
    "packed_qkv_bias": GenaiSpec(packed_qkv=True, qkv_bias=True),
    "interleaved_window_softcap": GenaiSpec(interleaved=True, window=3, softcap=30.0),
    "prompt": GenaiSpec(past=0, seq=6),
    "batch2_token": GenaiSpec(batch=2, seq=1),
    "mqa_token": GenaiSpec(seq=1, past=9, kv_heads=1),
    "standard_rmsnorm_opset23": GenaiSpec(ops="standard"),
    "shared_buffer_token": GenaiSpec(seq=1, past=12, total=7),  # max-length past buffer, 7 tokens valid
    "window_cache_token": GenaiSpec(seq=1, past=6, total=10, window=4, sliding_cache=True),
}


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_genai_gqa_decoder(tmp_path, spec):
    model = genai_decoder(spec)
    feeds = genai_feeds(spec)
    lowered, record = lower(model)
    assert not record.refused
    assert all(n.domain in ("", "ai.onnx") for n in lowered.graph.node)
    if spec.batch == 1 and spec.past:  # positions known from the graph: no index math, present sliced
        index_math = {"GatherElements", "Where", "Less", "Max", "Min"} & {n.op_type for n in lowered.graph.node}
        assert not index_math, index_math
    expected, got = run_ort(model, feeds), run_ort(lowered, feeds)
    if spec.sliding_cache:  # rows past the resident count are unspecified in a window cache
        kept = resident(spec.total_len, spec.past, spec.window)
        for name in expected:
            if name.startswith("present"):
                expected[name][:, :, kept:] = got[name][:, :, kept:] = 0
    assert_same(model, expected, got)
    report = convert_and_check(lowered, tmp_path, blocks=spec.layers)
    for block in report["blocks"]:
        assert (block["heads"], block["kv_heads"]) == (spec.heads, spec.kv_heads)
