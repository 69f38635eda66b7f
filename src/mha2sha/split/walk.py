"""Walk backwards from an attention output, carrying the head cut through every op by its rule.

The walk records, for every (tensor, spec) it reaches, how one head's piece is obtained:
- ``node``: recompute it per head with the producing op (the rule gave the inputs' specs);
- ``param``: slice a weight / constant (free: Q/K/V/O weights, biases, ALiBi slopes, bias tables);
- ``input``: cut a graph input inside the graph (past key/value);
- ``activation``: cut a computed tensor whose producer has no rule (correct, reported).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import onnx_ir as ir

from mha2sha.split.rules import Unsplittable, rule_of, static_shape
from mha2sha.split.spec import HeadSpec

__all__ = ["Step", "Region", "walk_back"]


@dataclasses.dataclass
class Step:
    kind: Literal["node", "param", "input", "activation"]
    value: ir.Value
    spec: HeadSpec
    node: ir.Node | None = None
    out_index: int = 0
    in_specs: list[HeadSpec | None] = dataclasses.field(default_factory=list)
    reason: str = ""  # why an activation was cut where it was


@dataclasses.dataclass
class Region:
    """Everything one attention block needs per head, keyed by (tensor, spec)."""

    steps: dict[tuple[int, HeadSpec], Step] = dataclasses.field(default_factory=dict)

    def get(self, value: ir.Value, spec: HeadSpec) -> Step:
        return self.steps[(id(value), spec)]

    def nodes(self) -> set[ir.Node]:
        return {s.node for s in self.steps.values() if s.kind == "node" and s.node is not None}

    def of_kind(self, kind: str) -> list[Step]:
        return [s for s in self.steps.values() if s.kind == kind]


CACHE_CONCAT_REASON = "KV cache concat kept whole, cut after it"


def is_cache_concat(node: ir.Node) -> bool:
    """A Concat that appends to a graph input (the past key/value cache)."""
    return node.op_type == "Concat" and any(v is not None and v.is_graph_input() for v in node.inputs)


def walk_back(region: Region, value: ir.Value, spec: HeadSpec, *, cut_cache_inputs: bool = False) -> None:
    """Add ``value`` cut by ``spec`` and everything it needs to ``region`` (iterative, no hop limit).

    The KV-cache Concat (past input + new entries) is kept whole and cut after it: on HTP the
    per-head concats of a split cache requantise differently (measured: 3-9 LSB at the logits on
    the emulator, bit-exact when kept whole), and the present output needs no re-join. With
    ``cut_cache_inputs`` (per-head KV I/O) the walk goes through it to the graph inputs.
    """
    stack = [(value, spec)]
    while stack:
        value, spec = stack.pop()
        key = (id(value), spec)
        if not spec or key in region.steps:
            continue
        static_shape(value)  # every tensor of the region must have a static shape
        producer = value.producer()
        if value.const_value is not None and (producer is None or producer.op_type == "Constant"):
            region.steps[key] = Step("param", value, spec)
            continue
        if producer is None:
            region.steps[key] = Step("input", value, spec)
            continue
        if not cut_cache_inputs and is_cache_concat(producer):
            region.steps[key] = Step("activation", value, spec, reason=CACHE_CONCAT_REASON)
            continue
        rule = rule_of(producer)
        if rule is None:
            region.steps[key] = Step("activation", value, spec, reason=f"no rule for {producer.op_type}")
            continue
        out_index = list(producer.outputs).index(value)
        try:
            in_specs = rule.backward(producer, out_index, spec)
        except Unsplittable as e:
            region.steps[key] = Step("activation", value, spec, reason=f"{producer.op_type}: {e}")
            continue
        region.steps[key] = Step("node", value, spec, producer, out_index, in_specs)
        for inp, in_spec in zip(producer.inputs, in_specs, strict=False):
            if inp is not None and in_spec:
                stack.append((inp, in_spec))
