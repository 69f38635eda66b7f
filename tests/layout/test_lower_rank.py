"""LowerRankPass: the rank > 4 views the split leaves (HF mask Gather, dynamo GatherND index,
Bloom's per-head packed q|k|v view) become rank <= 4 with the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from mha2sha.io.prepare import prepare_for_split
from mha2sha.layout import high_rank_tensors
from mha2sha.layout.lower_rank import LowerRankPass

from ._helpers import run


def _model(nodes, inputs, outputs, inits) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    prepare_for_split(model)
    return model


def _mask_gather() -> ir.Model:
    """HF mask construction: a [S, 1] column gathered by [1, 1, 1, S] indices -> [1, 1, 1, S, 1]."""
    s = 6
    return _model(
        [
            helper.make_node("Reshape", ["m", "col"], ["column"]),
            helper.make_node("Gather", ["column", "idx"], ["picked"], axis=0),
            helper.make_node("Reshape", ["picked", "four"], ["mask4"]),
            helper.make_node("Cast", ["mask4"], ["y"], to=TensorProto.FLOAT),
        ],
        [helper.make_tensor_value_info("m", TensorProto.BOOL, [1, s])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, s])],
        [
            numpy_helper.from_array(np.array([s, 1], np.int64), "col"),
            numpy_helper.from_array(np.arange(s)[::-1].reshape(1, 1, 1, s).astype(np.int64), "idx"),
            numpy_helper.from_array(np.array([1, 1, 1, s], np.int64), "four"),
        ],
    )


def _packed_qkv() -> ir.Model:
    """Bloom per head: [B, S, 3D] viewed as [B, S, 1, 3, D]; Gathers pick q, k, v on axis 3."""
    s, d = 5, 4
    nodes = [helper.make_node("Reshape", ["x", "view"], ["qkv"])]
    outs = []
    for i, part in enumerate("qkv"):
        nodes += [
            helper.make_node("Gather", ["qkv", f"i{i}"], [f"{part}4"], axis=3),
            helper.make_node("Reshape", [f"{part}4", "three"], [part]),
        ]
        outs.append(helper.make_tensor_value_info(part, TensorProto.FLOAT, [1, s, d]))
    # one Gather output also read by a Mul: it keeps its 4-D shape through a Reshape back
    nodes.append(helper.make_node("Mul", ["q4", "q4"], ["q_sq"]))
    outs.append(helper.make_tensor_value_info("q_sq", TensorProto.FLOAT, [1, s, 1, d]))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, s, 3 * d])],
        outs,
        [numpy_helper.from_array(np.array([1, s, 1, 3, d], np.int64), "view")]
        + [numpy_helper.from_array(np.array(i, np.int64), f"i{i}") for i in range(3)]
        + [numpy_helper.from_array(np.array([1, s, d], np.int64), "three")],
    )


def _gather_nd() -> ir.Model:
    """dynamo's mask indexing: GatherND(mask [1, S], constant indices [1, 1, 1, S, 2])."""
    s = 7
    index = np.stack([np.zeros(s, np.int64), np.arange(s)[::-1] - s], -1).reshape(1, 1, 1, s, 2)
    return _model(
        [helper.make_node("GatherND", ["m", "idx"], ["y"])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, s])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, s])],
        [numpy_helper.from_array(index, "idx")],
    )


@pytest.mark.parametrize("build", [_mask_gather, _packed_qkv, _gather_nd])
def test_rank_above_4_is_lowered_with_the_same_outputs(build) -> None:
    model = build()
    assert high_rank_tensors(model)
    rng = np.random.default_rng(0)
    inputs = {}
    for v in model.graph.inputs:
        shape = tuple(v.shape)
        inputs[v.name] = rng.normal(size=shape).astype(np.float32) if v.dtype == ir.DataType.FLOAT else (
            rng.random(shape) > 0.5)  # fmt: skip
    before = run(model, inputs)
    names_before = {o.name for o in model.graph.outputs}
    result = LowerRankPass()(model)
    assert result.modified
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert high_rank_tensors(model) == []
    assert {o.name for o in model.graph.outputs} == names_before
    after = run(model, inputs)
    for name, expected in before.items():
        np.testing.assert_array_equal(after[name], expected)


def test_unknown_readers_keep_the_tensor() -> None:
    """A rank-5 tensor read by an op the pass cannot re-express stays as it is (and is reported)."""
    model = _packed_qkv()
    qkv = next(n for n in model.graph if n.op_type == "Reshape").outputs[0]
    extra = ir.Node("", "Relu", [qkv])
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    extra.outputs[0].name = "relu_out"
    assert not LowerRankPass()(model).modified
    assert [t.name for t in high_rank_tensors(model)] == ["qkv"]
