"""``mha2sha analyze``: the report files (JSON, attention.csv, ops.csv, report.html), never a model;
HTP support from the QNN EP (an op it rejects is named with the EP's reason); dynamic inputs
analysed with the consistent suggestion; bad input is one line, exit 2, as for ``convert``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mha2sha import zoo
from mha2sha.cli import main
from mha2sha.verify.htp import htp_available
from tests.split._graphs import attention_model

CASE = "llama_gqa_step"
FILES = ["attention.csv", "model.report.json", "ops.csv", "report.html"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_analyze_writes_the_report_and_no_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    assert main(["analyze", str(zoo.build(CASE)), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == FILES  # no model, no staging folder left
    stdout = capsys.readouterr().out
    assert f"Report: {out / 'report.html'}" in stdout
    blocks = _rows(out / "attention.csv")
    assert len(blocks) == zoo.case_info(CASE).layers
    for row in blocks:
        assert (row["heads"], row["kv_heads"], row["head_dim"], row["seq"], row["past"]) == ("8", "2", "12", "3", "14")
        assert (row["rope"], row["kv_cache"], row["would_split"], row["reason"]) == (
            "rotate_half", "past/present concat", "yes", "",
        )  # fmt: skip
    ops = {row["op_type"]: row for row in _rows(out / "ops.csv")}
    assert int(ops["MatMul"]["count"]) > 0 and int(ops["Softmax"]["count"]) == 2
    assert ops["Constant"]["note"] == "folded away once shapes are static"
    if htp_available():
        assert ops["MatMul"]["htp"] == ops["Softmax"]["htp"] == "yes", ops["MatMul"]
        assert "taken by the QNN EP (SM8650)" in ops["Softmax"]["reason"]
    else:
        assert {row["htp"] for row in ops.values()} == {"unknown"}
        assert "onnxruntime-qnn is not installed" in ops["MatMul"]["reason"]
    report = json.loads((out / "model.report.json").read_text())
    assert report["convertible"] and report["problems"] == []
    assert [k["label"] for k in report["attention"]["kinds"]] == ["A"]
    assert report["attention"]["kinds"][0]["sha"]["nodes"]  # the per-head drawing's graph
    # a second run into the same folder replaces the set
    assert main(["analyze", str(zoo.build(CASE)), "-o", str(out), "--no-htp-probe"]) == 0
    assert sorted(p.name for p in out.iterdir()) == FILES
    ops = {row["op_type"]: row for row in _rows(out / "ops.csv")}
    assert ops["MatMul"]["htp"] == "unknown" and ops["MatMul"]["reason"] == "HTP support not probed"


def _with_op_htp_rejects(tmp_path: Path) -> Path:
    """An attention block, then ``Mod(fmod=1)`` (QNN takes only fmod=0)."""
    proto = attention_model(4, 6, 8, None)
    graph = proto.graph
    graph.node.append(helper.make_node("Mod", ["y", "divisor"], ["z"], fmod=1, name="the_mod"))
    graph.initializer.append(numpy_helper.from_array(np.array(0.75, np.float32), "divisor"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 6, 32]))
    path = tmp_path / "mod.onnx"
    onnx.save(proto, path)
    return path


@pytest.mark.skipif(not htp_available(), reason="needs onnxruntime-qnn (pip install 'mha2sha[htp]')")
def test_an_op_htp_rejects_is_named_with_the_reason(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    assert main(["analyze", str(_with_op_htp_rejects(tmp_path)), "-o", str(out)]) == 0
    ops = {row["op_type"]: row for row in _rows(out / "ops.csv")}
    assert ops["Mod"]["htp"] == "no" and "fmod == 0" in ops["Mod"]["reason"], ops["Mod"]
    assert (ops["Mod"]["probed_nodes"], ops["Mod"]["rejected_nodes"]) == ("1", "1")
    assert ops["MatMul"]["htp"] == ops["Softmax"]["htp"] == "yes"
    probe = json.loads((out / "mod.report.json").read_text())["htp_probe"]
    assert probe["status"] == "ran" and probe["compiled"] is None  # partitioning stopped: nothing compiled
    assert probe["encodings"].startswith("generated, not yours")
    assert "Mod (" in capsys.readouterr().out


def _dynamic_attention(tmp_path: Path) -> Path:
    """The hand-built block with ``x [batch_size, sequence_length, 32]`` (reshapes copy dims: 0)."""
    proto = attention_model(4, 6, 8, None)
    for init in proto.graph.initializer:
        if init.name in ("split_shape", "merge_shape"):
            dims = [0, 0, 4, 8] if init.name == "split_shape" else [0, 0, 32]
            init.CopyFrom(numpy_helper.from_array(np.array(dims, np.int64), init.name))
    for value in (*proto.graph.input, *proto.graph.output):
        shape = value.type.tensor_type.shape.dim
        shape[0].dim_param, shape[1].dim_param = "batch_size", "sequence_length"
    path = tmp_path / "dyn.onnx"
    onnx.save(proto, path)
    return path


def test_dynamic_inputs_are_analysed_with_the_suggestion(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert main(["analyze", str(_dynamic_attention(tmp_path)), "-o", str(out), "--no-htp-probe"]) == 0
    report = json.loads((out / "dyn.report.json").read_text())
    assert report["shape_suggestion"] == "--batch-size 1 --seq-len 128"
    assert report["problems"] == [
        "convert needs static shapes; dynamic inputs: x [batch_size,sequence_length,32]. "
        "Pass: --batch-size 1 --seq-len 128"
    ]
    assert report["inputs"] == [
        {"name": "x", "dtype": "float", "declared": "[batch_size,sequence_length,32]", "used": "[1,128,32]", "dynamic": True}
    ]
    (block,) = report["attention"]["blocks"]
    assert block["would_split"] and (block["heads"], block["seq"]) == (4, 128)
    # the roles given: nothing left to suggest, nothing stops convert
    assert main(["analyze", str(tmp_path / "dyn.onnx"), "-o", str(out), "--no-htp-probe", "--seq-len", "16"]) == 0
    report = json.loads((out / "dyn.report.json").read_text())
    assert report["problems"] == [] and report["attention"]["blocks"][0]["seq"] == 16


def test_graphs_convert_refuses_are_reported(tmp_path: Path) -> None:
    """A fused op the lowering refuses stays a block that would not split, with the reason."""
    node = helper.make_node(
        "MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=4, name="mha"
    )
    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 6, 32]) for x in "qkv"]
    out_info = helper.make_tensor_value_info("qk", TensorProto.FLOAT, [1, 4, 6, 6])
    node.output.extend(["", "", "qk"])  # its attention-probabilities output cannot be lowered: refused
    graph = helper.make_graph([node], "fused", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 32]), out_info])
    path = tmp_path / "fused.onnx"
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    out = tmp_path / "r"
    assert main(["analyze", str(path), "-o", str(out), "--no-htp-probe"]) == 0
    report = json.loads((out / "fused.report.json").read_text())
    (block,) = report["attention"]["blocks"]
    assert block["fused_op"] == "com.microsoft.MultiHeadAttention" and not block["would_split"]
    assert block["heads"] == 4 and "not lowered" in block["reason"]
    assert not report["convertible"] and any("cannot be lowered" in p for p in report["problems"])
    ops = {row["op_type"]: row for row in _rows(out / "ops.csv")}
    assert ops["MultiHeadAttention"]["domain"] == "com.microsoft"


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda d: d / "missing.onnx", [], "model not found"),
        (lambda d: _write(d / "junk.onnx", b"not a model"), [], "not a valid ONNX model"),
        (lambda d: zoo.build(CASE), ["--encodings", "/nonexistent.encodings"], "cannot read"),
        (lambda d: zoo.build(CASE), ["--input-shape", "nope=1,2"], "not a model input"),
        (lambda d: zoo.build(CASE), ["-o-file"], "output folder is a file"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys, make, extra, message) -> None:
    model = make(tmp_path)
    out = tmp_path / "r"
    if extra == ["-o-file"]:
        out, extra = _write(tmp_path / "a_file", b"x"), []
    assert main(["analyze", str(model), "-o", str(out), "--no-htp-probe", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "r").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_encodings_coverage_and_the_probe_on_them(tmp_path: Path) -> None:
    """Real aimet-onnx encodings (W8A16): coverage of the model as given, the propagation to the
    per-head model as convert would do it (dry run), and the HTP probe quantized with them."""
    from tests.encodings.aimet_gen import aimet_available, aimet_encodings

    if not aimet_available():
        pytest.skip("needs aimet-onnx (make installs it)")
    calibration = [zoo.example_inputs(CASE), zoo.example_inputs(CASE, seed=1)]
    model, encodings = aimet_encodings(zoo.build(CASE), calibration, config="w8a16", version="1.0.0")
    out = tmp_path / "r"
    assert main(["analyze", str(model), "-o", str(out), "--encodings", str(encodings)]) == 0
    report = json.loads((out / "model.report.json").read_text())
    summary = report["encodings"]
    assert summary["version"] == "1.0.0" and summary["unknown"] == []
    assert summary["encoded_weights"] == summary["weights"] > 0
    # AIMET leaves the RoPE halves (Slice) and no-op Casts unencoded: listed, and nothing else
    assert summary["attention_tensors"] > 0 and set(summary["attention_unencoded"]) <= set(summary["unencoded_activations"])
    assert all(t.rsplit("/", 1)[-1].startswith(("Slice", "Cast")) for t in summary["attention_unencoded"])
    propagation = report["encodings_propagation"]
    assert propagation["ok"] and propagation["counts"]["missing"] == 0 and propagation["counts"]["sha_encoded"] > 0
    assert report["rank_gt_4_after_split"] is not None  # the dry run ran
    if htp_available():
        probe = report["htp_probe"]
        assert probe["status"] == "ran" and probe["encodings"] == f"user encodings ({encodings.name})"
        assert probe["nodes"] and all(n["taken"] for n in probe["nodes"]), [n for n in probe["nodes"] if not n["taken"]]
