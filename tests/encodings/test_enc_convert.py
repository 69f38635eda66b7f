"""End to end with real AIMET encodings: the quantized SHA model computes what the quantized MHA
model computes (QDQ on onnxruntime CPU), in every encodings version, for two quantization configs."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

from mha2sha import zoo
from mha2sha.api import ConvertOptions, convert
from mha2sha.encodings import load_encodings
from tests.encodings.aimet_gen import aimet_encodings

CASES = ["llama_gqa_step", "qwen3_step", "phi3_step", "bert", "clip_vision", "prepared_llama_gqa_step"]
CONFIGS = ["w8a16", "w8a8"]
VERSIONS = ["0.6.1", "1.0.0", "2.0.0"]


def _calibration(case: str) -> list[dict]:
    return [zoo.example_inputs(case), zoo.example_inputs(case, seed=1)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("case", CASES)
def test_quantized_split_is_bit_exact(case: str, config: str, version: str, tmp_path) -> None:
    model_path, enc_path = aimet_encodings(
        zoo.build(case), _calibration(case), config=config, version=version
    )
    out = tmp_path / "out"
    result = convert(
        model_path,
        out,
        options=ConvertOptions(encodings=str(enc_path), inputs=None, strict_encodings=True),
    )
    assert result.verification is not None and result.verification.ok
    assert result.qdq_lsb is not None and set(result.qdq_lsb) == {
        v.name for v in ir.load(model_path).graph.outputs
    }
    assert max(result.qdq_lsb.values()) == 0.0, result.qdq_lsb  # bit-exact, not merely within 1 LSB
    assert result.coverage is not None and result.coverage.ok

    written = out / "model.encodings"
    assert json.loads(written.read_text())["version"] == version
    sha = ir.load(out / "model.onnx")
    names = {v.name for v in sha.graph.inputs} | set(sha.graph.initializers)
    names |= {o.name for node in sha.graph for o in node.outputs}
    encoded = load_encodings(written, model=sha)
    assert set(encoded.names()) <= names  # every encoding names a tensor of the output model
    # every per-head weight of a quantized MHA weight is encoded
    mha = load_encodings(enc_path, model=ir.load(model_path))
    for original, split in result.record.tensors.items():
        if split.kind == "param" and mha.get(original) is not None:
            assert all(encoded.get(p.name) is not None for p in split.pieces), original
