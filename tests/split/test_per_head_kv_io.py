"""--per-head-kv-io: past/present KV become one input/output per head, and still match the original."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from mha2sha import zoo
from mha2sha.api import ConvertOptions, convert
from mha2sha.verify.runner import run_model


@pytest.mark.parametrize("case", ["llama_gqa_step", "prepared_llama_gqa_step"])
def test_per_head_kv_io(case: str, tmp_path) -> None:
    info = zoo.CASES[case]
    source = zoo.build(case)
    result = convert(source, tmp_path, options=ConvertOptions(per_head_kv_io=True, create_input_lists=True))
    assert result.verification is not None and result.verification.ok

    model = ir.load(tmp_path / f"{source.stem}.onnx")
    original = ir.load(source)
    past = [v.name for v in original.graph.inputs if "past" in v.name]
    new_inputs = {v.name: tuple(v.shape) for v in model.graph.inputs}
    for name in past:
        assert name not in new_inputs
        pieces = [f"{name}.h{j}" for j in range(info.kv_heads)]
        assert all(new_inputs[p][1] == 1 for p in pieces)

    # independent check: feed the per-head pieces, join the per-head outputs
    inputs = zoo.example_inputs(case)
    feeds = {k: v for k, v in inputs.items() if k not in past}
    for name in past:
        feeds.update({f"{name}.h{j}": inputs[name][:, j : j + 1] for j in range(info.kv_heads)})
    got = run_model(tmp_path / f"{source.stem}.onnx", feeds)
    expected = run_model(source, inputs)
    for name, ref in expected.items():
        if name not in got:
            got[name] = np.concatenate([got[f"{name}.h{j}"] for j in range(info.kv_heads)], axis=1)
        assert np.abs(got[name] - ref).max() <= 1e-5 * np.abs(ref).max(), name
    listed = (tmp_path / "input_list.txt").read_text().split()
    assert [entry.split(":=")[0] for entry in listed] == list(new_inputs)
    assert all(Path(entry.split(":=")[1]).is_file() for entry in listed)
