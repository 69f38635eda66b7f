"""On the HTP emulator (onnxruntime-qnn): the quantized SHA model runs without CPU fallback and
computes bit for bit what the quantized MHA model computes there."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from mha2sha import zoo
from mha2sha.api import ConvertOptions, convert
from mha2sha.verify.htp import htp_available
from tests.encodings.aimet_gen import aimet_encodings
from tests.encodings.calibrate import calibrate_all
from tests.split._graphs import attention_model, causal_mask

pytestmark = pytest.mark.skipif(
    not htp_available(), reason="onnxruntime-qnn is not installed (make test installs it)"
)


@pytest.mark.parametrize("case", ["prepared_llama_gqa_step", "llama_gqa_step", "clip_vision"])
def test_sha_runs_on_htp_and_matches_mha_bit_for_bit(case: str, tmp_path) -> None:
    source = zoo.build(case)
    encodings = tmp_path / "model.encodings"
    calibration = [zoo.example_inputs(case), zoo.example_inputs(case, seed=1)]
    encodings.write_text(json.dumps(calibrate_all(source, calibration)))
    result = convert(
        source, tmp_path / "out", options=ConvertOptions(encodings=str(encodings), verify_htp=True)
    )
    check = result.htp
    assert check is not None and not check.error
    assert check.sha_on_htp_only and not check.sha_unsupported
    assert check.mha_on_htp_only and not check.cpu_fallback_used
    assert set(check.max_lsb) == set(result.qdq_lsb or {}) and max(check.max_lsb.values()) == 0.0


def _convert_hand_built(tmp_path, *, per_channel: bool = False, unquantized: tuple[str, ...] = ()):
    """4 heads x 16 attention, calibrated on two inputs (minus the activations named), converted
    with --verify-htp on the first."""
    source = tmp_path / "attention.onnx"
    onnx.save(attention_model(4, 16, 16, (1, 1, 16, 16)), source)
    rng = np.random.default_rng(0)
    feeds = [
        {"x": rng.normal(size=(1, 16, 64)).astype(np.float32), "mask": causal_mask((1, 1, 16, 16))}
        for _ in range(2)
    ]
    encodings = calibrate_all(source, feeds, per_channel=per_channel)
    encodings["activation_encodings"] = [
        e for e in encodings["activation_encodings"] if e["name"] not in unquantized
    ]
    (tmp_path / "model.encodings").write_text(json.dumps(encodings))
    np.savez(tmp_path / "feeds.npz", **feeds[0])
    options = ConvertOptions(
        encodings=str(tmp_path / "model.encodings"), inputs=str(tmp_path / "feeds.npz"), verify_htp=True
    )
    return convert(source, tmp_path / "out", options=options)


def test_hand_built_attention_on_htp(tmp_path) -> None:
    result = _convert_hand_built(tmp_path)
    assert result.htp is not None and result.htp.sha_on_htp_only and result.htp.max_lsb == {"y": 0.0}


@pytest.mark.parametrize("htp_layout", [False, True], ids=["matmul", "conv"])
@pytest.mark.parametrize("case", ["prepared_llama_gqa_step", "llama_gqa_step"])
def test_aimet_1_0_0_w8a16_runs_on_htp(case: str, htp_layout: bool, tmp_path) -> None:
    """AIMET's W8A16 HTP config exported as 1.0.0: symmetric 16-bit activations (v_proj) become
    uint16 with zero point 32768 and the SHA head join gets its pieces' encoding, so MHA, SHA and
    SHA-conv all run with CPU fallback disabled and agree bit for bit on the device's arithmetic."""
    model, encodings = aimet_encodings(
        zoo.build(case), [zoo.example_inputs(case)], config="w8a16", version="1.0.0"
    )
    options = ConvertOptions(encodings=str(encodings), verify_htp=True, htp_layout=htp_layout)
    result = convert(model, tmp_path / "out", options=options)
    check = result.htp
    assert check is not None and not check.error and not check.cpu_fallback_used
    assert check.sha_on_htp_only and check.mha_on_htp_only and not check.sha_unsupported
    assert check.max_lsb and max(check.max_lsb.values()) == 0.0


def test_unsupported_nodes_are_listed(tmp_path) -> None:
    """A per-channel weight whose MatMul input is left unquantized is a standalone per-channel DQ,
    which QNN rejects: the check names those nodes (in MHA and SHA) instead of failing, and the CPU
    QDQ comparison decides."""
    result = _convert_hand_built(tmp_path, per_channel=True, unquantized=("x",))
    check = result.htp
    assert check is not None and check.cpu_fallback_used and not check.sha_on_htp_only
    assert {name for name, _ in check.mha_unsupported} == {"wq_dq", "wk_dq", "wv_dq"}
    assert {name for name, _ in check.sha_unsupported} == {f"w{p}.h{h}_dq" for p in "qkv" for h in range(4)}
    assert result.qdq_lsb == {"y": 0.0}  # the CPU QDQ proof decides
    assert (tmp_path / "out" / "attention.report.json").exists()
