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
