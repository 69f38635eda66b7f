"""QDQ models from encodings: AIMET's sign convention, placement, dtypes, and MHA == SHA."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h

sys.path.insert(0, str(Path(__file__).parent))
import _enc_docs as docs  # noqa: E402
import _enc_models as em  # noqa: E402
from _enc_docs import hand_100 as _hand_100  # noqa: E402

from mha2sha.encodings import parse_encodings, propagate  # noqa: E402
from mha2sha.errors import UserError  # noqa: E402
from mha2sha.verify.qdq import run_qdq, run_qdq_compare, to_qdq  # noqa: E402


def _identity(opset: int = 17) -> onnx.ModelProto:
    g = h.make_graph(
        [h.make_node("Identity", ["x"], ["y"])],
        "id",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 64])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 64])],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return m


X = np.linspace(-14.0, 30.0, 64, dtype=np.float32).reshape(1, 64)


def _aimet_formula(x: np.ndarray, scale: float, offset: float, bw: int) -> np.ndarray:
    """AIMET's definition on the unsigned grid: q = clamp(round(x/scale) - offset, 0, 2^bw - 1)."""
    q = np.clip(np.rint(x / np.float32(scale)) - offset, 0, 2**bw - 1)
    return ((q + offset) * np.float32(scale)).astype(np.float32)


@pytest.mark.parametrize(
    "is_sym, offset, bw", [(False, -100.0, 8), (True, -128.0, 8), (False, -30000.0, 16), (True, -32768.0, 16)]
)
def test_sign_convention_1_0_0(is_sym: bool, offset: float, bw: int) -> None:
    scale = 0.1 if bw == 8 else 0.001
    es = parse_encodings(
        {
            "version": "1.0.0",
            "param_encodings": [],
            "activation_encodings": [
                {
                    "name": "y",
                    "dtype": "INT",
                    "enc_type": "PER_TENSOR",
                    "bw": bw,
                    "is_sym": is_sym,
                    "scale": [scale],
                    "offset": [offset],
                }
            ],
        }
    )
    got = run_qdq(_identity(), es, {"x": X})["y"]
    np.testing.assert_array_equal(got, _aimet_formula(X, scale, offset, bw))
    # the opposite sign would put the grid elsewhere: the test can tell them apart
    assert not np.array_equal(got, _aimet_formula(X, scale, -offset, bw))


@pytest.mark.parametrize(
    "dtype, zp, offset",
    [("uint8", 100, -100.0), ("int8", 0, -128.0), ("int8", 5, -133.0), ("uint16", 32768, -32768.0)],
)
def test_sign_convention_2_0_0(dtype: str, zp: int, offset: float) -> None:
    """2.x stores the ONNX zero point itself: same grid as the 1.0.0 offset."""
    bw = 8 if dtype.endswith("8") else 16
    scale = 0.1 if bw == 8 else 0.001
    es = parse_encodings(
        {
            "version": "2.0.0",
            "encodings": [{"name": "y", "output_dtype": dtype, "y_scale": scale, "y_zero_point": zp}],
        }
    )
    assert float(es.get("y").offset) == offset
    got = run_qdq(_identity(21), es, {"x": X})["y"]
    np.testing.assert_array_equal(got, _aimet_formula(X, scale, offset, bw))


def test_graph_input_and_output_keep_names() -> None:
    es = parse_encodings(
        {
            "version": "1.0.0",
            "param_encodings": [],
            "activation_encodings": [
                {
                    "name": n,
                    "dtype": "INT",
                    "enc_type": "PER_TENSOR",
                    "bw": 8,
                    "is_sym": False,
                    "scale": [0.2],
                    "offset": [-50.0],
                }
                for n in ("x", "y")
            ],
        }
    )
    q = to_qdq(_identity(), es)
    assert [i.name for i in q.graph.input] == ["x"] and [o.name for o in q.graph.output] == ["y"]
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2
    onnx.checker.check_model(q)


def test_placement_and_dtypes() -> None:
    doc = docs.doc_200()
    doc["encodings"] = [e for e in doc["encodings"] if e["name"] != "s"]  # fp8: no ORT CPU path here
    es = parse_encodings(doc)
    q17 = to_qdq(em.mha_model(), es)
    q21 = to_qdq(em.mha_model(opset=21), es)
    dq_inputs = {n.input[0] for n in q17.graph.node if n.op_type == "DequantizeLinear"}
    assert "q_b_q" in dq_inputs  # int32 bias: quantized offline, DequantizeLinear only
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "q_b" for n in q17.graph.node)
    doms17 = {(n.op_type, n.domain, n.input[0]) for n in q17.graph.node if n.op_type == "QuantizeLinear"}
    assert ("QuantizeLinear", "com.microsoft", "x") in doms17  # uint16 below opset 21
    assert "q_w_q" in dq_inputs  # int8 per-channel weight: stored quantized, DequantizeLinear only
    assert not any(i == "q_w" for _, _, i in doms17)
    assert not any(i == "k_w" for _, _, i in doms17)  # blocked folded offline at opset < 21
    q21_block = [n for n in q21.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "k_w"]
    assert q21_block and {a.name: a.i for a in q21_block[0].attribute} == {"axis": 0, "block_size": 8}
    assert all(n.domain == "" for n in q21.graph.node)
    # both routes give the same numbers
    a = run_qdq(em.mha_model(), es, em.inputs())["y"]
    b = run_qdq(em.mha_model(opset=21), es, em.inputs())["y"]
    np.testing.assert_array_equal(a, b)


def test_fp16_is_a_cast_pair() -> None:
    es = parse_encodings(
        {
            "version": "1.0.0",
            "param_encodings": [],
            "activation_encodings": [{"name": "y", "dtype": "FLOAT", "enc_type": "PER_TENSOR", "bw": 16}],
        }
    )
    q = to_qdq(_identity(), es)
    assert [n.op_type for n in q.graph.node] == ["Identity", "Cast", "Cast"]
    x = np.array([[1 / 3] * 64], np.float32)
    np.testing.assert_array_equal(
        run_qdq(_identity(), es, {"x": x})["y"], x.astype(np.float16).astype(np.float32)
    )


def test_qdq_of_a_model_equals_itself() -> None:
    es = parse_encodings(_hand_100())
    es.activations.pop("ghost")
    m = em.mha_model()
    assert run_qdq_compare(m, es, m, es, em.inputs()) == {"y": 0.0}


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
def test_mha_and_sha_quantized_outputs_identical(version: str) -> None:
    if version == "1.0.0":
        es = parse_encodings(_hand_100())
        es.activations.pop("ghost")
    else:
        doc = docs.doc_200()
        doc["encodings"] = [e for e in doc["encodings"] if e["name"] != "s"]
        es = parse_encodings(doc)
    mha, sha = em.mha_model(), em.sha_model()
    out, rep = propagate(es, em.split_record(), ir.from_proto(sha), original=ir.from_proto(mha))
    assert rep.ok
    diff = run_qdq_compare(mha, es, sha, out, em.inputs())
    assert diff == {"y": 0.0}
    # a wrong slice (swap the heads' q_w encodings) is seen
    out.params["q_w.h0"].scale, out.params["q_w.h1"].scale = (
        out.params["q_w.h1"].scale,
        out.params["q_w.h0"].scale,
    )
    assert run_qdq_compare(mha, es, sha, out, em.inputs())["y"] > 0


def test_errors() -> None:
    es = parse_encodings(
        {
            "version": "1.0.0",
            "param_encodings": [],
            "activation_encodings": [
                {
                    "name": "nope",
                    "dtype": "INT",
                    "enc_type": "PER_TENSOR",
                    "bw": 8,
                    "is_sym": False,
                    "scale": [1.0],
                    "offset": [0],
                }
            ],
        }
    )
    # a name that matches nothing is the coverage report's warning, not a QDQ error: it is skipped
    q = to_qdq(_identity(), es)
    assert not any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    es2 = parse_encodings(
        {"version": "2.0.0", "encodings": [{"name": "y", "output_dtype": "float8e4m3fn", "y_scale": 0.1}]}
    )
    with pytest.raises(UserError, match="scaled float"):
        to_qdq(_identity(), es2)


def test_saturated_int32_keeps_its_sign() -> None:
    """A bias past the int32 grid saturates to +2**31-1 (float32 would wrap it to -2**31)."""
    from mha2sha.verify.qdq import fake_quantize

    x = np.array([1e12, -1e12, 3.0], np.float32)
    out = fake_quantize(x, np.array(1.0), np.array(0), "int32")
    assert out[0] > 2e9 and out[1] < -2e9 and out[2] == 3.0
