"""PerHeadOProjPass: each head's rows of W_o and an Add tree compute what Concat + o_proj did."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from mha2sha.layout import CancelLayoutPass, LayoutRecord, LinearToConvPass, PerHeadOProjPass
from mha2sha.split.record import SplitRecord

from ._helpers import check_pass, feed, model, ops, vi, weight

H, S, D, C = 4, 5, 3, 10


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2)


def _heads() -> list:
    return [vi(f"h{i}", [1, S, D]) for i in range(H)]


def test_matmul_o_proj_per_head(rng) -> None:
    bias = numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "bo")
    proto = model(
        [
            helper.make_node("Concat", [f"h{i}" for i in range(H)], ["cat"], axis=-1),
            helper.make_node("MatMul", ["cat", "Wo"], ["o"], name="o_proj"),
            helper.make_node("Add", ["o", "bo"], ["y"]),
        ],
        _heads(),
        [vi("y", [1, S, C])],
        [weight(rng, (H * D, C), "Wo"), bias],
    )
    record, split = LayoutRecord(), SplitRecord()
    p = PerHeadOProjPass(record, split)
    m = check_pass(proto, feed(rng, proto), p)
    assert record.o_proj == ["o_proj"]
    assert "Concat" not in ops(m) and ops(m).count("MatMul") == H and ops(m).count("Add") == H
    assert any(n.outputs[0].name == "o" for n in m.graph)  # the sum keeps the projection's name
    pieces = split.tensors["Wo"].pieces
    assert [pc.ranges for pc in pieces] == [((0, i * D, (i + 1) * D),) for i in range(H)]
    assert "Wo" not in m.graph.initializers
    assert len(record.new_activations) == 2 * H - 2  # H partials + H-2 inner sums
    # then Conv + cancellation: the Add tree runs in BD1L, one layout change back at the end
    m2 = check_pass(proto, feed(rng, proto), PerHeadOProjPass(), LinearToConvPass(), CancelLayoutPass())
    assert ops(m2).count("Conv") == H and "MatMul" not in ops(m2)
    assert ops(m2).count("Transpose") == H + 1


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_o_proj_through_reshape(rng, trans_b) -> None:
    """GPT-2 style: Concat [1,S,HD] -> Reshape [S,HD] -> Gemm(+C): only head 0 carries C."""
    shape = numpy_helper.from_array(np.array([S, H * D], np.int64), "shape")
    c = numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "c")
    w = weight(rng, (C, H * D) if trans_b else (H * D, C), "Wo")
    proto = model(
        [
            helper.make_node("Concat", [f"h{i}" for i in range(H)], ["cat"], axis=2),
            helper.make_node("Reshape", ["cat", "shape"], ["flat"]),
            helper.make_node("Gemm", ["flat", "Wo", "c"], ["y"], transB=trans_b, name="c_proj"),
        ],
        _heads(),
        [vi("y", [S, C])],
        [w, c, shape],
    )
    split = SplitRecord()
    p = PerHeadOProjPass(split_record=split)
    m = check_pass(proto, feed(rng, proto), p)
    gemms = [n for n in m.graph if n.op_type == "Gemm"]
    assert len(gemms) == H and sum(len(g.inputs) == 3 for g in gemms) == 1
    axis = 1 if trans_b else 0
    assert split.tensors["Wo"].pieces[1].ranges == ((axis, D, 2 * D),)


def test_left_alone(rng) -> None:
    """Concat on another axis, or a Concat with a second consumer: nothing to do."""
    proto = model(
        [
            helper.make_node("Concat", ["h0", "h1"], ["cat"], axis=1),
            helper.make_node("MatMul", ["cat", "W"], ["y"]),
            helper.make_node("Concat", ["h2", "h3"], ["cat2"], axis=-1),
            helper.make_node("MatMul", ["cat2", "W2"], ["z"]),
            helper.make_node("Relu", ["cat2"], ["r"]),
        ],
        _heads(),
        [vi("y", [1, 2 * S, C]), vi("z", [1, S, C]), vi("r", [1, S, 2 * D])],
        [weight(rng, (D, C), "W"), weight(rng, (2 * D, C), "W2")],
    )
    p = PerHeadOProjPass()
    m = check_pass(proto, feed(rng, proto), p)
    assert not p.record.o_proj and ops(m).count("Concat") == 2
    assert [s.reason for s in p.record.skipped] == ["its input is a Concat on axis 1, not the contracted last axis"]
