"""Quantized equivalence tensor by tensor (verify/qdq_local.py).

At hidden 1024 ORT CPU's float MatMul sums a per-head weight slice in another order than the full
product, flips 16-bit roundings at q/k/v_proj and the outputs of MHA-QDQ and SHA-QDQ drift apart by
more than one LSB although the conversion is right. Cut at every quantized tensor and fed with the
MHA model's quantized values, each SHA tensor must be within one LSB, and a wrong encoding must be
named where it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from mha2sha.api import ConvertOptions, convert
from mha2sha.encodings import load_encodings
from mha2sha.verify.inputs import make_inputs
from mha2sha.verify.qdq import run_qdq_compare
from mha2sha.verify.qdq_local import compare_quantized_tensors
from tests.encodings.calibrate import calibrate_all
from tests.split._graphs import attention_model, causal_mask

HEADS, SEQ, HEAD_DIM = 16, 64, 64  # hidden 1024: wide enough for CPU float-order rounding flips


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("qdq_local")
    onnx.save(attention_model(HEADS, SEQ, HEAD_DIM, (1, 1, SEQ, SEQ)), work / "m.onnx")
    x = np.random.default_rng(0).normal(size=(1, SEQ, HEADS * HEAD_DIM)).astype(np.float32)
    calibration = [{"x": x, "mask": causal_mask((1, 1, SEQ, SEQ))}]
    (work / "m.encodings").write_text(json.dumps(calibrate_all(work / "m.onnx", calibration, bits=16)))
    return work


def _origins(result) -> dict:
    return {p.name: (t.original, p.ranges) for t in result.record.tensors.values() for p in t.pieces}


@pytest.mark.parametrize("htp_layout", [False, True], ids=["sha", "sha-conv"])
def test_wide_conversion_passes_tensor_by_tensor(wide: Path, htp_layout: bool) -> None:
    out = wide / f"out-{htp_layout}"
    options = ConvertOptions(encodings=str(wide / "m.encodings"), htp_layout=htp_layout)
    result = convert(wide / "m.onnx", out, options=options)
    assert result.verification is not None and result.verification.ok
    report = json.loads((out / "m.report.json").read_text())
    local = result.qdq_local
    if local is None:  # the outputs happened to agree within 1 LSB: nothing more to prove
        assert max(result.qdq_lsb.values()) <= 1.0
        return
    assert local.tensors and max(t.lsb for t in local.tensors) <= 1.0
    assert report["quantized_tensor_by_tensor"]["tensors"] == len(local.tensors)
    # every per-head attention output is among the checked tensors
    checked = {t.name for t in local.tensors}
    assert {f"attn.h{h}" for h in range(HEADS)} <= checked


def test_every_piece_is_compared_and_within_one_lsb(wide: Path) -> None:
    result = convert(wide / "m.onnx", wide / "plain", options=ConvertOptions(verify=False,
                     encodings=str(wide / "m.encodings")))  # fmt: skip
    mha_enc = load_encodings(str(wide / "m.encodings"))
    sha_enc = load_encodings(str(wide / "plain" / "m.encodings"))
    inputs = make_inputs(ir.load(wide / "m.onnx"), 0)
    outputs = run_qdq_compare(wide / "m.onnx", mha_enc, wide / "plain" / "m.onnx", sha_enc, inputs)
    local = compare_quantized_tensors(wide / "m.onnx", mha_enc, wide / "plain" / "m.onnx", sha_enc,
                                      inputs, _origins(result))  # fmt: skip
    pieces = {n for n in sha_enc.activations if ".h" in n}
    assert pieces and pieces <= {t.name for t in local.tensors}
    assert max(t.lsb for t in local.tensors) <= 1.0
    # the local differences are single rounding flips; the outputs may have drifted further
    assert max(outputs.values()) >= max(t.lsb for t in local.tensors if t.name == "y")


def test_wrong_encoding_is_named_where_it_happens(wide: Path) -> None:
    result = convert(wide / "m.onnx", wide / "bad", options=ConvertOptions(verify=False,
                     encodings=str(wide / "m.encodings")))  # fmt: skip
    mha_enc = load_encodings(str(wide / "m.encodings"))
    sha_enc = load_encodings(str(wide / "bad" / "m.encodings"))
    broken = "attn.h5"
    sha_enc.activations[broken].scale = sha_enc.activations[broken].scale * 1.5
    inputs = make_inputs(ir.load(wide / "m.onnx"), 0)
    local = compare_quantized_tensors(wide / "m.onnx", mha_enc, wide / "bad" / "m.onnx", sha_enc,
                                      inputs, _origins(result))  # fmt: skip
    first = local.first_above(1.0)
    assert first is not None and first.name == broken and first.origin == "attn" and first.lsb > 100
    others = [t for t in local.tensors if t.name.startswith("attn.h") and t.name != broken]
    assert others and max(t.lsb for t in others) <= 1.0
