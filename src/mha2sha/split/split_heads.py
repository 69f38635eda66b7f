"""SplitHeadsPass: rewrite every multi-head attention block into per-head single-head attention.

Rules applied, in order:
1. Anchor at each attention core (Softmax feeding ``MatMul(P, V)``); the head axis and count come
   from the core's output shape.
2. Push the head concat forward through Transpose/Reshape towards the output projection, so the
   heads are joined once, right before ``o_proj``.
3. Walk backwards from there with the per-op rules (:mod:`mha2sha.split.rules`) down to weights,
   graph inputs and shared tensors.
4. Accept the block only when its Softmax and both attention MatMuls are computed per head;
   otherwise leave it untouched and report the op that stopped the walk.
5. Emit every head's piece, join pieces that are still needed whole (the o_proj input, present
   key/value outputs) with one Concat, and drop what became dead.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Callable

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from mha2sha.find.anchors import AttentionCore, RefusedCore, find_attention_cores
from mha2sha.graph import DATA_MOVEMENT_OPS, name_of
from mha2sha.graph import static_shape as shape_or_none
from mha2sha.io.names import tensor_names
from mha2sha.split.emit import Emitter
from mha2sha.split.record import BlockReport, SplitRecord
from mha2sha.split.rules import Unsplittable, forward_spec, rule_of, static_shape
from mha2sha.split.spec import HeadSpec, head_spec_of_output, is_full_cover, piece_key
from mha2sha.split.walk import CACHE_CONCAT_REASON, Region, Step, walk_back

__all__ = ["PlannedBlock", "SplitHeadsPass", "SplitPlan"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PlannedBlock:
    """One attention block the split will rewrite: its core, the per-head region the walk found
    (from ``start``, the tensor joined again before the output projection, back to weights, graph
    inputs and shared tensors), the head cut of ``start`` and the block's report."""

    core: AttentionCore
    region: Region
    start: ir.Value
    start_spec: HeadSpec
    heads: int
    report: BlockReport


@dataclasses.dataclass
class SplitPlan:
    """What the split would do, decided before anything is emitted (the graph is untouched):
    the blocks it will rewrite and every attention core found (split or not)."""

    blocks: list[PlannedBlock]
    cores: list[AttentionCore]
    reports: list[BlockReport]  # one per core, in the same order (split, unsupported, single-head)
    refused: list[RefusedCore]  # attention the split cannot anchor (fused ops, subgraphs)


def _push_forward(value: ir.Value, spec: HeadSpec) -> tuple[ir.Value, HeadSpec]:
    while not value.is_graph_output():
        users = list(value.consumers())
        if len(users) != 1 or users[0].inputs[0] is not value:
            break
        user = users[0]
        rule = rule_of(user)
        if rule is None or rule.forward is None:
            break
        try:
            new_spec = forward_spec(user, spec)
            out = user.outputs[0]
            if not is_full_cover(new_spec, static_shape(out)):
                break
            if rule.backward(user, 0, new_spec)[0] != spec:
                break
        except Unsplittable:
            break
        value, spec = out, new_spec
    return value, spec


def _core_problem(region: Region, core: AttentionCore) -> str:
    """Why the walk did not make this core per-head, or '' when it did."""
    nodes = region.nodes()
    if core.pv_matmul not in nodes:
        return "MatMul(P, V) is not computed per head"
    if core.softmax not in nodes:
        stops = [f"{s.value.name}: {s.reason}" for s in region.of_kind("activation")]
        return "Softmax is not computed per head" + (f" (walk stopped at {stops[0]})" if stops else "")
    # The scores must come from a per-head MatMul(Q, K^T) reached through the walk.
    softmax_step = next(s for s in region.steps.values() if s.node is core.softmax)
    if any(
        s.node is not None and s.node.op_type in ("MatMul", "Gemm")
        for s in _steps_below(region, softmax_step)
    ):
        return ""
    stops = [f"{s.value.name} ({s.reason})" for s in region.of_kind("activation")]
    return "scores MatMul(Q, K^T) is not computed per head" + (
        f"; walk stopped at {stops[0]}" if stops else ""
    )


def _steps_below(region: Region, step: Step) -> list[Step]:
    """``step`` and every node/source step it was computed from within the region."""
    seen: dict[int, Step] = {}
    frontier = collections.deque([step])
    while frontier:  # breadth first: the nearest ops come first
        current = frontier.popleft()
        if id(current) in seen:
            continue
        seen[id(current)] = current
        if current.kind == "node" and current.node is not None:
            for inp, spec in zip(current.node.inputs, current.in_specs, strict=False):
                if inp is not None and spec:
                    frontier.append(region.get(inp, spec))
    return list(seen.values())


def _kv_heads(region: Region, core: AttentionCore, heads: int) -> int:
    """Distinct key pieces below MatMul(Q, K^T): the KV head count (1 when K is shared, MQA)."""
    softmax_steps = [s for s in region.steps.values() if s.node is core.softmax]
    qk = next(
        (
            s
            for s in _steps_below(region, softmax_steps[0])
            if s.node is not None and s.node.op_type == "MatMul"
        ),
        None,
    )
    if qk is None or len(qk.in_specs) < 2 or not qk.in_specs[1]:
        return 1
    assert qk.node is not None  # picked for its node above
    key = qk.node.inputs[1]
    assert key is not None  # MatMul's inputs are required
    k_steps = _steps_below(region, region.get(key, qk.in_specs[1]))
    if any(s.kind == "node" and not any(s.in_specs) for s in k_steps):
        return 1  # the key is broadcast to the heads from one shared tensor (MQA)
    return min(len({piece_key(s.spec, h) for h in range(heads)}) for s in k_steps)


def _model_heads(region: Region, pieces: int) -> int:
    """The model's head count: distinct per-head weight pieces (a batch folded into the head axis,
    ``[B*H, S, D]``, gives ``B*H`` pieces of attention but ``H`` of each projection weight)."""
    counts = [len({piece_key(s.spec, h) for h in range(pieces)}) for s in region.of_kind("param")]
    return max(counts, default=pieces) or pieces


def _describe(block: PlannedBlock) -> None:
    report, region = block.report, block.region
    report.heads = _model_heads(region, block.heads)
    report.head_dim = static_shape(block.core.output)[-1]
    report.kv_heads = min(_kv_heads(region, block.core, block.heads), report.heads)
    report.weights = sorted({name_of(s.value) for s in region.of_kind("param")})
    report.inputs = sorted({name_of(s.value) for s in region.of_kind("input")})
    cuts = region.of_kind("activation")
    report.kv_cache = sorted({name_of(s.value) for s in cuts if s.reason == CACHE_CONCAT_REASON})
    report.activations = sorted(
        {f"{s.value.name} ({s.reason})" for s in cuts if s.reason != CACHE_CONCAT_REASON}
    )


class SplitHeadsPass(ir.passes.InPlacePass):
    """Split multi-head attention into per-head single-head attention (see module docstring)."""

    def __init__(
        self,
        record: SplitRecord | None = None,
        *,
        per_head_io: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ):
        super().__init__()
        self.record = record if record is not None else SplitRecord()
        self.per_head_io = per_head_io
        self.progress = progress or (lambda done, total: None)  # (blocks done, blocks in all)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return self.apply(model, self.plan(model))

    def plan(self, model: ir.Model) -> SplitPlan:
        """Find every attention block and walk it (steps 1-4): the record's block reports are
        filled, the graph is not changed. :meth:`apply` emits the plan."""
        anchors = find_attention_cores(model.graph)
        self.record.other_softmax = [n.name or n.outputs[0].name or "Softmax" for n in anchors.others]
        for refused in anchors.refused:
            self.record.blocks.append(BlockReport(refused.name, "unsupported", reason=refused.reason))
            logger.warning("attention %s left as multi-head: %s", refused.name, refused.reason)
        first = len(self.record.blocks)
        blocks = [b for b in (self._plan(core) for core in anchors.cores) if b is not None]
        return SplitPlan(blocks, anchors.cores, self.record.blocks[first:], anchors.refused)

    def apply(self, model: ir.Model, plan: SplitPlan) -> ir.passes.PassResult:
        """Emit a plan made by :meth:`plan` on this model (steps 5-6)."""
        graph = model.graph
        blocks = plan.blocks
        done, total = len(plan.cores) - len(blocks), len(plan.cores)
        self.progress(done, total)  # cores left alone are done already
        if not blocks:
            return ir.passes.PassResult(model, modified=False)
        emitter = Emitter(graph, self.record, per_head_inputs=self.per_head_io)
        for block in blocks:
            for head in range(block.heads):
                emitter.piece(block.region, block.start, block.start_spec, head)
            done += 1
            self.progress(done, total)
        copies = {  # data-movement tensor -> the tensor it copies (read before joins rename and cleanup detaches)
            name_of(step.value): name_of(step.node.inputs[0])
            for block in blocks
            for step in block.region.of_kind("node")
            if step.node is not None
            and step.node.op_type in DATA_MOVEMENT_OPS
            and step.node.inputs[0] is not None
        }
        self._join_escaping_values(graph, blocks, emitter)
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        existing = tensor_names(model)
        self.record.prune(existing)
        for name, source in copies.items():
            if name not in existing and name not in self.record.tensors:
                self.record.folded[name] = source
            if source not in existing and source not in self.record.tensors:
                self.record.copied_by.setdefault(source, []).append(name)
        return ir.passes.PassResult(model, modified=True)

    def _plan(self, core: AttentionCore) -> PlannedBlock | None:
        report = BlockReport(core.name, "single-head")
        self.record.blocks.append(report)
        shape = shape_or_none(core.output)
        if shape is None:
            report.status = "unsupported"
            report.reason = f"shape of the attention output '{core.output.name}' is unknown"
            logger.warning("attention %s left as multi-head: %s", core.name, report.reason)
            return None
        spec = head_spec_of_output(shape)
        if not spec:
            return None
        heads = math.prod(cut.count for cut in spec)
        start, start_spec = _push_forward(core.output, spec)
        region = Region()
        try:
            walk_back(region, start, start_spec, cut_cache_inputs=self.per_head_io)
        except Unsplittable as e:
            report.status, report.reason = "unsupported", str(e)
            return None
        problem = _core_problem(region, core)
        if problem:
            report.status, report.reason = "unsupported", problem
            logger.warning("attention %s left as multi-head: %s", core.name, problem)
            return None
        report.status = "split"
        block = PlannedBlock(core, region, start, start_spec, heads, report)
        _describe(block)
        return block

    def _join_escaping_values(self, graph: ir.Graph, blocks: list[PlannedBlock], emitter: Emitter) -> None:
        """Tensors still used whole (o_proj input, present KV outputs) become a Concat of pieces;
        with per-head I/O, cut graph outputs become one output per head instead."""
        region_nodes: set[ir.Node] = set()
        for block in blocks:
            region_nodes |= block.region.nodes()
        joined: set[int] = set()
        for block in blocks:
            for step in list(block.region.steps.values()):
                value = step.value
                if step.kind != "node" or id(value) in joined:
                    continue
                outside = [(n, i) for n, i in value.uses() if n not in region_nodes]
                is_output = value.is_graph_output()
                if not outside and not is_output:
                    continue
                if not is_full_cover(step.spec, static_shape(value)):
                    continue  # the original computation stays alive for these users
                joined.add(id(value))
                original_name = name_of(value)
                (cut,) = step.spec
                pieces = [
                    emitter.piece(block.region, value, step.spec, i * cut.div) for i in range(cut.count)
                ]
                if outside or (is_output and not self.per_head_io):
                    # The joined tensor takes over the original name: encodings and users refer to it.
                    whole = emitter.concat(pieces, cut.axis, value)
                    for node, index in outside:
                        node.replace_input_with(index, whole)
                    value.name = emitter.unique(original_name + ".mha")
                    whole.name = original_name
                if not is_output:
                    continue
                position = [k for k, v in enumerate(graph.outputs) if v is value]
                for k in reversed(position):
                    if self.per_head_io:
                        graph.outputs[k : k + 1] = pieces
                    else:
                        graph.outputs[k] = whole
                if self.per_head_io:
                    self.record.output_pieces[original_name] = (cut.axis, [name_of(p) for p in pieces])
        for name, (value, axis, pieces) in emitter.input_pieces.items():
            if value.uses():
                value.replace_all_uses_with(emitter.concat(pieces, axis, value))
            graph.inputs.remove(value)
            self.record.input_pieces[name] = (axis, [name_of(p) for p in pieces])
