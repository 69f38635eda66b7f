"""LowerFusedOpsPass: rewrite fused attention and contrib ops into standard ONNX primitives, exactly.

Exporters and optimizers write fused ops (ONNX ``Attention``, ``com.microsoft.GroupQueryAttention``,
``SkipLayerNormalization``, ...) that the HTP backend does not run and the head split cannot see
into. Rules, applied to every node of the main graph and of every If/Loop/Scan body:

1. A node whose ``(domain, op_type)`` is in :data:`~mha2sha.lower.table.LOWERINGS` (and which the
   entry accepts at this opset) is replaced by the primitive nodes its lowering builds; the output
   values keep the fused node's names (graph outputs, downstream names and encodings stay).
2. A lowering that cannot be exact for this node's attributes or inputs refuses it with a reason
   (:class:`~mha2sha.lower._build.Refused`): the node stays as it was, the reason is recorded, and
   the pass never raises for it. The caller reports refusals (and exits 1).
3. An output of the fused node that something reads must be produced by the lowering; otherwise
   the node is refused.
4. Standard nodes whose output types/shapes are unknown (contrib ops stop ONNX shape inference) get
   them from ONNX's per-node inference as the pass walks the graph in order, lowered nodes included,
   so lowerings further down see static shapes.
New nodes use the model's default-domain opset (no opset is bumped): opset-dependent forms
(Unsqueeze axes, ReduceMean axes, Split sizes, LayerNormalization/Gelu availability) follow it.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from mha2sha.graph import is_onnx_domain, name_of
from mha2sha.io.names import graphs as all_graphs
from mha2sha.lower._build import Builder, Context, Refused
from mha2sha.lower.table import LOWERINGS, Lowering

__all__ = ["LowerFusedOpsPass", "LowerRecord", "lower_fused_ops"]

logger = logging.getLogger(__name__)

MIN_OPSET = 11  # Range, GatherElements, Slice/Pad with tensor inputs


@dataclasses.dataclass
class LowerRecord:
    """What the lowering did: ``(node name, op, nodes created)`` lowered, ``(node, op, reason)``
    refused, and ``(node, op, note)`` for things it knowingly ignored (e.g. ``softmax_precision``)."""

    lowered: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)
    refused: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    notes: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused

    def to_dict(self) -> dict[str, list[dict[str, object]]]:
        return {
            "lowered": [{"node": n, "op": o, "nodes": k} for n, o, k in self.lowered],
            "refused": [{"node": n, "op": o, "reason": r} for n, o, r in self.refused],
            "notes": [{"node": n, "op": o, "note": r} for n, o, r in self.notes],
        }


def _op_name(node: ir.Node) -> str:
    domain = "" if is_onnx_domain(node.domain) else node.domain
    return f"{domain}.{node.op_type}" if domain else node.op_type


class LowerFusedOpsPass(ir.passes.InPlacePass):
    """Apply the lowering table to every node (see the module docstring); results in ``record``."""

    def __init__(self, record: LowerRecord | None = None):
        super().__init__()
        self.record = record if record is not None else LowerRecord()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        graphs = all_graphs(model)
        ctx = Context(graphs, opset)
        modified = False
        for graph in graphs:
            for node in list(graph):
                domain = "" if is_onnx_domain(node.domain) else node.domain
                lowering = LOWERINGS.get((domain, node.op_type))
                if lowering is None or not lowering.applies(node, opset):
                    ctx.infer(node)
                    continue
                if opset < MIN_OPSET:
                    self._refuse(node, f"the model's opset {opset} is below {MIN_OPSET}")
                    continue
                modified |= self._lower(graph, node, lowering, ctx)
        return ir.passes.PassResult(model, modified)

    def _refuse(self, node: ir.Node, reason: str) -> None:
        self.record.refused.append((node.name or "", _op_name(node), reason))
        logger.warning("not lowered: %s (%s): %s", node.name, _op_name(node), reason)

    def _lower(self, graph: ir.Graph, node: ir.Node, lowering: Lowering, ctx: Context) -> bool:
        b = Builder(node, ctx)
        try:
            results = list(lowering.fn(node, b))[: len(node.outputs)]
            results += [None] * (len(node.outputs) - len(results))
            for old, new in zip(node.outputs, results, strict=True):
                if new is None and (old.uses() or old.is_graph_output()):
                    raise Refused(f"output '{old.name}' is used but cannot be lowered")
        except Refused as e:
            self._refuse(node, str(e))
            return False
        except Exception as e:  # a bug must not take the whole conversion down: refuse the node
            logger.exception("lowering %s failed", node.name)
            self._refuse(node, f"lowering failed: {type(e).__name__}: {e}")
            return False
        created = {id(out) for n in b.nodes for out in n.outputs}
        claimed: set[int] = set()
        for i, (old, new) in enumerate(zip(node.outputs, results, strict=True)):
            if new is None or not (old.uses() or old.is_graph_output()):
                continue
            if id(new) not in created or id(new) in claimed:  # an input passed through: copy it
                new = b.op("Identity", [new], f"output_{i}")
            claimed.add(id(new))
            results[i] = new
        graph.insert_before(node, b.nodes)
        for init in b.initializers:
            graph.register_initializer(init)
        for old, new in zip(node.outputs, results, strict=True):
            if new is None or not (old.uses() or old.is_graph_output()):
                continue
            name = old.name
            old.name = ctx.value(f"{name}.fused")
            new.name = name
            if old.type is not None:
                new.type = old.type
            if old.shape is not None and (new.shape is None or all(isinstance(d, int) for d in old.shape)):
                new.shape = old.shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        for value in inputs:  # weights only the fused node read (e.g. RoPE caches now widened)
            if (
                value.is_initializer()
                and not value.uses()
                and not value.is_graph_input()
                and not value.is_graph_output()
            ):
                graph.initializers.pop(name_of(value), None)
        self.record.lowered.append((node.name or "", _op_name(node), len(b.nodes)))
        for note in b.notes:
            self.record.notes.append((node.name or "", _op_name(node), note))
        return True


def lower_fused_ops(model: ir.Model) -> LowerRecord:
    """Lower every fused op of ``model`` in place; the record says what was lowered and refused."""
    record = LowerRecord()
    LowerFusedOpsPass(record)(model)
    return record
