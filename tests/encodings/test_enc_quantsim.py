"""aimet-onnx as a second, independent judge of quantized equivalence.

For each case the MHA model is calibrated by aimet-onnx (``aimet_gen``, cached), converted with its
encodings, and then AIMET's own ``QuantizationSimModel`` is built for the MHA model and for the SHA
model under the same config, each with its encodings loaded by ``load_encodings_to_sim``: AIMET
decides where the quantizers sit, not our QDQ builder. Their outputs must agree (0 quantization
steps, at most 1 allowed), and so must our own QDQ check.

Configs (``aimet_gen.CONFIGS``): ``w8a16`` (AIMET's HTP config: data movement unquantized),
``w8a8`` (AIMET's default config, which in aimet-onnx 2.42 also leaves Slice/Expand outputs
unquantized) and ``w8a8_dm`` (W8A8 with every op output AIMET can quantize, data movement
included: Phi-3's packed-QKV Slice outputs and GQA's ``repeat_kv`` Expand outputs get encodings
of their own, different from their inputs'; the SHA model must requantise per head there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from mha2sha import zoo
from mha2sha.api import ConvertOptions, convert
from mha2sha.encodings import load_encodings
from mha2sha.verify.qdq import max_steps, output_lsb
from tests.encodings.aimet_gen import aimet_available, aimet_encodings, quantsim_run

pytestmark = pytest.mark.skipif(not aimet_available(), reason="aimet-onnx not installed")

# (case, config, encodings version, --target htp)
CASES = [
    ("phi3_step", "w8a8", "1.0.0", False),
    ("phi3_step", "w8a8_dm", "1.0.0", False),
    ("phi3_step", "w8a8_dm", "2.0.0", False),  # 2.x: AIMET cannot add a quantizer it did not place
    ("phi3_step", "w8a16", "1.0.0", False),
    ("llama_gqa_step", "w8a8_dm", "1.0.0", False),
    ("llama_gqa_step", "w8a16", "1.0.0", False),
    ("qwen3_step", "w8a8_dm", "1.0.0", False),
    ("gpt2_step", "w8a8_dm", "1.0.0", False),
    ("bert", "w8a8", "1.0.0", False),
    ("phi3_step", "w8a8_dm", "1.0.0", True),
    ("llama_gqa_step", "w8a8_dm", "1.0.0", True),
]

#: configs whose data-movement outputs carry encodings of their own: requantisation expected
_REQUANTISING = {("phi3_step", "w8a8_dm"), ("llama_gqa_step", "w8a8_dm"), ("qwen3_step", "w8a8_dm")}


def _feeds(case: str) -> list[dict[str, np.ndarray]]:
    return [zoo.example_inputs(case), zoo.example_inputs(case, seed=1)]


def _lsb_diff(mha: dict[str, np.ndarray], sha: dict[str, np.ndarray], encodings) -> dict[str, float]:
    out = {}
    for name, ref in mha.items():
        ref = np.asarray(ref, np.float64)
        lsb = output_lsb(encodings.get(name), ref.shape)
        out[name] = max_steps(ref, sha[name], lsb)
    return out


def _quantizers_added_on_copies(mismatches, sha: ir.Model, encodings) -> list[str]:
    """Tensors AIMET had to add a quantizer for whose encoding is not their input's (an AIMET
    placement the SHA numbers would depend on); empty when every extra encoding is a no-op."""
    producers = {o.name: n for n in sha.graph for o in n.outputs}
    bad = []
    for m in mismatches:
        if not m.enabled_mismatch or m.enabled_mismatch != (False, True):
            continue
        name = m.quantizer_name
        node = producers.get(name)
        enc = encodings.get(name)
        source = node.inputs[0].name if node is not None and node.inputs and node.inputs[0] else None
        src_enc = encodings.get(source) if source else None
        if enc is None or src_enc is None or not enc.same_numbers(src_enc):
            bad.append(name)
    return bad


@pytest.mark.parametrize(("case", "config", "version", "htp"), CASES)
def test_sha_quantsim_equals_mha_quantsim(case: str, config: str, version: str, htp: bool, tmp_path) -> None:
    feeds = _feeds(case)
    model_path, enc_path = aimet_encodings(zoo.build(case), feeds, config=config, version=version)
    out = tmp_path / "out"
    result = convert(
        model_path,
        out,
        options=ConvertOptions(encodings=str(enc_path), strict_encodings=True, htp_layout=htp),
    )
    # our own judge: QDQ on onnxruntime CPU
    assert result.verification is not None and result.verification.ok
    assert result.qdq_lsb is not None and max(result.qdq_lsb.values()) <= 1.0, result.qdq_lsb
    assert result.coverage is not None and result.coverage.ok
    assert not [w for w in result.coverage.warnings if "different encodings" in w], result.coverage.warnings

    sha_path, sha_enc = out / "model.onnx", out / "model.encodings"
    sha = ir.load(sha_path)
    requant = result.requant.tensors if result.requant is not None else {}
    if (case, config) in _REQUANTISING:
        assert requant, "data-movement encodings differ from their inputs': per-head requantisation expected"
    else:
        assert not requant, requant  # equal (or no) data-movement encodings: nothing extra emitted
    producers = {o.name: n for n in sha.graph for o in n.outputs}
    for name in requant:  # the requantisation nodes survive the HTP layout passes
        assert name in producers and producers[name].op_type == "Slice", name

    # the second judge: aimet-onnx QuantizationSimModel of each model, encodings loaded
    # AIMET loads its own 1.0.0 export strictly; a 2.x file does not say "symmetric", so even the
    # MHA file mismatches AIMET's symmetric quantizers (logged, no numeric effect)
    mha_runs, _ = quantsim_run(model_path, enc_path, feeds, config=config, strict=version != "2.0.0")
    sha_runs, mismatches = quantsim_run(sha_path, sha_enc, feeds, config=config)
    sha_encodings = load_encodings(sha_enc, model=sha)
    assert not _quantizers_added_on_copies(mismatches, sha, sha_encodings)
    mha_encodings = load_encodings(enc_path, model=ir.load(model_path))
    for mha_out, sha_out in zip(mha_runs, sha_runs, strict=True):
        diff = _lsb_diff(mha_out, sha_out, mha_encodings)
        assert max(diff.values()) <= 1.0, diff
        assert max(diff.values()) == 0.0, diff  # measured: bit-exact under AIMET's own simulation


def test_quantsim_judge_sees_a_missing_requantisation(tmp_path, monkeypatch) -> None:
    """Without the per-head requantisation the judge fails on Phi-3 W8A8 with quantized data movement
    (the bug this judge was added for): the SHA QuantSim is several steps off the MHA QuantSim."""
    import mha2sha.job as job
    from mha2sha.encodings.requant import RequantRecord

    monkeypatch.setattr(job, "requantize", lambda model, record, encodings: RequantRecord())
    case, config = "phi3_step", "w8a8_dm"
    feeds = _feeds(case)
    model_path, enc_path = aimet_encodings(zoo.build(case), feeds, config=config, version="1.0.0")
    out = tmp_path / "out"
    result = convert(model_path, out, options=ConvertOptions(encodings=str(enc_path), verify="none"))
    assert any("different encodings" in w for w in result.coverage.warnings)  # type: ignore[union-attr]
    mha_runs, _ = quantsim_run(model_path, enc_path, feeds, config=config, strict=True)
    sha_runs, _ = quantsim_run(Path(out / "model.onnx"), out / "model.encodings", feeds, config=config)
    mha_encodings = load_encodings(enc_path, model=ir.load(model_path))
    worst = max(max(_lsb_diff(m, s, mha_encodings).values()) for m, s in zip(mha_runs, sha_runs, strict=True))
    assert worst > 1.0
