"""LinearToConvPass on hand-built graphs: every supported form becomes Conv 1x1, the rest is left."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from mha2sha.layout import LayoutRecord, LinearToConvPass

from ._helpers import check_pass, feed, model, ops, vi, weight

S, C, N = 5, 6, 7


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _conv_weight_of(m: ir.Model, conv: ir.Node) -> np.ndarray:
    return conv.inputs[1].const_value.numpy()


@pytest.mark.parametrize("x_shape", [[2, S, C], [S, C]], ids=["3d", "2d"])
def test_matmul_becomes_conv_and_keeps_names(rng, x_shape) -> None:
    proto = model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")],
        [vi("x", x_shape)],
        [vi("y", [*x_shape[:-1], N])],
        [weight(rng, (C, N), "W")],
    )
    record = LayoutRecord()
    p = LinearToConvPass(record)
    m = check_pass(proto, feed(rng, proto), p)
    assert "MatMul" not in ops(m) and ops(m).count("Conv") == 1
    conv = next(n for n in m.graph if n.op_type == "Conv")
    assert conv.inputs[0].shape == ir.Shape([x_shape[0] if len(x_shape) == 3 else 1, C, 1, S])
    # weight: same name, [out, in, 1, 1], lazily transposed; the axis move is recorded
    assert conv.inputs[1].name == "W" and "W" in m.graph.initializers
    assert isinstance(conv.inputs[1].const_value, ir.LazyTensor)
    w = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "W"))
    np.testing.assert_array_equal(_conv_weight_of(m, conv), w.T.reshape(N, C, 1, 1))
    remap = record.weights["W"]
    assert (remap.new_name, remap.new_shape, remap.axis_map) == ("W", (N, C, 1, 1), (1, 0))
    assert remap.channel_axis == (1, 0)
    assert [v.name for v in m.graph.outputs] == ["y"]
    assert all(n.op_type != "MatMul" for n in m.graph)
    assert p.record.conv == ["proj"] and not p.record.skipped


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (N,), (1, N)], ids=["nobias", "bias1d", "bias2d"])
def test_gemm(rng, trans_b, bias_shape) -> None:
    inits = [weight(rng, (N, C) if trans_b else (C, N), "B")]
    inputs = ["x", "B"]
    if bias_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "c"))
        inputs.append("c")
    proto = model(
        [helper.make_node("Gemm", inputs, ["y"], transB=trans_b, name="gemm")],
        [vi("x", [S, C])],
        [vi("y", [S, N])],
        inits,
    )
    record = LayoutRecord()
    m = check_pass(proto, feed(rng, proto), LinearToConvPass(record))
    assert "Gemm" not in ops(m)
    conv = next(n for n in m.graph if n.op_type == "Conv")
    assert len(conv.inputs) == (2 if bias_shape is None else 3)
    assert record.weights["B"].axis_map == ((0, 1) if trans_b else (1, 0))
    if bias_shape == (1, N):
        assert record.weights["c"].new_shape == (N,)


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_bias_fused(rng, bias_first) -> None:
    add_inputs = ["b", "mm"] if bias_first else ["mm", "b"]
    proto = model(
        [
            helper.make_node("MatMul", ["x", "W"], ["mm"], name="proj"),
            helper.make_node("Add", add_inputs, ["y"], name="bias"),
            helper.make_node("Relu", ["y"], ["z"]),
        ],
        [vi("x", [1, S, C])],
        [vi("z", [1, S, N])],
        [weight(rng, (C, N), "W"), numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b")],
    )
    record = LayoutRecord()
    m = check_pass(proto, feed(rng, proto), LinearToConvPass(record))
    assert "Add" not in ops(m) and "MatMul" not in ops(m)
    conv = next(n for n in m.graph if n.op_type == "Conv")
    assert conv.inputs[2].name == "b"
    assert any(n.outputs[0].name == "y" for n in m.graph)  # the Add's output name survives
    assert "mm" in record.fused


def test_bias_not_fused_when_matmul_output_has_other_users(rng) -> None:
    proto = model(
        [
            helper.make_node("MatMul", ["x", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["y"]),
            helper.make_node("Mul", ["mm", "y"], ["z"]),
        ],
        [vi("x", [1, S, C])],
        [vi("z", [1, S, N])],
        [weight(rng, (C, N), "W"), numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b")],
    )
    m = check_pass(proto, feed(rng, proto), LinearToConvPass())
    assert ops(m).count("Add") == 1 and "MatMul" not in ops(m)


def test_left_alone_and_reported(rng) -> None:
    """Dynamic weight, batched weight, 4-D activation, Gemm alpha: unchanged, each with a reason."""
    proto = model(
        [
            helper.make_node("MatMul", ["x", "w_dyn"], ["a"], name="dynamic"),
            helper.make_node("MatMul", ["x", "W3"], ["b"], name="batched"),
            helper.make_node("MatMul", ["x4", "W"], ["c"], name="rank4"),
            helper.make_node("Gemm", ["x2", "W"], ["d"], alpha=0.5, name="alpha"),
        ],
        [vi("x", [2, S, C]), vi("w_dyn", [C, N]), vi("x4", [1, 2, S, C]), vi("x2", [S, C])],
        [vi("a", [2, S, N]), vi("b", [2, S, N]), vi("c", [1, 2, S, N]), vi("d", [S, N])],
        [weight(rng, (2, C, N), "W3"), weight(rng, (C, N), "W")],
    )
    p = LinearToConvPass()
    m = check_pass(proto, feed(rng, proto), p)
    assert "Conv" not in ops(m)
    assert sorted(s.node for s in p.record.skipped) == ["alpha", "batched", "dynamic", "rank4"]
    reasons = {s.node: s.reason for s in p.record.skipped}
    assert "run time" in reasons["dynamic"] and "alpha" in reasons["alpha"]
    assert "[in, out]" in reasons["batched"] and "[B,S,C]" in reasons["rank4"]


def test_shared_weight_and_shared_input(rng) -> None:
    """q/k/v-like: one input layout change for all consumers; a weight also used by a Gather keeps
    its original and the Conv gets ``<name>.conv``."""
    ids = numpy_helper.from_array(np.array([[0, 3]], np.int64), "ids")
    proto = model(
        [
            helper.make_node("MatMul", ["x", "Wq"], ["q"]),
            helper.make_node("MatMul", ["x", "Wk"], ["k"]),
            helper.make_node("Gather", ["Wk", "ids"], ["emb"]),
        ],
        [vi("x", [1, S, C])],
        [vi("q", [1, S, N]), vi("k", [1, S, N]), vi("emb", [1, 2, N])],
        [weight(rng, (C, N), "Wq"), weight(rng, (C, N), "Wk"), ids],
    )
    record = LayoutRecord()
    m = check_pass(proto, feed(rng, proto), LinearToConvPass(record))
    assert ops(m).count("Transpose") == 3  # one for x, one per Conv output
    assert record.weights["Wq"].new_name == "Wq"
    assert record.weights["Wk"].new_name == "Wk.conv"
    assert {"Wk", "Wk.conv", "Wq"} <= set(m.graph.initializers)


def test_consecutive_projections(rng) -> None:
    """A projection feeding a projection (LoRA A -> B) uses the rewritten value, not a dead one."""
    proto = model(
        [
            helper.make_node("MatMul", ["x", "A"], ["a"]),
            helper.make_node("MatMul", ["a", "B"], ["y"]),
        ],
        [vi("x", [1, S, C])],
        [vi("y", [1, S, N])],
        [weight(rng, (C, 3), "A"), weight(rng, (3, N), "B")],
    )
    m = check_pass(proto, feed(rng, proto), LinearToConvPass())
    assert ops(m).count("Conv") == 2 and "MatMul" not in ops(m)


def test_float16(rng) -> None:
    w = numpy_helper.from_array(rng.normal(0, C**-0.5, (C, N)).astype(np.float16), "W")
    proto = model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [vi("x", [1, S, C], TensorProto.FLOAT16)],
        [vi("y", [1, S, N], TensorProto.FLOAT16)],
        [w],
    )
    feeds = {"x": rng.standard_normal((1, S, C)).astype(np.float16)}
    m = check_pass(proto, feeds, LinearToConvPass())
    assert "Conv" in ops(m) and "MatMul" not in ops(m)


def test_weights_stay_lazy(rng) -> None:
    """The pass never reads a weight: the transposed copy is computed only when the model is saved."""
    proto = model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [vi("x", [1, S, C])],
        [vi("y", [1, S, N])],
        [weight(rng, (C, N), "W")],
    )
    m = ir.from_proto(proto)
    original = m.graph.initializers["W"].const_value
    reads = []

    def load() -> ir.TensorProtocol:
        reads.append(1)
        return original

    m.graph.initializers["W"].const_value = ir.LazyTensor(load, original.dtype, original.shape, name="W")
    LinearToConvPass()(m)
    assert reads == []
    ir.serde.serialize_model(m)
    assert reads == [1]
