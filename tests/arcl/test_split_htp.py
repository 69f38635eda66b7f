"""Graphs already converted by mha2sha: split per head, and with the HTP layout (BD1L Conv 1x1).

The AR/CL rewrite runs on the converted graph (per-head Slice/Split of the KV cache after the
append, Conv 1x1 on ``[B, C, 1, S]``, rank <= 4 reshapes) and each variant must pass the token
loop against the converted graph, which ``convert`` proved equal to the original.
"""

from __future__ import annotations

import pytest

from mha2sha import zoo
from mha2sha.cli import main as cli
from tests.arcl._helpers import build

CASES = ["prepared_llama_gqa_step", "llama_gqa_step", "qwen3_step", "gpt2_step"]


@pytest.mark.parametrize("target", ["generic", "htp"])
@pytest.mark.parametrize("case", CASES)
def test_converted_graph(case, target, tmp_path):
    info = zoo.CASES[case]
    converted = tmp_path / "sha"
    assert cli(["convert", str(zoo.build(case)), "-o", str(converted), "--target", target]) == 0
    source = converted / "model.onnx"
    record = build(source, [1, info.heads], 24, tmp_path / "ar")
    assert len(record.variants) == 2
