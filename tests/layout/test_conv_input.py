"""Graphs whose projections already are Conv 1x1 (the old tool's --mha-conv / --nchw-aligned inputs)
are recognised without flags and split into the per-head Conv pattern: each head's Conv gets its
rows of the Conv weight."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from mha2sha import zoo
from mha2sha.api import ConvertOptions, convert
from mha2sha.io.prepare import prepare_for_split
from mha2sha.io.save import save_model
from mha2sha.layout import apply_htp_layout
from mha2sha.verify.runner import run_model


@pytest.mark.parametrize(
    "case", ["prepared_llama_gqa_step", "llama_gqa_step", "bert", "phi3_step", "clip_vision"]
)
def test_conv_mha_is_split_per_head(case: str, tmp_path) -> None:
    mha = ir.load(zoo.build(case))
    prepare_for_split(mha)
    assert apply_htp_layout(mha).conv
    source = tmp_path / "conv_mha.onnx"
    save_model(mha, source)

    result = convert(source, tmp_path / "out", options=ConvertOptions(verify=False))
    assert result.complete and {b.heads for b in result.blocks} == {zoo.CASES[case].heads}
    assert all(not b.activations for b in result.blocks)  # every head comes from sliced Conv weights
    conv_weights = {n.inputs[1].name for n in mha.graph if n.op_type == "Conv"}
    sliced = [t for t in result.record.tensors.values() if t.kind == "param" and t.original in conv_weights]
    assert sliced and all(p.ranges[0][0] == 0 for t in sliced for p in t.pieces)  # output-channel rows

    inputs = zoo.example_inputs(case)
    expected, got = run_model(source, inputs), run_model(tmp_path / "out" / "conv_mha.onnx", inputs)
    for name, ref in expected.items():
        assert np.abs(got[name] - ref).max() <= 1e-5 * np.abs(ref).max(), name
