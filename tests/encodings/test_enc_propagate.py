"""Propagation of encodings from MHA tensors to their per-head pieces, and coverage reporting."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
import _enc_docs as docs  # noqa: E402
import _enc_models as em  # noqa: E402
from _enc_docs import hand_100 as _hand_100  # noqa: E402

from mha2sha.encodings import (  # noqa: E402
    EncodingCoverageError,
    channel_axes,
    dump_encodings,
    load_encodings,
    parse_encodings,
    propagate,
    save_encodings,
)
from mha2sha.errors import UserError  # noqa: E402
from mha2sha.report.tables import coverage_table  # noqa: E402
from mha2sha.split.record import Piece, SplitRecord, TensorSplit  # noqa: E402


@pytest.fixture(scope="module")
def mha() -> ir.Model:
    return ir.from_proto(em.mha_model())


@pytest.fixture(scope="module")
def sha() -> ir.Model:
    return ir.from_proto(em.sha_model())


def test_rules_on_hand_record(mha: ir.Model, sha: ir.Model) -> None:
    es = parse_encodings(_hand_100())
    out, rep = propagate(es, em.split_record(), sha, original=mha)
    # per-tensor activation: copied to every head, same numbers
    for i in range(em.H):
        assert out.activations[f"q.h{i}"].same_numbers(es.activations["q"])
        assert out.activations[f"p.h{i}"].same_numbers(es.activations["p"])
    # per-channel weight (MatMul [in, out] -> channel axis 1): head i gets output channels i*hd:(i+1)*hd
    q_w = es.params["q_w"]
    for i in range(em.H):
        sl = slice(i * em.HD, (i + 1) * em.HD)
        np.testing.assert_array_equal(out.params[f"q_w.h{i}"].scale, q_w.scale[sl])
        np.testing.assert_array_equal(out.params[f"q_w.h{i}"].offset, q_w.offset[sl])
        # per-block: the rows of the (channel, block) table
        np.testing.assert_array_equal(
            out.params[f"k_w.h{i}"].scale, es.params["k_w"].scale.reshape(16, 2)[sl]
        )
        # LPBQ: per-channel float scales and the per-block int scales of those channels
        v = out.params[f"v_w.h{i}"]
        np.testing.assert_array_equal(v.scale, es.params["v_w"].scale[sl])
        np.testing.assert_array_equal(v.per_block_int_scale, es.params["v_w"].per_block_int_scale[sl])
        assert v.block_size == docs.BS and v.compressed_bw == 4
    # per-tensor weight kept whole (o_w is not split here) with the MHA scale
    assert out.params["o_w"].same_numbers(es.params["o_w"])
    # q4 was split: its pieces get the MHA encoding, the original is gone from the output
    assert "q4" not in out and out.activations["q4.h1"].same_numbers(es.activations["q4"])
    # ghost: not in either model -> unknown and dropped; never written
    assert rep.unknown == ["ghost"] and "ghost" in rep.dropped and "ghost" not in out
    assert set(rep.kept) == {"x", "y", "ctx2", "o_w"}
    assert rep.missing == {}
    out_names = {n for n in _names(sha)}
    assert set(out.names()) <= out_names
    assert len(rep.sha_encoded) == em.H * len(rep.mha_encoded)


def _names(model: ir.Model) -> list[str]:
    g = model.graph
    return [*(v.name for v in g.inputs), *g.initializers, *(o.name for n in g for o in n.outputs)]


def test_written_file_reloads(tmp_path: Path, mha: ir.Model, sha: ir.Model) -> None:
    es = parse_encodings(_hand_100())
    out, _ = propagate(es, em.split_record(), sha, original=mha)
    save_encodings(out, tmp_path / "sha.encodings")
    again = load_encodings(tmp_path / "sha.encodings")
    assert again.names() == out.names()
    # and as 2.0.0, with axes from the SHA model (pieces are MatMul weights too)
    save_encodings(out, tmp_path / "sha2.encodings", version="2.0.0", model=sha)
    doc = json.loads((tmp_path / "sha2.encodings").read_text())
    by = {e["name"]: e for e in doc["encodings"]}
    assert by["q_w.h1"]["axis"] == 1 and len(by["q_w.h1"]["y_scale"]) == em.HD
    assert np.shape(by["k_w.h0"]["y_scale"]) == (2, em.HD)


def test_2_0_0_explicit_axes_and_order(sha: ir.Model) -> None:
    es = parse_encodings(docs.doc_200())
    out, rep = propagate(es, em.split_record(), sha)  # no original model: 2.x states the axes
    assert rep.missing == {}
    np.testing.assert_array_equal(out.params["q_b.h1"].scale, es.params["q_b"].scale[em.HD :])
    assert out.params["q_b.h1"].qdtype() == "int32"
    doc = dump_encodings(out)
    names = [e["name"] for e in doc["encodings"]]
    # pieces take the place of their original, in head order
    assert names[:4] == ["q_w.h0", "q_w.h1", "k_w.h0", "k_w.h1"]
    v = next(e for e in doc["encodings"] if e["name"] == "v_w.h0")
    assert np.shape(v["per_block_int_scale"]) == (2, em.HD) and np.shape(v["per_channel_float_scale"]) == (
        1,
        em.HD,
    )


def _o_split_models(rows: int) -> tuple[SplitRecord, ir.Model]:
    """W_o [16, 16] cut by input rows (each head's slice of the o_proj input), summed per head."""
    n = 16 // rows
    w = np.arange(256, dtype=np.float32).reshape(16, 16) / 256
    inits = [nh.from_array(np.ascontiguousarray(w[i * rows : (i + 1) * rows]), f"o_w.h{i}") for i in range(n)]
    nodes = [h.make_node("MatMul", [f"c{i}", f"o_w.h{i}"], [f"y{i}"]) for i in range(n)]
    nodes.append(h.make_node("Sum", [f"y{i}" for i in range(n)], ["y"]))
    g = h.make_graph(
        nodes,
        "o",
        [h.make_tensor_value_info(f"c{i}", T.FLOAT, [1, rows]) for i in range(n)],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 16])],
        inits,
    )
    m = ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))
    pieces = [Piece(f"o_w.h{i}", ((0, i * rows, (i + 1) * rows),), (i,)) for i in range(n)]
    return SplitRecord({"o_w": TensorSplit("o_w", "param", (16, 16), pieces)}), m


def _o_encodings(kind: str) -> dict:
    base = {"bw": 8, "dtype": "INT", "is_sym": True, "name": "o_w"}
    if kind == "PER_CHANNEL":
        return {**base, "enc_type": kind, "scale": docs._scales(7, 16), "offset": [-128.0] * 16}
    if kind == "PER_BLOCK":
        return {
            **base,
            "bw": 4,
            "enc_type": kind,
            "block_size": 8,
            "scale": docs._scales(8, 32),
            "offset": [-8.0] * 32,
        }
    return {
        **base,
        "enc_type": "LPBQ",
        "block_size": 8,
        "compressed_bw": 4,
        "scale": docs._scales(9, 16),
        "offset": [-128] * 16,
        "per_block_int_scale": docs._ints(10, 32),
    }


@pytest.mark.parametrize("kind", ["PER_CHANNEL", "PER_BLOCK", "LPBQ"])
def test_input_row_cut_keeps_output_channels(kind: str) -> None:
    """Cutting W_o's input rows keeps every output channel in each piece: per-channel is copied
    whole; per-block/LPBQ keep all channels and take the blocks covering those rows."""
    rec, model = _o_split_models(rows=8)
    es = parse_encodings(
        {"version": "1.0.0", "activation_encodings": [], "param_encodings": [_o_encodings(kind)]}
    )
    out, rep = propagate(es, rec, model, channel_axes_map={"o_w": (1, 0)})
    assert rep.ok, rep.missing
    o = es.params["o_w"]
    for i in range(2):
        piece = out.params[f"o_w.h{i}"]
        if kind == "PER_CHANNEL":
            assert piece.same_numbers(o)
        elif kind == "PER_BLOCK":
            np.testing.assert_array_equal(piece.scale, o.scale.reshape(16, 2)[:, i : i + 1])
        else:
            np.testing.assert_array_equal(piece.scale, o.scale)
            np.testing.assert_array_equal(piece.per_block_int_scale, o.per_block_int_scale[:, i : i + 1])


@pytest.mark.parametrize("kind", ["PER_BLOCK", "LPBQ"])
def test_unaligned_block_cut_is_a_gap(kind: str) -> None:
    rec, model = _o_split_models(rows=4)  # 4 rows per head, block size 8
    es = parse_encodings(
        {"version": "1.0.0", "activation_encodings": [], "param_encodings": [_o_encodings(kind)]}
    )
    out, rep = propagate(es, rec, model, channel_axes_map={"o_w": 1})
    assert not rep.ok and "not aligned to block size 8" in rep.missing["o_w.h0"]
    assert "o_w.h0" not in out
    with pytest.raises(EncodingCoverageError) as exc:
        propagate(es, rec, model, channel_axes_map={"o_w": 1}, strict=True)
    assert isinstance(exc.value, UserError) and "\n" not in str(exc.value)


def test_axis_never_guessed_from_a_coincidental_size() -> None:
    """A square [16, 16] weight: both dims match the channel count. Without a model that says how
    it is consumed, propagation must report a gap, not pick an axis."""
    rec, _ = _o_split_models(rows=8)
    g = h.make_graph(
        [], "empty", [], [], [nh.from_array(np.zeros((8, 16), np.float32), f"o_w.h{i}") for i in range(2)]
    )
    bare = ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))
    es = parse_encodings(
        {"version": "1.0.0", "activation_encodings": [], "param_encodings": [_o_encodings("PER_CHANNEL")]}
    )
    _, rep = propagate(es, rec, bare)
    assert "channel axis unknown" in rep.missing["o_w.h0"]
    # the consuming MatMul in the output model settles it (axis 1)
    rec2, model = _o_split_models(rows=8)
    _, rep2 = propagate(es, rec2, model)
    assert rep2.ok


def test_dropped_tensor_and_strict(mha: ir.Model, sha: ir.Model) -> None:
    doc = _hand_100()
    doc["activation_encodings"] = [e for e in doc["activation_encodings"] if e["name"] != "ghost"]
    rec = em.split_record()
    del rec.tensors["q4"]  # q4 no longer exists in the SHA model and nobody says where it went
    es = parse_encodings(doc)
    out, rep = propagate(es, rec, sha, original=mha)
    assert rep.dropped == {"q4": "tensor not in output model"} and rep.unknown == []
    with pytest.raises(EncodingCoverageError, match="1 encodings dropped"):
        propagate(es, rec, sha, original=mha, strict=True)


def test_missing_piece_in_output_model(mha: ir.Model, sha: ir.Model) -> None:
    rec = em.split_record()
    rec.tensors["q"].pieces.append(Piece("q.h9", ((2, 0, 8),), (9,)))
    _, rep = propagate(parse_encodings(_hand_100()), rec, sha, original=mha)
    assert "q.h9" in rep.missing


def test_report_rendering(mha: ir.Model, sha: ir.Model) -> None:
    _, rep = propagate(parse_encodings(_hand_100()), em.split_record(), sha, original=mha)
    d = rep.to_dict()
    json.dumps(d)
    assert d["counts"]["mha_encoded"] == len(rep.mha_encoded) and d["ok"] is False  # ghost dropped
    buf = io.StringIO()
    Console(file=buf, width=200).print(coverage_table(rep))
    text = buf.getvalue()
    assert "per-head tensors encoded" in text and "ghost" in text


def _axes_model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> ir.Model:
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, None)],
        [h.make_tensor_value_info(n.output[0], T.FLOAT, None) for n in nodes[-1:]],
        inits,
    )
    return ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]))


def test_channel_axes_rules() -> None:
    z = np.zeros
    m = _axes_model(
        [
            h.make_node("Gemm", ["x", "g_t", "g_b"], ["a"], transB=1),
            h.make_node("Gemm", ["a", "g_n"], ["b"]),
            h.make_node("Conv", ["b", "c_w", "c_b"], ["c"]),
            h.make_node("ConvTranspose", ["c", "ct_w"], ["d"]),
            h.make_node("Transpose", ["w_t"], ["w_tt"], perm=[1, 0]),
            h.make_node("MatMul", ["d", "w_tt"], ["e"]),
            h.make_node("MatMul", ["e", "m3"], ["f"]),
        ],
        [
            nh.from_array(z(s, np.float32), n)
            for n, s in [
                ("g_t", (6, 4)),
                ("g_b", (6,)),
                ("g_n", (6, 5)),
                ("c_w", (3, 5, 1, 1)),
                ("c_b", (3,)),
                ("ct_w", (3, 7, 1, 1)),
                ("w_t", (9, 7)),
                ("m3", (2, 9, 11)),
            ]
        ],
    )
    axes = channel_axes(m)
    assert axes["g_t"] == (0, 1) and axes["g_n"] == (1, 0) and axes["g_b"] == (0, None)
    assert axes["c_w"] == (0, 1) and axes["c_b"] == (0, None) and axes["ct_w"] == (1, 0)
    assert axes["w_t"] == (0, 1)  # MatMul on the transpose: out channels are w_t's rows
    assert axes["m3"] == (2, 1)
