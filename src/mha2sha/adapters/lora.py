"""Where the LoRA tensors that adapters name sit in the graph, read from its dataflow.

A LoRA branch is ``x -> [A] -> (scale) -> [B] -> (scale) -> + base``: two projections (MatMul, Gemm
or Conv with a weight) where the output of the one (A) is, through data movement and scalar
multiplications only, the activation input of the other (B). Found from the tensors the adapters
name, never from names:

- each named tensor is an initializer or a graph input; its consumer gives its (output, input)
  channel axes (AIMET's rules, :func:`mha2sha.encodings.axes.consumer_axes`);
- the **rank axis** (the one an adapter of lower rank is zero-padded along) is A's output channel
  axis and B's input channel axis; a tensor that is neither (e.g. a scale) has none;
- the **scale sites** are the ``Mul`` nodes by a one-element constant (peft's ``alpha / r``) between
  A's output and the end of the branch (after B).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from mha2sha.encodings.axes import consumer_axes
from mha2sha.graph import LAYOUT_OPS, is_op, static_shape

__all__ = ["LoraGraph", "LoraTensor", "ScaleSite", "constant_value", "find_lora"]

_PASS = LAYOUT_OPS | {"Cast", "Dropout"}


@dataclasses.dataclass(frozen=True)
class LoraTensor:
    """A tensor adapters replace: an initializer (``is_input`` False) or a graph input."""

    name: str
    shape: tuple[int, ...]
    dtype: ir.DataType
    is_input: bool
    role: str  # "A", "B" or "" (not a projection weight of a LoRA branch)
    rank_axis: int | None  # A: output channel axis, B: input channel axis
    partner: str = ""  # the other weight of the branch (B of an A, A of a B)


@dataclasses.dataclass(frozen=True)
class ScaleSite:
    """A ``Mul`` by a one-element constant on a LoRA branch: ``node.inputs[index]`` is the scale."""

    node: ir.Node
    index: int
    value: float

    @property
    def constant(self) -> str:
        return self.node.inputs[self.index].name or ""  # type: ignore[union-attr]


@dataclasses.dataclass
class LoraGraph:
    tensors: dict[str, LoraTensor]
    scales: list[ScaleSite]

    @property
    def scale_constants(self) -> dict[str, float]:
        """Scale tensor name -> value (one name can serve several sites)."""
        return {s.constant: s.value for s in self.scales}


def constant_value(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or of a ``Constant`` node's output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if is_op(producer, "Constant") and "value" in producer.attributes:  # type: ignore[union-attr]
        return producer.attributes["value"].as_tensor().numpy()  # type: ignore[union-attr]
    return None


def _scalar_operand(node: ir.Node) -> int | None:
    """Index of the one-element constant operand of a binary Mul, if the other operand is not one."""
    if not is_op(node, "Mul") or len(node.inputs) != 2:
        return None
    small = [i for i, v in enumerate(node.inputs) if (c := constant_value(v)) is not None and c.size == 1]
    return small[0] if len(small) == 1 else None


def _data_input(node: ir.Node) -> ir.Value | None:
    if is_op(node, _PASS):
        return node.inputs[0] if node.inputs else None
    index = _scalar_operand(node)
    return None if index is None else node.inputs[1 - index]


def _weight_axes(value: ir.Value) -> tuple[ir.Node, tuple[int, int | None]] | None:
    rank = len(static_shape(value) or ())
    for node, index in value.uses():
        axes = consumer_axes(node, index, rank)
        if axes is not None:
            return node, axes
    return None


def _projection_weight(node: ir.Node, names: set[str]) -> str | None:
    """The named weight of a projection node (input 1 of MatMul / Gemm / Conv), else None."""
    if not is_op(node, "MatMul", "Gemm", "Conv") or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    name = node.inputs[1].name
    return name if name in names else None


def _downstream(node: ir.Node) -> tuple[list[ir.Node], list[ir.Node]]:
    """Following ``node``'s output through single-use data movement and scalar Muls: the nodes passed
    (in order) and the projections whose activation input it reaches."""
    passed: list[ir.Node] = []
    value = node.outputs[0]
    while True:
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output():
            return passed, []
        user, index = uses[0]
        if _data_input(user) is value and user.outputs:
            passed.append(user)
            value = user.outputs[0]
            continue
        return passed, [user] if index == 0 and is_op(user, "MatMul", "Gemm", "Conv") else []


def find_lora(model: ir.Model, names: Iterable[str]) -> LoraGraph:
    """The LoRA structure around ``names`` (graph initializers / inputs that adapters name).

    Names that are not tensors of the graph are left out (the caller reports them).
    """
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs if v.name}
    wanted = set(names)
    values = {n: graph.initializers.get(n) or inputs.get(n) for n in wanted}
    present = {n for n, v in values.items() if v is not None}
    roles: dict[str, tuple[str, int | None, str]] = {}
    scales: dict[tuple[int, int], ScaleSite] = {}
    for name in sorted(present):
        found = _weight_axes(values[name])  # type: ignore[arg-type]
        if found is None:
            continue
        node, (out_axis, _) = found
        passed, targets = _downstream(node)
        target = targets[0] if targets else None
        partner = _projection_weight(target, present) if target is not None else None
        if target is not None and partner is not None:
            roles[name] = ("A", out_axis, partner)
            b_passed, _ = _downstream(target)
            for site in (*passed, *b_passed):
                index = _scalar_operand(site)
                if index is not None:
                    value = constant_value(site.inputs[index])
                    assert value is not None
                    scales[(id(site), index)] = ScaleSite(site, index, float(value.reshape(-1)[0]))
    for name in sorted(present):
        found = _weight_axes(values[name])  # type: ignore[arg-type]
        if found is None or name in roles:
            continue
        node, (_, in_axis) = found
        source = node.inputs[0]
        while source is not None and (producer := source.producer()) is not None:
            weight = _projection_weight(producer, present)
            if weight is not None and roles.get(weight, ("",))[0] == "A":
                roles[name] = ("B", in_axis, weight)
                break
            source = _data_input(producer)
    tensors = {}
    for name in sorted(present):
        tensor = values[name]
        assert tensor is not None
        dtype = tensor.dtype or (tensor.const_value.dtype if tensor.const_value is not None else ir.DataType.FLOAT)
        role, axis, partner = roles.get(name, ("", None, ""))
        shape = static_shape(tensor) or ()
        tensors[name] = LoraTensor(name, shape, dtype, name in inputs, role, axis, partner)
    return LoraGraph(tensors, list(scales.values()))
