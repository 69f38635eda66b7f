"""Bad input: one line on stderr, exit code 2, the input untouched, nothing written."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.split._graphs import attention_model

CLI = [sys.executable, "-m", "mha2sha.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "300"}  # no table wrapping in the assertions below
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=env)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "attn.onnx"
    onnx.save(attention_model(4, 6, 8, (1, 1, 6, 6)), path)
    return path


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_missing_path(tmp_path):
    assert_one_line_error(
        run("convert", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "out")), "not found"
    )
    assert_nothing_written(tmp_path / "out")


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 20)
    assert_one_line_error(run("convert", str(bad), "-o", str(tmp_path / "out")), "not a valid ONNX model")
    assert_nothing_written(tmp_path / "out")


def test_truncated_protobuf(tmp_path, model_path):
    data = model_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("convert", str(cut), "-o", str(tmp_path / "out")), "not a valid ONNX model")
    assert_nothing_written(tmp_path / "out")


def test_external_data_missing(tmp_path, model_path):
    model = onnx.load(model_path)
    ext = tmp_path / "ext" / "m.onnx"
    ext.parent.mkdir()
    onnx.save(
        model,
        ext,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.data",
        size_threshold=0,
    )
    (ext.parent / "m.data").unlink()
    before = digest(ext)
    assert_one_line_error(run("convert", str(ext), "-o", str(tmp_path / "out")), "external data file missing")
    assert digest(ext) == before
    assert_nothing_written(tmp_path / "out")


def test_dynamic_dims_need_input_shape(tmp_path, model_path):
    model = onnx.load(model_path)
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "sequence"
    dynamic = tmp_path / "dyn.onnx"
    onnx.save(model, dynamic)
    proc = run("convert", str(dynamic), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "dynamic: x [1,sequence,32]", "--seq-len 128")
    assert_nothing_written(tmp_path / "out")
    for fix in (["--input-shape", "x=1,6,32"], ["--seq-len", "6"]):
        fixed = run("convert", str(dynamic), "-o", str(tmp_path / "out"), *fix)
        assert fixed.returncode == 0, fixed.stderr
        assert (tmp_path / "out" / "dyn.onnx").is_file()


def test_bad_input_shape_syntax(tmp_path, model_path):
    assert_one_line_error(
        run("convert", str(model_path), "-o", str(tmp_path / "out"), "--input-shape", "x=1,a")
    )


def test_output_folder_not_writable(tmp_path, model_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(run("convert", str(model_path), "-o", str(blocker / "out")), "not writable")


def test_output_equal_to_input_is_refused(model_path):
    before = digest(model_path)
    assert_one_line_error(
        run("convert", str(model_path), "-o", str(model_path.parent)), "overwrite the input"
    )
    assert digest(model_path) == before


def test_success_leaves_input_untouched_and_no_staging(tmp_path, model_path):
    before = digest(model_path)
    out = tmp_path / "out"
    proc = run("convert", str(model_path), "-o", str(out), "--create-input-lists")
    assert proc.returncode == 0, proc.stderr
    assert digest(model_path) == before
    names = {p.name for p in out.iterdir()}
    assert {"attn.onnx", "mha_to_sha_names.json", "attn.report.json", "input_list.txt"} <= names
    assert not [n for n in names if n.startswith(".mha2sha-")]


def _no_attention_model(path: Path) -> None:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_no_attention_exits_zero_and_writes_nothing(tmp_path):
    src = tmp_path / "mlp.onnx"
    _no_attention_model(src)
    proc = run("convert", str(src), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "No attention found" in proc.stdout
    assert_nothing_written(tmp_path / "out")
    forced = run("convert", str(src), "-o", str(tmp_path / "out"), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "out" / "mlp.onnx").is_file()


def test_legacy_cli_converts(tmp_path, model_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from mha2sha.cli import legacy_main; sys.exit(legacy_main())",
         "--model-name", "legacy", "--exported-model-path", str(model_path), "--sha-export-path", str(tmp_path / "sha"),
         "--handle-rope-ops", "--handle-past-key-value", "--gqa-model", "--base-llm", "llama3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "sha" / "legacy.onnx").is_file()


def test_python_api(tmp_path, model_path):
    from mha2sha import MHA2SHAConverter

    model, status = MHA2SHAConverter("api", tmp_path / "sha", model_path, handle_rope_ops=True).convert()
    assert status is True
    assert sum(n.op_type == "Softmax" for n in model.graph) == 4


def test_unsupported_attention_is_left_untouched_and_reported(tmp_path):
    src = tmp_path / "odd.onnx"
    onnx.save(attention_model(4, 6, 8, None, softmax_axis=1), src)  # softmax across heads: not splittable
    out = tmp_path / "out"
    proc = run("convert", str(src), "-o", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "left as MHA" in proc.stdout and "Softmax" in proc.stdout
    assert_nothing_written(out)
    assert run("convert", str(src), "-o", str(out), "--allow-partial").returncode == 0
    assert not (out / "odd.onnx").exists()  # nothing split: nothing to write


def test_fused_attention_is_reported_not_ignored(tmp_path):
    """A fused attention op the lowering stage does not know is a block left multi-head, exit 1."""
    node = helper.make_node("PackedAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=4)
    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 6, 32]) for x in "qkv"]
    graph = helper.make_graph(
        [node], "fused", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 32])]
    )
    src = tmp_path / "fused.onnx"
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), src)
    proc = run("convert", str(src), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "fused com.microsoft.PackedAttention op" in proc.stdout
