"""The node builder every lowering writes with: names after the fused node, opset-aware helpers.

A lowering never edits the graph: it creates nodes and initializers in a :class:`Builder`, and the
pass inserts them only when the whole lowering succeeded (a :class:`Refused` raised halfway leaves
the graph untouched). Everything a lowering creates is named ``{fused node}/{label}``; int64 shape
constants and scalars become initializers so every later rule sees one kind of constant.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from mha2sha.lower._infer import Inference

__all__ = [
    "Builder",
    "Context",
    "Refused",
    "dims",
    "static_dims",
    "input_at",
    "used",
]


class Refused(Exception):
    """The node cannot be lowered exactly; the message is the reason shown to the user."""


def input_at(node: ir.Node, index: int) -> ir.Value | None:
    """Input ``index`` of ``node``, None when omitted (absent or empty name)."""
    return node.inputs[index] if len(node.inputs) > index else None


def used(node: ir.Node, index: int) -> bool:
    """Whether output ``index`` of ``node`` exists and something reads it (or it is a graph output)."""
    if len(node.outputs) <= index:
        return False
    out = node.outputs[index]
    return bool(out.uses()) or out.is_graph_output()


def dims(value: ir.Value | None) -> list[int | None] | None:
    """The shape as a list (None for a symbolic or unknown dim), or None when the rank is unknown."""
    if value is None:
        return None
    shape: ir.Shape | ir.ShapeProtocol | None = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    if shape is None:
        return None
    return [int(d) if isinstance(d, int) else None for d in shape]


def static_dims(value: ir.Value | None) -> list[int] | None:
    """The shape as ints, or None when the rank or any dim is unknown."""
    shape = dims(value)
    if shape is None or any(d is None for d in shape):
        return None
    return [d for d in shape if d is not None]


class Context:
    """What the lowerings of one model share: unique value and node names across the model
    (subgraphs see outer names, so one set for all), derived initializers, and the inference."""

    def __init__(self, graphs: Iterable[ir.Graph], opset: int):
        self.opset = opset
        self.infer = Inference(opset)
        self.values: set[str] = set()
        self.nodes: set[str] = set()
        for graph in graphs:
            self.values.update(v.name for v in graph.inputs if v.name)
            self.values.update(graph.initializers)
            for node in graph:
                if node.name:
                    self.nodes.add(node.name)
                self.values.update(o.name for o in node.outputs if o.name)
        self._counter = itertools.count()
        # initializers derived from others (RoPE caches widened to the rotary dim), shared by nodes
        self.derived: dict[tuple[object, ...], ir.Value] = {}

    @staticmethod
    def _take(taken: set[str], name: str, counter: itertools.count) -> str:
        candidate = name
        while candidate in taken:
            candidate = f"{name}_{next(counter)}"
        taken.add(candidate)
        return candidate

    def value(self, name: str) -> str:
        return self._take(self.values, name, self._counter)

    def node(self, name: str) -> str:
        return self._take(self.nodes, name, self._counter)


_FLOAT_TYPES = {
    ir.DataType.FLOAT,
    ir.DataType.FLOAT16,
    ir.DataType.BFLOAT16,
    ir.DataType.DOUBLE,
}


class Builder:
    """Creates the nodes and initializers replacing one fused node (nothing touches the graph)."""

    def __init__(self, node: ir.Node, ctx: Context):
        self.node = node
        self.ctx = ctx
        self.opset = ctx.opset
        self.prefix = node.name or node.op_type
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.notes: list[str] = []
        self.dtype: ir.DataType | None = None  # element type of the node's float tensors, when known
        self._i64: dict[tuple[int, ...] | int, ir.Value] = {}

    # -- types ----------------------------------------------------------------------------------
    def float_type_of(self, *values: ir.Value | None) -> None:
        """Take the node's float element type from the first of ``values`` whose type is known."""
        for value in values:
            if value is not None and value.dtype in _FLOAT_TYPES:
                self.dtype = value.dtype
                return

    # -- nodes ----------------------------------------------------------------------------------
    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        label: str,
        *,
        outputs: int = 1,
        domain: str = "",
        dtype: ir.DataType | None = None,
        **attributes: object,
    ) -> ir.Value:
        """One node named ``{prefix}/{label}`` with one output named the same; returns the output."""
        return self.op_multi(op_type, inputs, label, outputs=outputs, domain=domain, dtype=dtype, attrs=attributes)[0]

    def op_multi(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        label: str,
        *,
        outputs: int = 1,
        domain: str = "",
        dtype: ir.DataType | None = None,
        labels: Sequence[str] | None = None,
        attrs: Mapping[str, object] | None = None,
        **attributes: object,
    ) -> list[ir.Value]:
        """Like :meth:`op`, for several outputs (named by ``labels``); attributes as keywords or
        ``attrs``."""
        attributes = {**(attrs or {}), **attributes}
        base = f"{self.prefix}/{label}"
        out_labels = labels or ([base] if outputs == 1 else [f"{base}_{i}" for i in range(outputs)])
        outs = [
            ir.Value(name=self.ctx.value(o if labels is None else f"{self.prefix}/{o}")) for o in out_labels
        ]
        if dtype is not None:
            for out in outs:
                out.type = ir.TensorType(dtype)
        converted = ir.convenience.convert_attributes(
            {k: v for k, v in attributes.items() if v is not None}  # type: ignore[misc]
        )
        node = ir.Node(domain, op_type, list(inputs), converted, outputs=outs, name=self.ctx.node(base))
        self.nodes.append(node)
        self.ctx.infer(node)  # later steps of the lowering read these shapes
        return outs

    # -- constants ------------------------------------------------------------------------------
    def const(self, array: np.ndarray, label: str, *, absolute: bool = False) -> ir.Value:
        """An initializer holding ``array`` (name ``{prefix}/{label}``, or ``label`` if absolute)."""
        name = self.ctx.value(label if absolute else f"{self.prefix}/{label}")
        array = np.asarray(array)
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=name),
        )
        self.initializers.append(value)
        return value

    def derived(self, key: tuple[object, ...], make: Callable[[], np.ndarray], name: str) -> ir.Value:
        """An initializer computed from constants (named ``name``), shared by every node of the
        graph asking for the same ``key``."""
        known = self.ctx.derived.get(key)
        if known is not None and known.graph is self.node.graph:
            return known
        value = self.const(make(), name, absolute=True)
        self.ctx.derived[key] = value
        return value

    def i64(self, values: Sequence[int] | int, label: str) -> ir.Value:
        """An int64 initializer: 1-D for a sequence, a scalar for an int (shared within the node)."""
        key = int(values) if isinstance(values, (int, np.integer)) else tuple(int(v) for v in values)
        if key not in self._i64:
            self._i64[key] = self.const(np.asarray(key, dtype=np.int64), label)
        return self._i64[key]

    def scalar(self, x: float, label: str, like: ir.Value | None = None) -> ir.Value:
        """A float scalar of the node's element type (a CastLike of ``like`` when it is unknown)."""
        if self.dtype is not None:
            return self.const(np.asarray(x, dtype=self.dtype.numpy()), label)
        if like is None or self.opset < 15:
            raise Refused("the element type of the node's tensors is unknown")
        return self.op("CastLike", [self.const(np.asarray(x, dtype=np.float32), label + "_f32"), like], label)

    def lowest(self, label: str, like: ir.Value | None = None) -> ir.Value:
        """The most negative finite value of the node's element type."""
        dtype = self.dtype.numpy() if self.dtype is not None else np.float32
        if self.dtype is None and like is None:
            raise Refused("the element type of the node's tensors is unknown")
        if self.dtype is None:
            return self.op("CastLike", [self.const(np.asarray(np.finfo(np.float32).min), label), like], label)
        return self.const(np.asarray(np.finfo(dtype).min, dtype=dtype), label)

    # -- opset-aware ops ------------------------------------------------------------------------
    def unsqueeze(self, x: ir.Value, axes: Sequence[int], label: str) -> ir.Value:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.i64(list(axes), f"{label}_axes")], label)
        return self.op("Unsqueeze", [x], label, axes=list(axes))

    def squeeze(self, x: ir.Value, axes: Sequence[int], label: str) -> ir.Value:
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.i64(list(axes), f"{label}_axes")], label)
        return self.op("Squeeze", [x], label, axes=list(axes))

    def reduce(
        self, op_type: str, x: ir.Value, axes: Sequence[int], label: str, keepdims: int = 1
    ) -> ir.Value:
        """ReduceMean/ReduceSum/ReduceMax over ``axes`` (axes as input from the opset that wants it)."""
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(op_type, [x, self.i64(list(axes), f"{label}_axes")], label, keepdims=keepdims)
        return self.op(op_type, [x], label, axes=list(axes), keepdims=keepdims)

    def slice(
        self, x: ir.Value, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int], label: str
    ) -> ir.Value:
        return self.op(
            "Slice",
            [
                x,
                self.i64(list(starts), f"{label}_starts"),
                self.i64(list(ends), f"{label}_ends"),
                self.i64(list(axes), f"{label}_axes"),
            ],
            label,
        )

    def split(self, x: ir.Value, sizes: Sequence[int], axis: int, labels: Sequence[str]) -> list[ir.Value]:
        label = labels[0] + "_split"
        if self.opset >= 13:
            return self.op_multi(
                "Split", [x, self.i64(list(sizes), f"{label}_sizes")], label, labels=labels, axis=axis
            )
        return self.op_multi("Split", [x], label, labels=labels, axis=axis, split=list(sizes))

    def less_equal(self, a: ir.Value, c: ir.Value, label: str) -> ir.Value:
        """``a <= c`` (``LessOrEqual`` from opset 12, ``Not(Greater)`` before)."""
        if self.opset >= 12:
            return self.op("LessOrEqual", [a, c], label, dtype=ir.DataType.BOOL)
        above = self.op("Greater", [a, c], f"{label}_not", dtype=ir.DataType.BOOL)
        return self.op("Not", [above], label, dtype=ir.DataType.BOOL)

    def reshape(self, x: ir.Value, shape: Sequence[int], label: str) -> ir.Value:
        """Reshape to ``shape`` (0 copies the input dim, -1 is inferred), an int64 initializer."""
        return self.op("Reshape", [x, self.i64(list(shape), f"{label}_shape")], label)

    def transpose(self, x: ir.Value, perm: Sequence[int], label: str) -> ir.Value:
        return self.op("Transpose", [x], label, perm=list(perm))

    def cast(self, x: ir.Value, to: ir.DataType, label: str) -> ir.Value:
        return self.op("Cast", [x], label, to=int(to), dtype=to)

    def to_float(self, x: ir.Value, label: str, like: ir.Value | None = None) -> ir.Value:
        """Cast ``x`` to the node's float element type (CastLike of ``like`` when it is unknown)."""
        if self.dtype is not None:
            return self.cast(x, self.dtype, label)
        if like is None or self.opset < 15:
            raise Refused("the element type of the node's tensors is unknown")
        return self.op("CastLike", [x, like], label)
