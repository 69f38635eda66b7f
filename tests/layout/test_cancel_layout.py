"""CancelLayoutPass on hand-built graphs: only provable identities go, outputs never change."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from mha2sha.layout import CancelLayoutPass, LayoutRecord, LinearToConvPass

from ._helpers import check_pass, feed, model, ops, vi, weight


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1)


def _shape(name: str, values: list[int]):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def test_transpose_pair_cancels_and_name_moves(rng) -> None:
    proto = model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t1"], perm=[0, 2, 1]),
            helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
            helper.make_node("Sigmoid", ["t2"], ["y"]),
        ],
        [vi("x", [2, 3, 4])],
        [vi("y", [2, 3, 4])],
        [],
    )
    record = LayoutRecord()
    m = check_pass(proto, feed(rng, proto), CancelLayoutPass(record))
    assert ops(m) == ["Relu", "Sigmoid"]
    assert record.moved == {"t1": "r", "t2": "r"}


def test_chain_collapses_to_one_op(rng) -> None:
    """Reshape -> Reshape -> Transpose -> Reshape: the two Reshapes merge; the rest needs 3 ops."""
    proto = model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Reshape", ["r", "s1"], ["a"]),
            helper.make_node("Reshape", ["a", "s2"], ["b"]),
            helper.make_node("Transpose", ["b"], ["c"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["c", "s3"], ["d"]),
            helper.make_node("Neg", ["d"], ["y"]),
        ],
        [vi("x", [1, 6, 8])],
        [vi("y", [1, 2, 24])],
        [_shape("s1", [1, 48]), _shape("s2", [1, 6, 2, 4]), _shape("s3", [1, 2, 24])],
    )
    m = check_pass(proto, feed(rng, proto), CancelLayoutPass())
    layout = [o for o in ops(m) if o in ("Reshape", "Transpose")]
    assert layout == ["Reshape", "Transpose", "Reshape"]


def test_general_chain_left(rng) -> None:
    """[4,3] -> T -> reshape [6,2] mixes elements: not describable, kept as is."""
    proto = model(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
            helper.make_node("Reshape", ["t", "s"], ["y"]),
        ],
        [vi("x", [4, 3])],
        [vi("y", [6, 2])],
        [_shape("s", [6, 2])],
    )
    m = check_pass(proto, feed(rng, proto), CancelLayoutPass())
    assert ops(m) == ["Transpose", "Reshape"]


def test_graph_output_keeps_name_and_shape(rng) -> None:
    proto = model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t1"], perm=[1, 0]),
            helper.make_node("Transpose", ["t1"], ["y"], perm=[1, 0]),
        ],
        [vi("x", [3, 5])],
        [vi("y", [3, 5])],
        [],
    )
    m = check_pass(proto, feed(rng, proto), CancelLayoutPass())
    assert [(v.name, tuple(v.shape)) for v in m.graph.outputs] == [("y", (3, 5))]


def test_sink_through_elementwise(rng) -> None:
    """Add(T(a), T(b)) * 2 -> T(Add(a, b) * 2): one Transpose instead of two."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    proto = model(
        [
            helper.make_node("Transpose", ["a"], ["ta"], perm=[0, 2, 1]),
            helper.make_node("Transpose", ["b"], ["tb"], perm=[0, 2, 1]),
            helper.make_node("Add", ["ta", "tb"], ["s"]),
            helper.make_node("Mul", ["s", "two"], ["y"]),
        ],
        [vi("a", [1, 3, 4]), vi("b", [1, 3, 4])],
        [vi("y", [1, 4, 3])],
        [two],
    )
    m = check_pass(proto, feed(rng, proto), CancelLayoutPass())
    assert ops(m).count("Transpose") == 1
    assert m.graph.outputs[0].name == "y"


def test_no_sink_across_broadcast(rng) -> None:
    """A non-scalar operand would broadcast differently in the other layout: nothing moves."""
    bias = numpy_helper.from_array(rng.standard_normal((1, 4, 1)).astype(np.float32), "bias")
    proto = model(
        [
            helper.make_node("Transpose", ["a"], ["ta"], perm=[0, 2, 1]),
            helper.make_node("Transpose", ["b"], ["tb"], perm=[0, 2, 1]),
            helper.make_node("Add", ["ta", "tb"], ["s"]),
            helper.make_node("Add", ["s", "bias"], ["y"]),
        ],
        [vi("a", [1, 3, 4]), vi("b", [1, 3, 4])],
        [vi("y", [1, 4, 3])],
        [bias],
    )
    m = check_pass(proto, feed(rng, proto), CancelLayoutPass())
    assert ops(m).count("Transpose") == 1  # the first Add region still sinks; the bias Add stays after
    assert [n.op_type for n in m.graph][-1] == "Add"


def test_mlp_between_convs_is_layout_free(rng) -> None:
    """SiLU-gated MLP after LinearToConv: no Transpose/Reshape between the three Convs."""
    H, F = 8, 12
    proto = model(
        [
            helper.make_node("MatMul", ["x", "Wg"], ["g"]),
            helper.make_node("MatMul", ["x", "Wu"], ["u"]),
            helper.make_node("Sigmoid", ["g"], ["sg"]),
            helper.make_node("Mul", ["g", "sg"], ["silu"]),
            helper.make_node("Mul", ["silu", "u"], ["h"]),
            helper.make_node("MatMul", ["h", "Wd"], ["y"]),
        ],
        [vi("x", [1, 5, H])],
        [vi("y", [1, 5, H])],
        [weight(rng, (H, F), "Wg"), weight(rng, (H, F), "Wu"), weight(rng, (F, H), "Wd")],
    )
    record = LayoutRecord()
    m = check_pass(proto, feed(rng, proto), LinearToConvPass(record), CancelLayoutPass(record))
    seq = ops(m)
    first, last = seq.index("Conv"), len(seq) - 1 - seq[::-1].index("Conv")
    assert not {"Transpose", "Reshape"} & set(seq[first:last]), seq
    assert seq.count("Transpose") == 2 and seq.count("Reshape") == 2
    # the MLP's original tensor names now sit on the BD1L tensors (their encodings still apply)
    names = {v.name for n in m.graph for v in n.outputs}
    assert {"g", "u", "sg", "silu", "h", "y"} <= names
    assert not (set(record.aliases) - names)
