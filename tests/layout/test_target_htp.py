"""--target htp end to end: split + Conv 1x1 layout + encodings remapped, proven on CPU QDQ and on the
HTP emulator (CPU fallback disabled) against the quantized MHA model."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from mha2sha import zoo
from mha2sha.api import ConvertOptions, convert
from mha2sha.verify.htp import htp_available
from tests.encodings.aimet_gen import aimet_encodings


@pytest.mark.skipif(not htp_available(), reason="onnxruntime-qnn is not installed (make test installs it)")
@pytest.mark.parametrize("case", ["prepared_llama_gqa_step", "llama_gqa_step"])
def test_target_htp_with_aimet_encodings(case: str, tmp_path) -> None:
    calibration = [zoo.example_inputs(case), zoo.example_inputs(case, seed=1)]
    model, encodings = aimet_encodings(zoo.build(case), calibration, config="w8a16", version="2.0.0")
    options = ConvertOptions(
        encodings=str(encodings), htp_layout=True, verify_htp=True, strict_encodings=True
    )
    result = convert(model, tmp_path, options=options)

    assert result.verification is not None and result.verification.ok
    assert result.qdq_lsb is not None and max(result.qdq_lsb.values()) == 0.0
    assert result.htp is not None and result.htp.sha_on_htp_only and not result.htp.sha_unsupported
    assert not result.htp.cpu_fallback_used and max(result.htp.max_lsb.values()) == 0.0
    assert result.layout is not None and result.layout.conv

    sha = ir.load(tmp_path / "model.onnx")
    weight_matmuls = [
        n
        for n in sha.graph
        if n.op_type == "MatMul" and n.inputs[1] is not None and n.inputs[1].is_initializer()
    ]
    assert not weight_matmuls  # every projection with a weight is a Conv now
    assert all(len(n.inputs[1].shape) == 4 for n in sha.graph if n.op_type == "Conv")


@pytest.mark.parametrize("case", ["llama_gqa_step", "bert"])
def test_layout_alone_keeps_heads_and_encodings(case: str, tmp_path) -> None:
    """--no-split --replace-linear-with-conv: only the layout passes run. Attention stays multi-head,
    every projection becomes a Conv 1x1, and the quantized model still equals the original."""
    calibration = [zoo.example_inputs(case), zoo.example_inputs(case, seed=1)]
    model, encodings = aimet_encodings(zoo.build(case), calibration, config="w8a16", version="1.0.0")
    options = ConvertOptions(
        encodings=str(encodings), htp_layout=True, split_heads=False, strict_encodings=True
    )
    result = convert(model, tmp_path, options=options)

    assert result.blocks == [] and result.record.tensors == {}
    assert result.verification is not None and result.verification.ok
    assert result.qdq_lsb is not None and max(result.qdq_lsb.values()) <= 1.0
    assert result.layout is not None and result.layout.conv
    original, converted = ir.load(model), ir.load(tmp_path / "model.onnx")
    softmaxes = [sum(n.op_type == "Softmax" for n in m.graph) for m in (original, converted)]
    assert softmaxes[0] == softmaxes[1] > 0  # still one Softmax per attention block
    assert not [
        n for n in converted.graph if n.op_type in ("MatMul", "Gemm") and n.inputs[1].is_initializer()
    ]


def test_no_split_needs_a_layout_pass(tmp_path) -> None:
    from mha2sha.cli import main

    assert main(["convert", str(zoo.build("bert")), "-o", str(tmp_path / "out"), "--no-split"]) == 2
    assert not (tmp_path / "out").exists()
