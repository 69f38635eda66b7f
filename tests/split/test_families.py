"""Every model family of the zoo, both exporters: the split model computes what the original did.

Each case is exported once (cached, see :mod:`mha2sha.zoo`), converted without the converter's own
verification, then compared here independently on the zoo's realistic inputs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from mha2sha import zoo
from mha2sha.api import ConvertOptions, convert
from mha2sha.verify.runner import run_model

RTOL = 1e-5

PAIRS = [(case, exporter) for case in zoo.available_cases() for exporter in zoo.CASES[case].exporters]


def _head_dims(shape: ir.Shape) -> list[int]:
    """The axes that hold heads at an attention core: [B,H,S,T] -> H, [B*H,S,T] -> B*H."""
    dims = [int(d) for d in shape]
    return dims[1:-2] if len(dims) >= 4 else dims[:1]


@pytest.mark.parametrize(("case", "exporter"), PAIRS, ids=[f"{c}-{e}" for c, e in PAIRS])
def test_split_matches_original(case: str, exporter: str, tmp_path) -> None:
    info = zoo.CASES[case]
    source = zoo.build(case, exporter)
    result = convert(source, tmp_path, options=ConvertOptions(verify=False))

    assert result.split_blocks and result.complete, [b.reason for b in result.unsupported_blocks]
    assert {b.heads for b in result.blocks} == {info.heads}
    self_attention_kv = {b.kv_heads for b in result.blocks} - {info.heads}
    assert self_attention_kv <= {info.kv_heads}

    converted = tmp_path / f"{source.stem}.onnx"
    inputs = zoo.example_inputs(case)
    expected, got = run_model(source, inputs), run_model(converted, inputs)
    assert list(got) == list(expected)
    for name, ref in expected.items():
        assert got[name].shape == ref.shape, name
        rel = np.abs(got[name].astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30)
        assert rel <= RTOL, f"{name}: max rel err {rel:.3g}"

    model = ir.load(converted)
    softmaxes = [n for n in model.graph if n.op_type == "Softmax"]
    assert len(softmaxes) == sum(b.heads for b in result.blocks)
    for node in softmaxes:  # one head per Softmax and per attention MatMul
        assert all(d == 1 for d in _head_dims(node.inputs[0].shape)), node.name
        for user in node.outputs[0].consumers():
            if user.op_type == "MatMul":
                assert all(d == 1 for d in _head_dims(user.outputs[0].shape)), user.name
