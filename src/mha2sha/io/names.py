"""Which tensor names a model has (main graph and subgraphs): the test of "does it still exist"."""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["graphs", "tensor_names"]


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
