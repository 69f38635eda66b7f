"""Which tensor names a model has (main graph and subgraphs): the test of "does it still exist"."""

from __future__ import annotations

import itertools

import onnx_ir as ir

__all__ = ["UniqueNames", "graphs", "tensor_names", "values_by_name"]


def graphs(model: ir.Model) -> list[ir.Graph]:
    """The main graph and every subgraph (If/Loop/Scan bodies)."""
    out = [model.graph]
    for node in model.graph.all_nodes():
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                out.append(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                out.extend(attr.value)
    return out


def tensor_names(model: ir.Model) -> set[str]:
    """Names of all graph inputs, initializers and node outputs."""
    names: set[str] = set()
    for g in graphs(model):
        names.update(v.name for v in g.inputs if v.name)
        names.update(n for n in g.initializers if n)
        for node in g:
            names.update(o.name for o in node.outputs if o.name)
    return names


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of ``graph`` (inputs, initializers, node outputs; not subgraphs)."""
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    values.update(graph.initializers)
    for node in graph:
        values.update((out.name, out) for out in node.outputs if out.name)
    return values


class UniqueNames:
    """Hands out names no tensor or node of ``graph`` uses yet: new names derive from original ones
    (``q_proj.weight.h3``), with a numeric suffix only on a clash."""

    def __init__(self, graph: ir.Graph):
        self._taken = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
        for node in graph:
            if node.name:
                self._taken.add(node.name)
            self._taken.update(o.name for o in node.outputs if o.name)
        self._counter = itertools.count()

    def __call__(self, name: str) -> str:
        candidate = name
        while candidate in self._taken:
            candidate = f"{name}_{next(self._counter)}"
        self._taken.add(candidate)
        return candidate
