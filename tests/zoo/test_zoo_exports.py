"""Every zoo case must export, run in onnxruntime, and match PyTorch.

The converter's equivalence tests trust the zoo, so this checks the zoo itself: exported graphs
are static, use eager (unfused) attention, keep descriptive I/O names, and reproduce the torch
model on inputs other than the ones they were traced with. The SDPA variants are checked the same
way, with the ONNX ``Attention`` op expected at opset 23.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

for _mod in ("torch", "transformers", "peft", "diffusers"):
    pytest.importorskip(_mod)

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from mha2sha import zoo  # noqa: E402

RTOL = ATOL = 1e-4
FUSED_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "SkipLayerNormalization"}


def _params() -> list:
    params = []
    for case, info in zoo.CASES.items():
        for exporter in zoo.EXPORTERS:
            marks = []
            if exporter not in info.exporters:
                marks.append(pytest.mark.skip(reason=f"{exporter} unsupported: {info.notes}"))
            params.append(pytest.param(case, exporter, id=f"{case}-{exporter}", marks=marks))
    return params


@pytest.mark.parametrize(("case", "exporter"), _params())
def test_export_matches_torch(case: str, exporter: str) -> None:
    path = zoo.build(case, exporter)
    ops = _static_ops(path)
    assert "Softmax" in ops, "attention should be exported as primitive ops"
    assert not ops & FUSED_ATTENTION_OPS
    _check_against_torch(case, exporter, path)


def _variant_params() -> list:
    return [
        pytest.param(case, exporter, id=f"{case}-{exporter}")
        for case, info in zoo.VARIANTS.items()
        for exporter in info.exporters
    ]


@pytest.mark.parametrize(("case", "exporter"), _variant_params())
def test_variant_export_matches_torch(case: str, exporter: str) -> None:
    """SDPA variants: decomposed to MatMul/Softmax below opset 23, one ONNX ``Attention`` op at 23."""
    path = zoo.build(case, exporter)
    ops = _static_ops(path)
    if exporter == "dynamo23":
        assert "Attention" in ops and "Softmax" not in ops, sorted(ops)
    else:
        assert "Softmax" in ops and not ops & FUSED_ATTENTION_OPS, sorted(ops)
    _check_against_torch(case, exporter, path)


def _static_ops(path: Path) -> set[str]:
    model = onnx.load(str(path))
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), f"{value.name} has a dynamic dim"
    return {node.op_type for node in model.graph.node}


def _check_against_torch(case: str, exporter: str, path: Path) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected_inputs = list(zoo.example_inputs(case))
    assert [i.name for i in session.get_inputs()] == expected_inputs
    output_names = [o.name for o in session.get_outputs()]

    for seed in (None, 1):  # traced inputs, then fresh ones (catches values baked into the graph)
        inputs = zoo.example_inputs(case, seed=seed)
        got = dict(zip(output_names, session.run(None, inputs), strict=True))
        want = zoo.torch_reference(case, inputs)
        assert list(got) == list(want)
        for name, ref in want.items():
            np.testing.assert_allclose(
                got[name], ref, rtol=RTOL, atol=ATOL, err_msg=f"{case}/{exporter}/{name}"
            )


def test_case_metadata() -> None:
    assert zoo.available_cases() == list(zoo.CASES)
    for name, info in zoo.CASES.items():
        assert info.name == name
        assert info.heads % info.kv_heads == 0
        assert set(info.exporters) <= set(zoo.EXPORTERS)
        if info.kind in ("step", "prepared_step"):
            assert info.past_len > 0
        assert info.attn_implementation == "eager"
    assert not set(zoo.VARIANTS) & set(zoo.CASES)
    for name, info in zoo.VARIANTS.items():
        assert info.name == name and name.endswith("_sdpa")
        assert info.attn_implementation == "sdpa"
        assert info.exporters and set(info.exporters) <= set(zoo.ALL_EXPORTERS)
    assert zoo.available_variants("dynamo23")


def test_step_present_is_concat_of_past() -> None:
    """HF step graphs return present = concat(past, new) along the sequence axis."""
    inputs = zoo.example_inputs("llama_gqa_step")
    out = zoo.torch_reference("llama_gqa_step", inputs)
    past = inputs["past_key_0"]
    np.testing.assert_array_equal(out["present_key_0"][:, :, : past.shape[2]], past)


def test_prepared_matches_hf_llama() -> None:
    """The hand-written prepared graph computes what the HF Llama does on the same cache."""
    import torch

    from mha2sha.zoo import decoders, prepared

    for ar in (3, 1):
        built = prepared.build_prepared(ar)
        feeds = built.inputs
        past = prepared.CONTEXT - ar
        step = decoders.CausalLMStep(decoders.make_causal_lm(decoders.SPECS["llama_gqa"]), 2, True).eval()
        mask_2d = (feeds["attention_mask"][0, 0, -1] == 0).long()[None]
        args = [feeds["input_ids"], mask_2d, torch.arange(past, past + ar)[None]]
        for layer in range(2):
            args += [feeds[f"past_key_{layer}_in"].transpose(2, 3), feeds[f"past_value_{layer}_in"]]
        with torch.no_grad():
            hf = step(*args)
            ours = built.module(*feeds.values())
        torch.testing.assert_close(ours[0], hf[0], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ours[1].transpose(2, 3), hf[1][:, :, -ar:], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ours[2], hf[2][:, :, -ar:], rtol=RTOL, atol=ATOL)


def test_concurrent_builds_share_one_export(tmp_path: Path) -> None:
    """Two processes racing on an empty cache both get the same complete file, built once."""
    env = {**os.environ, "MHA2SHA_CACHE": str(tmp_path)}
    code = "from mha2sha import zoo; print(zoo.build('vit'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    paths = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert paths[0] == paths[1]
    onnx.checker.check_model(paths[0])
    entries = [e.name for e in (tmp_path / "zoo").iterdir() if not e.name.startswith(".")]
    assert len(entries) == 1, entries  # one published export
    assert not list((tmp_path / "zoo").glob(".*.*")), "temp dir left behind"
