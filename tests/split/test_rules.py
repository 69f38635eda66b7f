"""One test row per split rule row: the per-head computation equals the piece of the whole.

For each row of :data:`mha2sha.split.rules.RULES` a one-node graph is cut per head on its output
(walk + emitter, exactly as in a conversion); onnxruntime then runs the graph with every head's
piece as an output and each piece must equal the matching slice of the original output. Shapes are
adversarial on purpose: batch, heads, sequence and head dim are all 4 where the op allows, so a
rule that decided from a dimension's size instead of the dataflow would cut the wrong axis.
Rows that must refuse a cut (the op mixes heads) are checked to raise ``Unsplittable``; forward
rules are checked to round-trip through their backward rule.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mha2sha.graph import BROADCAST_OPS, UNARY_OPS
from mha2sha.split.emit import Emitter
from mha2sha.split.record import SplitRecord
from mha2sha.split.rules import RULES, Unsplittable, rule_of
from mha2sha.split.spec import AxisCut, HeadSpec, piece_ranges
from mha2sha.split.walk import Region, walk_back

N = 4  # every size: B = H = S = D = 4


@dataclasses.dataclass
class Row:
    """A one-node graph: ``inputs`` are (name, shape, dtype, constant value or None for a graph input)."""

    op: str
    inputs: list[tuple[str, tuple[int, ...], int, np.ndarray | None]]
    spec: HeadSpec
    attrs: dict = dataclasses.field(default_factory=dict)
    refuse: str = ""  # substring of the Unsplittable message, when the cut must be refused
    opset: int = 21
    out_index: int = 0
    outputs: int = 1
    heads: int = 0  # heads to emit (default: the product of the cut counts)
    id: str = ""
    out_shape: tuple[int, ...] | None = None  # for ops ONNX shape inference does not know


F = TensorProto.FLOAT
I64 = TensorProto.INT64
B = TensorProto.BOOL


def x(name: str = "x", shape: tuple[int, ...] = (N, N, N, N), dtype: int = F) -> tuple:
    return (name, shape, dtype, None)


def c(name: str, array: np.ndarray | list, dtype: int = I64) -> tuple:
    arr = np.asarray(array, dtype=helper.tensor_dtype_to_np_dtype(dtype))
    return (name, arr.shape, dtype, arr)


H1 = (AxisCut(1, 0, 1, N),)  # heads on axis 1, one element each: [B, H, S, D]
H2 = (AxisCut(2, 0, 1, N),)


def _broadcast_rows() -> list[Row]:
    rows = []
    for op in sorted(BROADCAST_OPS):
        dtype = {"And": B, "Or": B, "Xor": B, "BitShift": TensorProto.UINT32, "Mod": TensorProto.INT32}.get(op, F)
        if op == "Where":
            ins = [x("cond", dtype=B), x("a", (N, 1, N, N)), x("b", (N,))]
        else:  # a head-shared [S, D] operand and a per-head [B, H, S, D] one
            ins = [x("a", dtype=dtype), x("b", (N, N), dtype)]
        attrs = {"direction": "LEFT"} if op == "BitShift" else {}
        rows.append(Row(op, ins, H1, attrs, id=op))
    return rows


def _unary_rows() -> list[Row]:
    rows = []
    for op in sorted(UNARY_OPS):
        dtype = B if op == "Not" else F
        ins = [x("a", dtype=dtype)]
        attrs: dict = {}
        if op in ("Cast",):
            attrs = {"to": TensorProto.DOUBLE}
        if op == "CastLike":
            ins.append(c("like", np.zeros((1,), np.float64), TensorProto.DOUBLE))
        if op == "Clip":
            ins += [c("lo", np.float32(-0.5), F), c("hi", np.float32(0.5), F)]
        rows.append(Row(op, ins, H1, attrs, id=op))
    return rows


ROWS: list[Row] = [
    *_broadcast_rows(),
    *_unary_rows(),
    Row("Softmax", [x()], H1, {"axis": -1}, id="Softmax"),
    Row("Softmax", [x()], H1, {"axis": 1}, refuse="across the head axis", id="Softmax-head-axis"),
    Row("LogSoftmax", [x()], H2, {"axis": 3}, id="LogSoftmax"),
    Row("CumSum", [x(), c("axis", np.int64(2))], H1, id="CumSum"),
    Row("CumSum", [x(), c("axis", np.int64(1))], H1, refuse="across the head axis", id="CumSum-head-axis"),
    Row("LayerNormalization", [x(), c("g", np.ones(N), F), c("b", np.zeros(N), F)], H1, {"axis": -1}, id="LayerNormalization"),
    Row("SimplifiedLayerNormalization", [x(), c("g", np.ones(N), F)], H1, {"axis": -1}, opset=17,
        out_shape=(N, N, N, N), id="SimplifiedLayerNormalization"),
    Row("RMSNormalization", [x(), c("g", np.ones(N), F)], H1, {"axis": -1}, opset=23, id="RMSNormalization"),
    Row("LayerNormalization", [x(), c("g", np.ones((N, N)), F)], H2, {"axis": 2}, refuse="normalises across", id="LayerNormalization-head-axis"),
    *[
        Row(op, [x(), c("axes", [3])], H1, {"keepdims": 0}, id=op)
        for op in "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL2 ReduceSumSquare".split()
    ],
    Row("ReduceSum", [x(), c("axes", [1])], (AxisCut(1, 0, 1, N),), {"keepdims": 1}, refuse="reduces the head axis", id="ReduceSum-head-axis"),
    Row("Transpose", [x()], H2, {"perm": [0, 2, 1, 3]}, id="Transpose"),
    Row("Reshape", [x("x", (N, N, N * N)), c("shape", [N, N, N, N])], H2, id="Reshape-split-heads"),
    Row("Reshape", [x(), c("shape", [N, N, N * N])], (AxisCut(2, 0, N, N),), id="Reshape-merge-heads"),
    Row("Flatten", [x()], (AxisCut(1, 0, N * N, N),), {"axis": 1}, id="Flatten"),
    Row("Squeeze", [x("x", (1, N, N, N)), c("axes", [0])], (AxisCut(0, 0, 1, N),), id="Squeeze"),
    Row("Unsqueeze", [x("x", (N, N, N)), c("axes", [0])], H1, id="Unsqueeze"),
    Row("Expand", [x("x", (N, 1, N, N)), c("shape", [N, N, N, N])], H1, id="Expand-shared"),
    Row("Expand", [x("x", (N, N, 1, N)), c("shape", [N, N, N, N])], H1, id="Expand-per-head"),
    # repeat_kv as Unsqueeze -> Tile: [B, Hkv, 1, S, D] tiled to [B, Hkv, g, S, D], GQA Hkv=2, g=2
    Row("Tile", [x("x", (1, 2, 1, N, N)), c("repeats", [1, 1, 2, 1, 1])],
        (AxisCut(1, 0, 1, 2, div=2), AxisCut(2, 0, 1, 2)), id="Tile-repeat-kv"),
    Row("Tile", [x("x", (1, 2, N, N)), c("repeats", [1, 2, 1, 1])], H1, id="Tile-whole-heads"),
    Row("Tile", [x("x", (1, 3, N, N)), c("repeats", [1, 2, 1, 1])], (AxisCut(1, 0, 2, 3),),
        refuse="straddle", id="Tile-straddling"),
    Row("MatMul", [x("a"), x("b")], H1, id="MatMul-batched"),
    Row("MatMul", [x("a", (N, N, N)), x("w", (N, N * N))], (AxisCut(2, 0, N, N),), id="MatMul-weight-columns"),
    Row("MatMul", [x("a", (N, N, N)), x("w", (N, N * N))], (AxisCut(1, 0, 1, N),), id="MatMul-rows"),
    Row("Gemm", [x("a", (N, N)), x("w", (N * N, N)), x("bias", (N * N,))], (AxisCut(1, 0, N, N),),
        {"transB": 1}, id="Gemm"),
    Row("Conv", [x("x", (1, N * N, 1, N)), x("w", (N * N, N * N, 1, 1)), x("bias", (N * N,))],
        (AxisCut(1, 0, N, N),), id="Conv"),
    Row("Conv", [x("x", (1, N * N, 1, N)), x("w", (N * N, N, 1, 1))], (AxisCut(1, 0, N, N),),
        {"group": N}, refuse="grouped Conv", id="Conv-grouped"),
    Row("Slice", [x("x", (N, N, N, 3 * N)), c("s", [N]), c("e", [2 * N]), c("a", [3])], (AxisCut(3, 0, 1, N),),
        id="Slice-other-axis"),
    Row("Slice", [x("x", (N, 3 * N, N, N)), c("s", [N]), c("e", [2 * N]), c("a", [1])], H1, id="Slice-head-axis"),
    Row("Split", [x("x", (N, 3 * N, N, N)), c("sizes", [N, N, N])], H1, {"axis": 1}, out_index=1, outputs=3,
        id="Split-packed-qkv"),
    Row("Gather", [x("x", (N, N, N)), c("idx", [[0, 2], [1, 3]])], (AxisCut(0, 0, 1, N),), {"axis": 1},
        id="Gather"),
    Row("Gather", [x("x", (N, N, N)), c("idx", [0, 2])], (AxisCut(1, 0, 1, 2),), {"axis": 1},
        refuse="indices carry the head axis", id="Gather-head-axis"),
    Row("Concat", [x("a", (N, N, 2, N)), x("b", (N, N, 2, N))], H1, {"axis": 2}, id="Concat-other-axis"),
    Row("Concat", [x("a", (N, N, N, N)), x("b", (N, N, N, N))], (AxisCut(1, N, 1, N),), {"axis": 1},
        id="Concat-head-axis"),
    Row("Concat", [x("a", (N, 2, N, N)), x("b", (N, 2, N, N))], H1, {"axis": 1},
        refuse="spans several inputs", id="Concat-spanning"),
]


def _model(row: Row) -> tuple[ir.Model, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    graph_inputs, inits, feeds = [], [], {}
    for name, shape, dtype, value in row.inputs:
        if value is not None:
            inits.append(numpy_helper.from_array(value, name))
            continue
        graph_inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        if dtype == B:
            feeds[name] = rng.random(shape) > 0.5
        elif np.issubdtype(np_dtype, np.integer):
            feeds[name] = rng.integers(1, 7, shape).astype(np_dtype)
        else:
            feeds[name] = (rng.standard_normal(shape) * 0.5 + (1.5 if row.op in ("Log", "Sqrt") else 0)).astype(np_dtype)
    outs = [f"y{i}" for i in range(row.outputs)]
    node = helper.make_node(row.op, [name for name, *_ in row.inputs], outs, name="op", **row.attrs)
    if row.out_shape is not None:
        declared = [helper.make_tensor_value_info(outs[0], F, row.out_shape)]
    else:
        declared = [helper.make_tensor_value_info(o, 0, None) for o in outs]
    graph = helper.make_graph([node], "row", graph_inputs, declared, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", row.opset)])
    if row.out_shape is None:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    return ir.from_proto(proto), feeds


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def test_every_rule_row_has_a_test_row() -> None:
    assert set(RULES) <= {row.op for row in ROWS}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_rule_row(row: Row) -> None:
    model, feeds = _model(row)
    whole = _run(model, feeds)[f"y{row.out_index}"]
    out = model.graph.node(0).outputs[row.out_index]
    region = Region()
    if row.refuse:
        with pytest.raises(Unsplittable, match=row.refuse):
            rule = rule_of(model.graph.node(0))
            assert rule is not None
            rule.backward(model.graph.node(0), row.out_index, row.spec)
        return
    walk_back(region, out, row.spec, cut_cache_inputs=True)
    step = region.get(out, row.spec)
    assert step.kind == "node", step.reason  # the rule handled the op, nothing was cut as is
    emitter = Emitter(model.graph, SplitRecord())
    heads = row.heads or int(np.prod([cut.count * cut.div for cut in row.spec]))
    pieces = {h: emitter.piece(region, out, row.spec, h) for h in range(heads)}
    model.graph.outputs.extend({id(p): p for p in pieces.values()}.values())
    got = _run(model, feeds)
    for head, piece in pieces.items():
        index = [slice(None)] * whole.ndim
        for axis, start, stop in piece_ranges(row.spec, head):
            index[axis] = slice(start, stop)
        np.testing.assert_array_equal(got[piece.name], whole[tuple(index)], err_msg=f"head {head}")


@pytest.mark.parametrize("row", [r for r in ROWS if RULES[r.op].forward and not r.refuse], ids=lambda r: r.id)
def test_forward_rule_round_trips(row: Row) -> None:
    """Pushing a cut forward through data movement and walking it back gives the cut again."""
    model, _ = _model(row)
    node = model.graph.node(0)
    rule = RULES[row.op]
    assert rule.forward is not None
    (in_spec, *_) = rule.backward(node, 0, row.spec)
    assert in_spec is not None
    assert rule.backward(node, 0, rule.forward(node, in_spec))[0] == in_spec
