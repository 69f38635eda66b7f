"""Attention inside subgraphs (optimum's merged decoders put the decoder in both If branches)."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from mha2sha.cli import main
from tests.split._graphs import attention_model


def _merged(path) -> None:
    """``If(use_cache_branch)`` with the same attention graph in both branches, reading x from outside."""
    attention = attention_model(4, 6, 8, None)
    branch = attention.graph
    branches = []
    for tag in ("then", "else"):
        g = onnx.GraphProto()
        g.CopyFrom(branch)
        g.name = tag
        del g.input[:]  # x comes from the outer scope
        branches.append(g)
    node = helper.make_node("If", ["use_cache_branch"], ["y"], then_branch=branches[0], else_branch=branches[1])
    graph = helper.make_graph(
        [node],
        "merged",
        [helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, []), *attention.graph.input],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    onnx.save(helper.make_model(graph, opset_imports=attention.opset_import), path)


def test_attention_in_if_branches_is_refused_in_one_line(tmp_path, capsys) -> None:
    src = tmp_path / "merged.onnx"
    _merged(src)
    assert main(["convert", str(src), "-o", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    line = next(x for x in out.splitlines() if "inside the If subgraphs" in x)
    assert "then_branch (1)" in line and "else_branch (1)" in line
    assert "Traceback" not in out + err and "No attention found" not in out
    assert not (tmp_path / "out").exists()
