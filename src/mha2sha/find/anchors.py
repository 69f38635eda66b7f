"""Find attention cores: a Softmax whose probabilities reach ``MatMul(P, V)``.

The anchor is only the core; which tensors are Q, K and V and how the heads reach the weights is
learnt by the walk (:mod:`mha2sha.split.walk`), so any exporter's graph around the core works.
Between the Softmax and the MatMul with V any per-element or layout ops may stand (Cast, Dropout,
a masking Mul, the decomposed-SDPA NaN guard ``Where(IsNaN(P), 0, P)`` that makes the Softmax
output have two readers): the split carries the head cut through them by the same rules as
everywhere else. A Softmax that reaches a MatMul in another way is an attention block the split
does not understand: it is returned as ``refused`` with the op that stopped the search, so the job
reports it and exits non-zero instead of treating the model as having no attention.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from mha2sha.graph import ELEMENTWISE_OPS, FUSED_ATTENTION_OPS, LAYOUT_OPS, is_op

__all__ = ["AttentionCore", "Anchors", "RefusedCore", "find_attention_cores"]

#: Ops the probabilities may pass through on their way to ``MatMul(P, V)``.
PROBABILITY_OPS = ELEMENTWISE_OPS | LAYOUT_OPS

#: How far past a Softmax an unrecognised path to a MatMul is still called attention (reporting
#: only: a Softmax further away than this is not an attention core candidate).
_REPORT_HOPS = 6


@dataclasses.dataclass
class AttentionCore:
    softmax: ir.Node
    pv_matmul: ir.Node  # MatMul(P, V)

    @property
    def output(self) -> ir.Value:
        return self.pv_matmul.outputs[0]

    @property
    def name(self) -> str:
        return self.softmax.name or self.pv_matmul.name or self.output.name or "attention"


@dataclasses.dataclass
class RefusedCore:
    """A node that is attention but cannot be anchored: a fused op, or a Softmax whose path to
    ``MatMul(P, V)`` leaves the per-element ops."""

    node: ir.Node
    reason: str

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name or self.node.op_type


@dataclasses.dataclass
class Anchors:
    cores: list[AttentionCore]
    refused: list[RefusedCore]
    others: list[ir.Node]  # Softmax nodes that are not attention (reported, never converted)


def _pv_matmul(softmax: ir.Node) -> tuple[ir.Node | None, str]:
    """The one ``MatMul(P, V)`` the probabilities reach through :data:`PROBABILITY_OPS`, or the
    reason there is none."""
    pv: ir.Node | None = None
    seen: set[int] = set()
    frontier = [softmax.outputs[0]]
    while frontier:
        value = frontier.pop()
        if value.is_graph_output():
            return None, f"the probabilities '{value.name}' are a graph output"
        for user, index in value.uses():
            if is_op(user, "MatMul") and index == 0:
                if pv is not None and pv is not user:
                    return None, "the probabilities feed two MatMuls"
                pv = user
            elif not is_op(user, PROBABILITY_OPS):
                where = f"{user.domain + '.' if user.domain else ''}{user.op_type} '{user.name}'"
                return None, f"{where} between Softmax and MatMul(P, V)"
            elif id(user) not in seen:
                seen.add(id(user))
                frontier.extend(user.outputs)
    return pv, "" if pv is not None else "no MatMul(P, V)"


def _reaches_matmul(softmax: ir.Node) -> bool:
    """A MatMul takes something computed from the probabilities within a few ops (as its first
    input): the Softmax is attention even when the path is not understood."""
    frontier, seen = [softmax], set()
    for _ in range(_REPORT_HOPS):
        nxt = []
        for node in frontier:
            for out in node.outputs:
                for user, index in out.uses():
                    if is_op(user, "MatMul", "Einsum") and index == 0:
                        return True
                    if id(user) not in seen:
                        seen.add(id(user))
                        nxt.append(user)
        frontier = nxt
    return False


def _subgraphs(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    found: list[tuple[str, ir.Graph]] = []
    for name, attr in node.attributes.items():
        if attr.type == ir.AttributeType.GRAPH:
            found.append((name, attr.as_graph()))
        elif attr.type == ir.AttributeType.GRAPHS:
            found += [(f"{name}[{i}]", g) for i, g in enumerate(attr.as_graphs())]
    return found


def _attention_in(graph: ir.Graph) -> int:
    """Attention cores in ``graph`` and every graph nested in it."""
    anchors = find_attention_cores(graph)
    return len(anchors.cores) + len(anchors.refused)


def find_attention_cores(graph: ir.Graph) -> Anchors:
    """Attention cores of ``graph``, attention that cannot be anchored, and other Softmax nodes.

    Attention inside a subgraph (an ``If`` branch of a merged decoder, a ``Loop`` body) is not
    converted: each such node is refused with the count and the branches named.
    """
    anchors = Anchors([], [], [])
    for node in graph:
        inner = [(name, n) for name, sub in _subgraphs(node) if (n := _attention_in(sub))]
        if inner:
            where = ", ".join(f"{name} ({n})" for name, n in inner)
            reason = (
                f"{sum(n for _, n in inner)} attention block(s) inside the {node.op_type} subgraphs {where}: "
                "subgraphs are not converted; convert each branch as its own model (optimum writes them "
                "as decoder_model.onnx and decoder_with_past_model.onnx)"
            )
            anchors.refused.append(RefusedCore(node, reason))
        if node.op_type in FUSED_ATTENTION_OPS:
            domain = node.domain + "." if node.domain else ""
            reason = f"fused {domain}{node.op_type} op was not lowered to MatMul/Softmax"
            anchors.refused.append(RefusedCore(node, reason))
        if not is_op(node, "Softmax"):
            continue
        pv, reason = _pv_matmul(node)
        if pv is not None:
            anchors.cores.append(AttentionCore(node, pv))
        elif _reaches_matmul(node):
            anchors.refused.append(RefusedCore(node, reason))
        else:
            anchors.others.append(node)
    return anchors
