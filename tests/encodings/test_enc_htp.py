"""On the HTP emulator (onnxruntime-qnn): the quantized SHA model runs without CPU fallback and
computes bit for bit what the quantized MHA model computes there."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from mha2sha import zoo
from mha2sha.api import ConvertOptions, convert
from mha2sha.encodings import load_encodings
from mha2sha.errors import ConversionFailed
from mha2sha.io.save import save_model
from mha2sha.verify.htp import compare_on_htp, htp_available
from mha2sha.verify.htp_local import locate_divergence
from mha2sha.verify.qdq import output_lsb, to_qdq_ir
from mha2sha.verify.qdq_local import compare_quantized_tensors, origins
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


@pytest.mark.parametrize("htp_layout", [False, True], ids=["matmul", "conv"])
def test_an_htp_difference_is_located_and_attributed(htp_layout: bool, tmp_path) -> None:
    """CLIP vision with AIMET W8A16 2.0.0 encodings (q/k/v projections with biases): on these inputs
    the SHA logits differ from MHA's by 3 LSB on HTP while CPU QDQ is bit-exact. The failure names the
    first tensor where they part (a q_proj head piece, 1 LSB from identical quantized inputs), says it
    is HTP's arithmetic (its per-channel FullyConnected/Conv with a bias), and leaves a report."""
    case = "clip_vision"
    model, encodings = aimet_encodings(
        zoo.build(case), [zoo.example_inputs(case), zoo.example_inputs(case, seed=1)], config="w8a16", version="2.0.0"
    )
    out = tmp_path / "out"
    options = ConvertOptions(encodings=str(encodings), verify_htp=True, htp_layout=htp_layout, seed=0)
    with pytest.raises(ConversionFailed) as failed:
        convert(model, out, options=options)
    message = str(failed.value)
    assert "HTP verification failed: output 'last_hidden_state' differs by 3 LSB (> 1)" in message
    assert "first diverging tensor on HTP: '/model/encoder/layers.0/self_attn/q_proj/Add_output_0.h1'" in message
    assert "HTP's own arithmetic, not the conversion" in message and "per-channel weights and a bias" in message
    assert [p.name for p in out.iterdir()] == ["model.failed.report.json"]  # the model is not written
    report = json.loads((out / "model.failed.report.json").read_text())
    htp = report["htp"]
    assert htp["ok"] is False and htp["max_lsb"]["last_hidden_state"] == 3.0
    first = htp["first_divergence"]
    assert first["whose"] == "htp" and first["lsb"] == 1.0 and first["inputs_equal"] and first["cpu_lsb"] == 0.0
    assert report["quantized_max_lsb"] == {"last_hidden_state": 0.0, "pooler_output": 0.0}
    assert report["failure"] == message.split("; the model was not written")[0]
    # a later run that passes replaces the failed report with its own set
    convert(model, out, options=dataclasses.replace(options, verify_htp=False))
    assert not (out / "model.failed.report.json").exists() and (out / "model.report.json").exists()


def test_a_wrong_per_head_encoding_is_the_conversions(tmp_path) -> None:
    """A per-head weight encoding 4x too coarse (a propagation bug): the first tensor where MHA and
    SHA part on HTP is that head's projection, and the CPU tensor-by-tensor check says the SHA unit
    computes something else there too: the conversion's."""
    result = _convert_hand_built(tmp_path)
    out = tmp_path / "out"
    mha_es = load_encodings(tmp_path / "model.encodings", model=ir.load(tmp_path / "attention.onnx"))
    sha = ir.load(out / "attention.onnx")
    sha_es = load_encodings(out / "attention.encodings", model=sha)
    enc = sha_es.params["wq.h2"]
    sha_es.params["wq.h2"] = dataclasses.replace(enc, scale=np.asarray(enc.scale) * 4.0)
    projection = next(n.outputs[0].name for n in sha.graph if any(i is not None and i.name == "wq.h2" for i in n.inputs))
    paths = []
    for tag, path, es in (("mha", tmp_path / "attention.onnx", mha_es), ("sha", out / "attention.onnx", sha_es)):
        save_model(to_qdq_ir(path, es), tmp_path / f"{tag}_qdq.onnx")
        paths.append(tmp_path / f"{tag}_qdq.onnx")
    feeds = dict(np.load(tmp_path / "feeds.npz"))
    check = compare_on_htp(*paths, feeds, {"y": output_lsb(mha_es.get("y"), (1, 16, 64))}, "SM8650")
    assert check.outputs is not None and check.max_lsb["y"] > 1
    where = origins(result.split, result.layout)
    cpu = compare_quantized_tensors(tmp_path / "attention.onnx", mha_es, out / "attention.onnx", sha_es, feeds, where)
    found = locate_divergence(
        *paths, mha_es, sha_es, feeds, where, "SM8650", outputs=check.outputs, cpu=cpu, max_lsb=1.0
    )
    assert found is not None and found.tensor == projection and found.whose == "conversion", found
    assert found.cpu_lsb is not None and found.cpu_lsb > 1 and "the conversion's" in found.explain()
