"""Every zoo decoder: AR 1, AR = its head count and a new context length, proven by the token loop.

Each variant is written by ``build_ar`` (one shared weights file) and driven through the real token
loop next to the original: the same prompt in chunks of AR, the KV cache carried as the graph's I/O
contract says; every token's logits and the final cache agree to 1e-5 (``tests/arcl/_helpers.py``).
"""

from __future__ import annotations

import pytest

from mha2sha import zoo
from tests.arcl._helpers import PREFILL_CASES, STEP_CASES, build, context

NEW_CL = 24  # > every zoo step's CL (17-19), < every position table (64)


@pytest.mark.parametrize("case", STEP_CASES)
def test_step_ar1_and_heads(case, tmp_path):
    info = zoo.CASES[case]
    ars = sorted({1, info.heads} - {info.seq_len}) or [info.heads + 1]
    record = build(zoo.build(case), ars, None, tmp_path)
    assert [v.ar for v in record.variants] == ars
    assert all(v.cl == context(case) for v in record.variants)
    assert all(
        r.steps == -(-r.tokens // v.ar) for r, v in zip(record.verification, record.variants, strict=True)
    )


@pytest.mark.parametrize("case", STEP_CASES)
def test_step_new_context_length(case, tmp_path):
    info = zoo.CASES[case]
    record = build(zoo.build(case), [info.seq_len, 1] if info.seq_len != 1 else [1, 2], NEW_CL, tmp_path)
    for variant in record.variants:
        past = [shape for name, shape in variant.inputs.items() if name.startswith("past")]
        assert past and all(NEW_CL - variant.ar in shape for shape in past), variant.inputs


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_ar(case, tmp_path):
    info = zoo.CASES[case]
    record = build(zoo.build(case), [1, info.heads], None, tmp_path)
    assert [v.cl for v in record.variants] == [1, info.heads]  # a prefill graph's CL is its AR


@pytest.mark.parametrize("case", STEP_CASES + PREFILL_CASES)
def test_dynamo_exports(case, tmp_path):
    """torch.export graphs fold the mask arithmetic into tables (causal bool, GatherND indices)."""
    info = zoo.CASES[case]
    cl = None if info.kind == "prefill" else NEW_CL
    ars = sorted({1, info.heads})
    build(zoo.build(case, "dynamo"), ars, cl, tmp_path)
