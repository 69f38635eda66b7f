"""CancelLayoutPass: remove Transpose/Reshape chains that provably do nothing, and merge the rest.

After :class:`~mha2sha.layout.linear_to_conv.LinearToConvPass` every projection is wrapped in
``[B,S,C] -> [B,C,1,S]`` and back, so consecutive projections produce layout ops that undo each
other. Rules applied, repeated until nothing changes:

1. **Merge duplicates**: two identical layout ops (Transpose/Reshape/Squeeze/Unsqueeze/Flatten)
   of the same tensor become one.
2. **Collapse chains**: a chain of layout ops is composed exactly
   (:func:`~mha2sha.layout.algebra.compose`); if it is the identity its result is replaced by its
   source; if one Reshape or one Transpose does the same and the replacement removes nodes, the chain
   becomes that one op. Compositions that cannot be proven are left alone.
3. **Sink through elementwise ops**: a connected region of elementwise ops (Add, Mul, Sigmoid, ...)
   whose non-scalar inputs all arrive through the *same* layout op (same permutation or target
   shape, same source shape) is computed in the source layout instead, with the layout op applied
   once to each value leaving the region; done only when it removes layout ops (SiLU-gated MLPs,
   the per-head ``o_proj`` sum tree, residual-free chains). Scalar constants are the only other
   operands allowed, so no broadcast changes meaning.

Graph input and output names, shapes and order never change. Tensors that disappear are recorded
(:class:`~mha2sha.layout.record.LayoutRecord` ``moved``) with the surviving tensor holding the same
values; a surviving tensor created by a layout pass takes the vanished original's name instead.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from mha2sha.graph import ELEMENTWISE_OPS, is_op, name_of, static_shape
from mha2sha.layout._graph import GENERATED, Editor, can_rename, is_generated, layout_step
from mha2sha.layout.algebra import Step, compose
from mha2sha.layout.record import LayoutRecord

__all__ = ["CancelLayoutPass"]

logger = logging.getLogger(__name__)

_MAX_CHAIN = 16
_MAX_ROUNDS = 32
_MAX_RANK = 4  # HTP tensors; never create a higher-rank tensor than the chain already had


def _apply(shape: tuple[int, ...], step: Step) -> tuple[int, ...]:
    if step.kind == "transpose":
        return tuple(shape[p] for p in step.param)
    return tuple(step.param)


def _alive(node: ir.Node | None, graph: ir.Graph) -> bool:
    return node is not None and node.graph is graph


def _scalar_const(value: ir.Value, max_rank: int) -> bool:
    shape = static_shape(value)
    return (
        value.const_value is not None
        and not value.is_graph_input()
        and shape is not None
        and len(shape) <= max_rank
        and all(d == 1 for d in shape)
    )


class CancelLayoutPass(ir.passes.InPlacePass):
    """Remove identity layout chains, merge duplicates, sink layout ops through elementwise ops."""

    def __init__(self, record: LayoutRecord | None = None, *, sink: bool = True, keep: Collection[str] = ()):
        super().__init__()
        self.record = record if record is not None else LayoutRecord()
        self.sink = sink
        # outputs of layout ops that are not data movement to cancel (per-head requantisation
        # Identities: their output carries an encoding of its own)
        self.keep = frozenset(keep)

    def _step(self, node: ir.Node) -> Step | None:
        if any(o.name in self.keep for o in node.outputs):
            return None
        return layout_step(node)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        before_count = len(graph)
        named = {id(v): v for node in graph for v in node.outputs if v.name}
        self._equiv: dict[int, ir.Value] = {}
        self._touched: dict[int, ir.Value] = {}
        self._editor = Editor(graph)
        modified = False
        for _ in range(_MAX_ROUNDS):
            changed = self._merge_duplicates(graph)
            for node in list(graph):
                if _alive(node, graph) and self._collapse(graph, node):
                    changed = True
            RemoveUnusedNodesPass()(model)
            if self.sink:
                for node in list(graph):
                    if _alive(node, graph) and self._sink(graph, node):
                        changed = True
                RemoveUnusedNodesPass()(model)
            modified |= changed
            if not changed:
                break
        if not modified:
            return ir.passes.PassResult(model, modified=False)
        for name in [n for n, v in graph.initializers.items() if not v.uses() and v.meta.get(GENERATED)]:
            del graph.initializers[name]
        self._settle_names(graph, {**named, **self._touched})
        TopologicalSortPass()(model)
        self.record.nodes_removed += before_count - len(graph)
        logger.info("CancelLayoutPass: %d nodes fewer", before_count - len(graph))
        return ir.passes.PassResult(model, modified=True)

    def _same(self, gone: ir.Value, survivor: ir.Value, *, overwrite: bool = True) -> None:
        """``gone`` holds the same values as ``survivor`` (in another layout)."""
        if overwrite or id(gone) not in self._equiv:
            self._equiv[id(gone)] = survivor
            self._touched[id(gone)] = gone

    # -- rule 1 -------------------------------------------------------------------------------
    def _merge_duplicates(self, graph: ir.Graph) -> bool:
        seen: dict[tuple[int, Step], ir.Node] = {}
        changed = False
        for node in list(graph):
            step = self._step(node)
            if step is None or node.outputs[0].is_graph_output():
                continue
            key = (id(node.inputs[0]), step)
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            out = node.outputs[0]
            keep = first.outputs[0]
            out.replace_all_uses_with(keep)
            self._same(out, keep)
            changed = True
        return changed

    # -- rule 2 -------------------------------------------------------------------------------
    def _collapse(self, graph: ir.Graph, node: ir.Node) -> bool:
        step = self._step(node)
        if step is None or not (node.outputs[0].uses() or node.outputs[0].is_graph_output()):
            return False
        chain: list[tuple[ir.Node, Step]] = [(node, step)]
        while len(chain) < _MAX_CHAIN:
            data = chain[0][0].inputs[0]
            assert data is not None  # a layout op's data input is required
            producer = data.producer()
            if producer is None or (pstep := self._step(producer)) is None:
                break
            chain.insert(0, (producer, pstep))
        end = node.outputs[0]
        for k in range(len(chain)):
            sub = chain[k:]
            root = sub[0][0].inputs[0]
            assert root is not None
            src = static_shape(root)
            if src is None:
                continue
            comp = compose(src, [s for _, s in sub])
            if comp is None:
                continue
            if comp.kind == "identity":
                if end.is_graph_output():
                    continue
                end.replace_all_uses_with(root)
                for n, _ in sub:
                    self._same(n.outputs[0], root, overwrite=False)
                return True
            if comp.steps is None or len(sub) <= len(comp.steps):
                continue
            dying = 1
            for j in range(len(sub) - 2, -1, -1):
                value = sub[j][0].outputs[0]
                users = {id(n) for n, _ in value.uses()}
                if value.is_graph_output() or users != {id(sub[j + 1][0])}:
                    break
                dying += 1
            if dying <= len(comp.steps):
                continue
            if any(len(_apply(src, st)) > max(_MAX_RANK, len(src)) for st in comp.steps[:-1]):
                continue  # would add an intermediate tensor of a rank the HTP cannot hold
            current = root
            base = (node.name or end.name or "layout") + ".collapsed"
            shape = static_shape(root)
            assert shape is not None
            for step_ in comp.steps:
                shape = _apply(shape, step_)
                new = self._editor.value((end.name or "layout") + ".collapsed", shape, end)
                graph.insert_before(node, self._editor.step_node(step_, current, new, base))
                current = new
            self._replace(end, current)
            for n, _ in sub[:-1]:
                self._same(n.outputs[0], root, overwrite=False)
            return True
        return False

    def _replace(self, old: ir.Value, new: ir.Value) -> None:
        """``new`` takes over ``old``'s uses, graph-output slots and name."""
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        self._editor.take_name(new, old)
        self._same(old, new)

    # -- rule 3 -------------------------------------------------------------------------------
    def _sink(self, graph: ir.Graph, node: ir.Node) -> bool:
        step = self._step(node)
        if step is None or node.op_type == "Identity":
            return False
        src_shape = static_shape(node.inputs[0])
        dst_shape = static_shape(node.outputs[0])
        assert src_shape is not None and dst_shape is not None
        if len(src_shape) > max(_MAX_RANK, len(dst_shape)):
            return False  # the region would compute on tensors of a rank the HTP cannot hold

        def same_layout(value: ir.Value) -> ir.Node | None:
            producer = value.producer()
            if producer is None or self._step(producer) != step:
                return None
            return producer if static_shape(producer.inputs[0]) == src_shape else None

        entering: dict[int, ir.Node] = {id(node.outputs[0]): node}
        region: list[ir.Node] = []
        region_ids: set[int] = set()
        region_values: set[int] = set()
        pending = [c for c in node.outputs[0].consumers()]
        progress = True
        while progress:
            progress = False
            for cand in list(dict.fromkeys(pending)):
                if id(cand) in region_ids or not self._elementwise(cand, dst_shape):
                    continue
                new_entering: dict[int, ir.Node] = {}
                ok = True
                for v in cand.inputs:
                    if v is None or id(v) in region_values or id(v) in entering:
                        continue
                    producer = same_layout(v)
                    if producer is not None:
                        new_entering[id(v)] = producer
                    elif not _scalar_const(v, len(src_shape)):
                        ok = False
                        break
                if not ok:
                    continue
                entering.update(new_entering)
                region.append(cand)
                region_ids.add(id(cand))
                region_values.add(id(cand.outputs[0]))
                pending.extend(cand.outputs[0].consumers())
                for producer in new_entering.values():
                    pending.extend(producer.outputs[0].consumers())
                progress = True
        if not region:
            return False
        removed = [
            p
            for p in entering.values()
            if not p.outputs[0].is_graph_output() and all(id(n) in region_ids for n, _ in p.outputs[0].uses())
        ]
        leaving = [
            n.outputs[0]
            for n in region
            if n.outputs[0].is_graph_output() or any(id(u) not in region_ids for u, _ in n.outputs[0].uses())
        ]
        if len(leaving) >= len(removed):
            return False
        for cand in region:
            for i, v in enumerate(cand.inputs):
                if v is not None and id(v) in entering:
                    cand.replace_input_with(i, entering[id(v)].inputs[0])
            cand.outputs[0].shape = ir.Shape(list(src_shape))
        for p in removed:
            source = p.inputs[0]
            assert source is not None  # entering nodes have an input of shape src_shape
            self._same(p.outputs[0], source)
        for value in leaving:
            self._relayout(graph, value, step, dst_shape, region_ids)
        return True

    @staticmethod
    def _elementwise(node: ir.Node, dst_shape: tuple[int, ...]) -> bool:
        return (
            is_op(node, ELEMENTWISE_OPS)
            and len(node.outputs) == 1
            and static_shape(node.outputs[0]) == dst_shape
        )

    def _relayout(
        self, graph: ir.Graph, value: ir.Value, step: Step, shape: tuple[int, ...], region_ids: set[int]
    ) -> None:
        """Apply ``step`` to a region value for its users outside the region."""
        assert value.name is not None
        out = self._editor.value(value.name + ".relayout", shape, value)
        producer = value.producer()
        assert producer is not None
        graph.insert_after(producer, self._editor.step_node(step, value, out, value.name + ".relayout"))
        for user, index in list(value.uses()):
            if id(user) not in region_ids and user.outputs[0] is not out:
                user.replace_input_with(index, out)
        if value.is_graph_output():
            for k, v in enumerate(graph.outputs):
                if v is value:
                    graph.outputs[k] = out
            # the graph output keeps its name; the region's value becomes the generated one
            name = value.name
            value.name = self._editor.unique(name + ".src")
            value.meta[GENERATED] = True
            out.name = name
            out.meta[GENERATED] = False
            self.record.aliases[value.name] = self.record.origin(name)
        else:
            self.record.aliases[name_of(out)] = self.record.origin(value.name)

    # -- names --------------------------------------------------------------------------------
    def _survivor(self, value: ir.Value, graph: ir.Graph) -> ir.Value | None:
        seen = 0
        while seen < 1000:
            if value.is_graph_input() or value.is_initializer() or _alive(value.producer(), graph):
                return value
            nxt = self._equiv.get(id(value))
            if nxt is None:
                return None
            value, seen = nxt, seen + 1
        return None

    def _settle_names(self, graph: ir.Graph, named: dict[int, ir.Value]) -> None:
        """Vanished tensors: their survivor takes the name (when created by us) or is recorded."""
        claimed: set[int] = set()
        for value in named.values():
            if _alive(value.producer(), graph) or value.name is None:
                continue
            name = value.name
            survivor = self._survivor(value, graph)
            self.record.aliases.pop(name, None)
            if is_generated(value) and survivor is None:
                continue
            if survivor is None:
                self.record.fused.setdefault(name, "removed by CancelLayoutPass")
                continue
            value.name = self._editor.unique(name + ".dead")
            if (
                not is_generated(value)
                and is_generated(survivor)
                and can_rename(survivor)
                and id(survivor) not in claimed
            ):
                old = survivor.name or ""
                survivor.name = name
                survivor.meta[GENERATED] = False
                self.record.renamed(old, name)
                claimed.add(id(survivor))
            else:
                target = survivor.name or ""
                if not is_generated(value):
                    self.record.moved[name] = target
                for key, moved_to in list(self.record.moved.items()):
                    if moved_to == name:
                        self.record.moved[key] = target
        present = {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
        for key in [k for k in self.record.aliases if k not in present]:
            del self.record.aliases[key]
