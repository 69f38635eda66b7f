"""A rewritten graph computes what a re-export of the same model at that AR / CL computes.

The zoo exports any step or prefill case at another AR / CL with the same weights
(``zoo.build(case, ar=, cl=)``). Both graphs get the same realistic inputs (generated for the
re-export: causal mask, positions after the past, RoPE of real positions, normal KV cache) and
every output must agree to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

from mha2sha import zoo
from mha2sha.arcl.build import BuildArOptions, build_ar
from mha2sha.io.load import load_model
from mha2sha.verify.inputs import make_inputs
from mha2sha.verify.runner import run_model
from tests.arcl._helpers import RTOL

CASES = [
    # (case, exporter, ar, cl)
    ("llama_gqa_step", "torchscript", 1, None),
    ("llama_gqa_step", "torchscript", 8, 24),
    ("llama_gqa_step", "dynamo", 1, 24),
    ("prepared_llama_gqa_step", "torchscript", 1, 24),
    ("prepared_llama_gqa_step", "dynamo", 8, None),
    ("gpt2_step", "torchscript", 4, 21),
    ("opt_step", "torchscript", 1, 20),
    ("bloom_step", "torchscript", 4, None),
    ("falcon_step", "torchscript", 1, 24),
    ("gemma2_step", "torchscript", 4, 24),
    ("phi3_step", "dynamo", 1, None),
    ("llama_prefill", "torchscript", 4, None),
    ("gpt2_prefill", "dynamo", 1, None),
]


@pytest.mark.parametrize(
    ("case", "exporter", "ar", "cl"), CASES, ids=[f"{c}-{e}-ar{a}-cl{n}" for c, e, a, n in CASES]
)
def test_rewrite_equals_reexport(case, exporter, ar, cl, tmp_path):
    info = zoo.CASES[case]
    new_cl = cl or (info.seq_len + info.past_len if info.past_len else ar)
    record = build_ar(zoo.build(case, exporter), [ar], cl, tmp_path, options=BuildArOptions(verify="none"))
    rewritten = record.variants[0].path
    reexport = zoo.build(case, exporter, ar=ar, cl=new_cl)

    ours, theirs = load_model(rewritten), load_model(reexport)
    shapes = lambda m: {v.name: list(v.shape) for v in (*m.graph.inputs, *m.graph.outputs)}  # noqa: E731
    assert shapes(ours) == shapes(theirs)

    inputs = make_inputs(theirs, seed=3)
    expected, got = run_model(reexport, inputs), run_model(rewritten, inputs)
    assert list(got) == list(expected)
    for name, ref in expected.items():
        ref64 = ref.astype(np.float64)
        rel = np.abs(got[name].astype(np.float64) - ref64).max() / max(np.abs(ref64).max(), 1e-30)
        assert rel <= RTOL, f"{name}: max rel err {rel:.3g}"
