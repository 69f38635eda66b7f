"""Per-head requantisation (``mha2sha.encodings.requant``) on a hand-built packed-QKV block.

``x -> MatMul(W_qkv) -> qkv -> Slice q|k|v -> Reshape -> Transpose -> attention -> o_proj``: per head,
the split computes the head's rows of ``qkv`` directly, so one per-head tensor stands for ``qkv`` and
for a Slice output. Min/max encodings of every tensor (``calibrate.calibrate_all``) give the Slice
outputs ranges of their own: the SHA model must apply both encodings, in order.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from mha2sha.api import ConvertOptions, convert
from mha2sha.encodings import load_encodings, propagate
from mha2sha.encodings.propagate import EncodingCoverageError
from mha2sha.io.prepare import prepare_for_split
from mha2sha.split.record import SplitRecord
from mha2sha.split.split_heads import SplitHeadsPass
from tests.encodings.calibrate import calibrate_all

HEADS, SEQ, HD = 2, 3, 4
C = HEADS * HD


def _packed_qkv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(0, C**-0.5, (C, 3 * C)).astype(np.float32)
    w[:, C : 2 * C] *= 3.0  # k spans qkv's range; q and v get narrower ranges (encodings of their own)
    inits = [
        numpy_helper.from_array(w, "w_qkv"),
        numpy_helper.from_array(rng.normal(0, C**-0.5, (C, C)).astype(np.float32), "w_o"),
        numpy_helper.from_array(np.array([1, SEQ, HEADS, HD], np.int64), "split_shape"),
        numpy_helper.from_array(np.array([1, SEQ, C], np.int64), "merge_shape"),
        numpy_helper.from_array(np.array(HD**-0.5, np.float32), "scale"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w_qkv"], ["qkv"], name="qkv_proj")]
    for i, name in enumerate(("q", "k", "v")):
        inits += [
            numpy_helper.from_array(np.array([i * C], np.int64), f"{name}_start"),
            numpy_helper.from_array(np.array([(i + 1) * C], np.int64), f"{name}_end"),
        ]
        nodes += [
            helper.make_node(
                "Slice", ["qkv", f"{name}_start", f"{name}_end", "axis2"], [f"{name}_s"], name=f"{name}_slice"
            ),
            helper.make_node("Reshape", [f"{name}_s", "split_shape"], [f"{name}_4d"], name=f"{name}_reshape"),
        ]
    nodes += [
        helper.make_node("Transpose", ["q_4d"], ["q"], perm=[0, 2, 1, 3], name="q_t"),
        helper.make_node("Transpose", ["k_4d"], ["kt"], perm=[0, 2, 3, 1], name="k_t"),
        helper.make_node("Transpose", ["v_4d"], ["v"], perm=[0, 2, 1, 3], name="v_t"),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale_mul"),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "v"], ["attn"], name="pv"),
        helper.make_node("Transpose", ["attn"], ["attn_t"], perm=[0, 2, 1, 3], name="attn_t"),
        helper.make_node("Reshape", ["attn_t", "merge_shape"], ["attn_merged"], name="merge"),
        helper.make_node("MatMul", ["attn_merged", "w_o"], ["y"], name="o_proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "packed_qkv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, C])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, C])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds() -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(s).standard_normal((1, SEQ, C)).astype(np.float32)} for s in (1, 2)]


def _write(tmp_path, edit=None):
    model = _packed_qkv_model()
    path = tmp_path / "mha.onnx"
    onnx.save(model, path)
    enc = calibrate_all(path, _feeds())
    if edit is not None:
        edit({e["name"]: e for e in enc["activation_encodings"]}, enc)
    enc_path = tmp_path / "mha.encodings"
    enc_path.write_text(json.dumps(enc))
    return path, enc_path


def _convert(path, enc_path, out):
    return convert(
        path,
        out,
        options=ConvertOptions(encodings=str(enc_path), strict_encodings=True, inputs=None),
    )


def test_slice_with_its_own_encoding_is_requantised_per_head(tmp_path) -> None:
    path, enc_path = _write(tmp_path)
    result = _convert(path, enc_path, tmp_path / "out")
    assert result.qdq_lsb is not None and max(result.qdq_lsb.values()) == 0.0, result.qdq_lsb
    assert result.coverage is not None and result.coverage.ok and not result.coverage.conflicts
    sha = ir.load(tmp_path / "out" / "mha.onnx")
    producers = {o.name: n for n in sha.graph for o in n.outputs}
    # one requantisation per head and per Slice whose encoding is not qkv's, a full-range Slice of
    # the head's rows of qkv
    mha = load_encodings(enc_path)
    differ = [s for s in "qkv" if not mha.get(f"{s}_s").same_numbers(mha.get("qkv"))]  # type: ignore[union-attr]
    assert "q" in differ and "v" in differ
    assert result.requant is not None
    assert sorted(result.requant.tensors) == sorted(f"{s}_s.h{h}" for s in differ for h in range(HEADS))
    for name, original in result.requant.tensors.items():
        node = producers[name]
        assert node.op_type == "Slice" and original == name.split(".")[0]
        assert node.inputs[0].name.startswith(f"qkv.h{name[-1]}")  # the per-head projection output
        assert tuple(node.inputs[0].shape) == tuple(node.outputs[0].shape)
    # the name map and the encodings: the Slice outputs are per-head tensors of their own
    names = json.loads((tmp_path / "out" / "mha_to_sha_names.json").read_text())["activation_encodings"]
    assert names["q_s"] == ["q_s.h0", "q_s.h1"]
    assert {"qkv.h0", "qkv.h1"} <= set(names["qkv"])
    written = load_encodings(tmp_path / "out" / "mha.encodings", model=sha)
    assert written.get("q_s.h0").same_numbers(mha.get("q_s"))  # type: ignore[union-attr]
    assert written.get("qkv.h0").same_numbers(mha.get("qkv"))  # type: ignore[union-attr]
    assert not mha.get("q_s").same_numbers(mha.get("qkv"))  # type: ignore[union-attr]
    assert set(result.coverage.requantized) == set(result.requant.tensors)


def test_equal_encodings_emit_nothing(tmp_path) -> None:
    def same_as_qkv(acts, enc):
        for s in "qkv":
            acts[f"{s}_s"].update(scale=acts["qkv"]["scale"], offset=acts["qkv"]["offset"])

    path, enc_path = _write(tmp_path, same_as_qkv)
    result = _convert(path, enc_path, tmp_path / "out")
    assert result.requant is not None and not result.requant.tensors
    assert max(result.qdq_lsb.values()) == 0.0  # type: ignore[union-attr]
    sha = ir.load(tmp_path / "out" / "mha.onnx")
    assert not [n for n in sha.graph if n.name.endswith(".requant")]


def test_unencoded_projection_hands_its_piece_the_slice_encoding(tmp_path) -> None:
    """Only the Slice outputs are quantized (the projection output is not): each per-head projection
    output is read only through its Slice's encoding, so it carries that encoding, with no node."""

    def drop_qkv(acts, enc):
        enc["activation_encodings"] = [e for e in enc["activation_encodings"] if e["name"] != "qkv"]

    path, enc_path = _write(tmp_path, drop_qkv)
    result = _convert(path, enc_path, tmp_path / "out")
    assert result.requant is not None and not result.requant.tensors
    assert max(result.qdq_lsb.values()) == 0.0  # type: ignore[union-attr]
    written = load_encodings(tmp_path / "out" / "mha.encodings")
    assert written.get("qkv.h0").same_numbers(load_encodings(enc_path).get("q_s"))  # type: ignore[union-attr]


def test_without_requantisation_the_conflict_is_a_coverage_gap(tmp_path) -> None:
    path, enc_path = _write(tmp_path)
    model = ir.load(path)
    encodings = load_encodings(enc_path, model=model)
    prepare_for_split(model)
    record = SplitRecord()
    SplitHeadsPass(record)(model)
    assert record.originals["qkv.h0"] == ["qkv", "q_s"]  # one per-head tensor, two originals
    _, report = propagate(encodings, record, model)
    assert "qkv.h0" in report.conflicts and not report.ok
    with pytest.raises(EncodingCoverageError, match="conflicting encodings"):
        propagate(encodings, record, model, strict=True)
