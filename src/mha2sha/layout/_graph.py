"""Small graph-editing helpers shared by the layout passes (naming, constants, layout-op reading)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from mha2sha.graph import LAYOUT_OPS, is_op, static_shape
from mha2sha.io.names import UniqueNames
from mha2sha.layout.algebra import Step

__all__ = ["GENERATED", "Editor", "is_generated", "layout_step"]

#: ``Value.meta`` key marking tensors a layout pass created (their names carry no encoding).
GENERATED = "mha2sha.layout.generated"


def is_generated(value: ir.Value) -> bool:
    return bool(value.meta.get(GENERATED, False))


def _is_io(value: ir.Value) -> bool:
    return value.is_graph_input() or value.is_graph_output() or value.is_initializer()


def layout_step(node: ir.Node) -> Step | None:
    """The data movement ``node`` performs, when it is a layout op with static shapes."""
    if not is_op(node, LAYOUT_OPS) or not node.inputs:
        return None
    if len(node.outputs) != 1 or node.inputs[0] is None:
        return None
    src, dst = static_shape(node.inputs[0]), static_shape(node.outputs[0])
    if src is None or dst is None:
        return None
    if node.op_type == "Transpose":
        attr = node.attributes.get("perm")
        perm = tuple(attr.as_ints()) if attr is not None else tuple(reversed(range(len(src))))
        if tuple(src[p] for p in perm) != dst:
            return None
        return Step("transpose", perm)
    if int(np.prod(src)) != int(np.prod(dst)):
        return None
    return Step("reshape", dst)


class Editor:
    """Creates uniquely named values, constants and nodes in one graph."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.unique = UniqueNames(graph)
        self._i64: dict[tuple[int, ...], ir.Value] = {}

    def value(self, name: str, shape: Sequence[int], like: ir.Value, *, exact: bool = False) -> ir.Value:
        """A new generated tensor of ``like``'s element type."""
        value = ir.Value(
            name=name if exact else self.unique(name), shape=ir.Shape(list(shape)), type=like.type
        )
        value.meta[GENERATED] = True
        return value

    def const_i64(self, values: Iterable[int], name: str) -> ir.Value:
        """An int64 initializer (shared between identical requests)."""
        key = tuple(int(v) for v in values)
        if key in self._i64 and self._i64[key].graph is self.graph:
            return self._i64[key]
        tensor = ir.tensor(np.asarray(key, dtype=np.int64))
        value = ir.Value(name=self.unique(name), const_value=tensor)
        tensor.name = value.name
        value.shape = ir.Shape([len(key)])
        value.type = ir.TensorType(ir.DataType.INT64)
        value.meta[GENERATED] = True
        self.graph.register_initializer(value)
        self._i64[key] = value
        return value

    def step_node(self, step: Step, source: ir.Value, out: ir.Value, name: str) -> ir.Node:
        """A Transpose or Reshape node performing ``step`` from ``source`` into ``out``."""
        if step.kind == "transpose":
            return ir.Node(
                "",
                "Transpose",
                [source],
                [ir.AttrInt64s("perm", list(step.param))],
                outputs=[out],
                name=self.unique(name),
            )
        shape = self.const_i64(step.param, f"{name}.shape")
        return ir.Node("", "Reshape", [source, shape], outputs=[out], name=self.unique(name))

    def take_name(self, keeper: ir.Value, donor: ir.Value) -> None:
        """Give ``donor``'s name to ``keeper`` (``donor`` gets a fresh generated name)."""
        name = donor.name
        assert name is not None
        donor.name = self.unique(name + ".old")
        keeper.name = name
        keeper.meta[GENERATED] = is_generated(donor)
        donor.meta[GENERATED] = True
        if keeper.const_value is not None:
            keeper.const_value.name = name


def can_rename(value: ir.Value) -> bool:
    """Graph inputs, outputs and initializers keep their names."""
    return not _is_io(value)
