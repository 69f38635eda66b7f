"""The rank check lists every tensor of rank > 4 (and nothing else)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import helper, numpy_helper

from mha2sha.layout import high_rank_tensors

from ._helpers import model, vi


def test_lists_rank_5_tensors() -> None:
    proto = model(
        [
            helper.make_node("Unsqueeze", ["k", "ax"], ["k5"], name="repeat_kv_unsqueeze"),
            helper.make_node("Expand", ["k5", "shape"], ["k5e"], name="repeat_kv_expand"),
            helper.make_node("Reshape", ["k5e", "flat"], ["y"]),
        ],
        [vi("k", [1, 2, 7, 4])],
        [vi("y", [1, 4, 7, 4])],
        [
            numpy_helper.from_array(np.array([2], np.int64), "ax"),
            numpy_helper.from_array(np.array([1, 2, 2, 7, 4], np.int64), "shape"),
            numpy_helper.from_array(np.array([1, 4, 7, 4], np.int64), "flat"),
        ],
    )
    found = high_rank_tensors(ir.from_proto(proto))
    assert [(t.name, t.shape, t.producer) for t in found] == [
        ("k5", (1, 2, 1, 7, 4), "Unsqueeze"),
        ("k5e", (1, 2, 2, 7, 4), "Expand"),
    ]
    assert high_rank_tensors(ir.from_proto(proto), max_rank=5) == []
