"""Bad input to build-ar: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mha2sha import zoo

CLI = [sys.executable, "-m", "mha2sha.cli", "build-ar"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "300"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)


def refused(proc: subprocess.CompletedProcess, out: Path, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--ar", "0"], ["AR (tokens per step) must be at least 1"]),
        (["--ar", "17"], ["CL must be at least AR + 1"]),  # CL 17: AR 17 leaves no past
        (["--ar", "3", "--cl", "3"], ["--cl 3", "CL must be at least AR + 1"]),
        (["--ar", "1,30", "--cl", "24"], ["--ar 30 --cl 24"]),
        (["--ar", "1,1"], ["given twice"]),
        (["--ar", "x"], ["comma-separated"]),
    ],
)
def test_ar_cl_out_of_range(args, fragments, tmp_path):
    out = tmp_path / "out"
    refused(run(str(zoo.build("prepared_llama_gqa_step")), "-o", str(out), *args), out, *fragments)


def test_cl_change_of_a_prefill_graph(tmp_path):
    out = tmp_path / "out"
    proc = run(str(zoo.build("llama_prefill")), "--ar", "4", "--cl", "20", "-o", str(out))
    refused(proc, out, "no KV cache", "prefill")


def test_dynamic_dims_say_what_to_fix(tmp_path):
    model = onnx.load(str(zoo.build("llama_step")))
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_param = "sequence_length"
    source = tmp_path / "dynamic.onnx"
    onnx.save(model, source)
    out = tmp_path / "out"
    refused(run(str(source), "--ar", "1", "-o", str(out)), out, "input_ids", "--input-shape input_ids=1,")
    # and with the dims fixed it works
    proc = run(str(source), "--ar", "1", "-o", str(out), "--input-shape", "input_ids=1,3")
    assert proc.returncode == 0, proc.stderr


def test_no_token_input(tmp_path):
    out = tmp_path / "out"
    refused(run(str(zoo.build("vit")), "--ar", "1", "-o", str(out)), out, "cannot trace the AR axis")


def _fixed_size_input_model(path: Path) -> None:
    """input_ids [1,3] -> embedding [1,3,8] + bias input [1,3,8] (no AR role: its 3 is fixed)."""
    table = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32), "table"
    )
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"], name="embed"),
        helper.make_node("Add", ["emb", "bias"], ["logits"], name="add_bias"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 3]),
         helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 3, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 8])],
        [table],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_ar_meets_a_fixed_size(tmp_path):
    source = tmp_path / "fixed.onnx"
    _fixed_size_input_model(source)
    out = tmp_path / "out"
    refused(run(str(source), "--ar", "1", "-o", str(out)), out, "node 'add_bias' (Add)", "'bias'")


def test_missing_model(tmp_path):
    out = tmp_path / "out"
    refused(run(str(tmp_path / "nope.onnx"), "--ar", "1", "-o", str(out)), out, "model not found")


def test_fused_attention_is_refused_with_the_way_out(tmp_path):
    """A dynamo opset-23 export keeps SDPA as one ``Attention`` node: build-ar names it and says that
    ``convert --ar`` (which lowers fused attention first) handles the graph."""
    source = zoo.build("llama_gqa_step_sdpa", "dynamo23")
    out = tmp_path / "out"
    refused(run(str(source), "--ar", "1", "-o", str(out)), out, "(Attention)", "convert --ar")


def test_convert_ar_lowers_fused_attention_first(tmp_path):
    from mha2sha.cli import main

    source = zoo.build("llama_gqa_step_sdpa", "dynamo23")
    assert main(["convert", str(source), "-o", str(tmp_path), "--ar", "1,8", "--cl", "24"]) == 0
    assert (tmp_path / "model_ar1_cl24.onnx").exists() and (tmp_path / "model_ar8_cl24.onnx").exists()
