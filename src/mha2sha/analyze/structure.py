"""What each attention block is: heads, RoPE, mask, KV cache, packed QKV, LoRA, fused op, and
whether the split takes it; one drawing per kind of block, as the graph has it and as one head.

Works on the split's *plan* (:meth:`SplitHeadsPass.plan`, nothing emitted): a block the split
takes is described from the walk's region (exactly the ops computed per head, down to weights,
graph inputs and shared tensors); a block it refuses from a neighbourhood of its core (the ops
reached backwards from ``MatMul(P, V)`` through per-element and layout ops, up to the projections).
Everything is read from the graph's structure and shapes, never from a weight's values (a constant
mask or position table of at most 4M elements is read to tell a causal mask).

Classifiers (each a small function of the block's ops):
- **RoPE**: two ``Mul`` s by position tables (cos, sin) on the query path with a ``Neg``/``Sub``:
  ``rotate_half`` (halves by Slice/Split), ``interleaved`` (stride-2 slices or a ``[..., D/2, 2]``
  reshape), ``partial`` (a pass-through part concatenated back), tables as graph inputs (``cos/sin
  inputs``) or computed in the graph; ``fused`` when it came from a RotaryEmbedding /
  GroupQueryAttention node (lowered, or still fused).
- **mask**: what is added to (or selected into) the scores before Softmax, by its source: an
  additive 4-D graph input, a 2-D integer mask input, a causal mask built in the graph (Trilu /
  Range / comparisons, or a folded lower-triangular constant), a per-head bias (ALiBi, relative
  position), none.
- **KV cache**: a ``Concat`` appending to a graph input on the key / value path: present = concat
  returned (``past/present concat``), or only the new entries returned (``new entries out``, the
  prepared layout); the key cache transposed when the key concat runs on the last axis.
- **packed QKV**: q, k (and v) computed by one projection; **LoRA**: a projection whose input is
  another (low-rank) projection; **fused op**: the lowered or unlowered fused attention op.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from mha2sha.analyze.record import AttentionInfo, BlockKind, Sketch, SketchNode, StructureRecord
from mha2sha.find.anchors import AttentionCore, RefusedCore
from mha2sha.graph import (
    BROADCAST_OPS,
    ELEMENTWISE_OPS,
    FUSED_ATTENTION_OPS,
    LAYOUT_OPS,
    attr_int,
    attr_ints,
    const_ints,
    is_onnx_domain,
    is_op,
    name_of,
    static_shape,
)
from mha2sha.lower import LowerRecord
from mha2sha.split.record import BlockReport
from mha2sha.split.spec import piece_ranges, piece_shape
from mha2sha.split.split_heads import PlannedBlock, SplitPlan
from mha2sha.split.walk import CACHE_CONCAT_REASON, Region, is_cache_concat

__all__ = ["PROJECTION_OPS", "BlockView", "block_views", "describe_attention", "projection_weight"]

logger = logging.getLogger(__name__)

PROJECTION_OPS = frozenset({"MatMul", "Gemm", "Conv", "Einsum", "MatMulNBits", "GatherBlockQuantized"})
_CAUSAL_OPS = frozenset({"Trilu", "Range", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "CumSum"})
_NORM_OPS = frozenset(
    {"ReduceMean", "ReduceL2", "ReduceSumSquare", "LayerNormalization", "RMSNormalization",
     "SimplifiedLayerNormalization", "Sqrt", "Reciprocal"}
)  # fmt: skip
_ONE_DATA_INPUT = frozenset(
    {"Reshape", "Expand", "Tile", "Slice", "Unsqueeze", "Squeeze", "Pad", "Gather", "Split", "Transpose", "Cast",
     "CastLike", "Clip", "Dropout", "GatherElements", "Resize"}
)  # fmt: skip
_MOVE_OPS = LAYOUT_OPS | {"Expand", "Tile", "Slice", "Split", "Concat", "Gather", "Cast"}
#: Largest constant read to tell a causal mask from another bias.
_MAX_MASK_ELEMENTS = 1 << 22
#: Largest neighbourhood drawn for a block the split does not take.
_MAX_NODES = 150
_CONE = 400


# ----------------------------------------------------------------------------- graph helpers


def projection_weight(node: ir.Node) -> ir.Value | None:
    """The constant weight of a projection (a 2-D MatMul/Gemm matrix, a Conv kernel, an Einsum
    operand of rank >= 2), else None. A rank-3 MatMul constant is a table (RoPE's ``inv_freq``)."""
    if node.op_type not in PROJECTION_OPS:
        return None
    for value in node.inputs[1:] if node.op_type != "Einsum" else node.inputs:
        if value is None or value.const_value is None:
            continue
        rank = len(value.const_value.shape)
        if rank == 2 or (node.op_type in ("Conv", "Einsum") and rank >= 2) or node.op_type not in ("MatMul", "Gemm", "Conv", "Einsum"):
            return value
    return None


def _from_projection(value: ir.Value, hops: int = 12) -> bool:
    """``value`` is computed from a projection's output within ``hops`` ops (key/value data, not a
    position table or a mask)."""
    frontier, seen = [value], set()
    for _ in range(hops):
        nxt = []
        for v in frontier:
            node = v.producer()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if projection_weight(node) is not None:
                return True
            nxt += [i for i in node.inputs if i is not None and i.const_value is None]
        frontier = nxt
    return False


def _numel(value: ir.Value | None) -> int | None:
    shape = static_shape(value)
    return None if shape is None else math.prod(shape)


def _is_scalar_const(value: ir.Value) -> bool:
    return value.const_value is not None and value.const_value.size <= 1


def _shape_text(shape: Sequence[object] | None) -> str:
    if shape is None:
        return "?"
    return "×".join(str(d) for d in shape) or "scalar"


def _value_shape(value: ir.Value | None) -> str:
    if value is None:
        return ""
    shape: Iterable[object] | None = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape.numpy()
    if shape is None:
        return "?"
    return _shape_text([d if isinstance(d, int) else (getattr(d, "value", None) or "?") for d in shape])


def _op_label(node: ir.Node) -> str:
    return node.op_type if is_onnx_domain(node.domain) else f"{node.domain}.{node.op_type}"


def _leads_to_scores(value: ir.Value, hops: int = 8) -> bool:
    """``value`` comes from a MatMul of two activations (Q K^T) within a few per-element hops."""
    frontier = [value]
    for _ in range(hops):
        nxt = []
        for v in frontier:
            node = v.producer()
            if node is None:
                continue
            if is_op(node, "MatMul", "Einsum") and all(i is not None and i.const_value is None for i in node.inputs):
                return True
            if is_op(node, ELEMENTWISE_OPS | LAYOUT_OPS):
                nxt += [i for i in node.inputs if i is not None and i.const_value is None]
        frontier = nxt
    return False


def _main_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs carrying the block's data (heads): not parameters, not broadcast operands."""
    values = [v for v in node.inputs if v is not None and v.const_value is None]
    if not is_onnx_domain(node.domain):
        return values
    if node.op_type == "Where":
        values = [v for v in node.inputs[1:] if v is not None and v.const_value is None]
    elif node.op_type in _ONE_DATA_INPUT:
        first = node.inputs[0] if node.inputs else None
        values = [first] if first is not None and first.const_value is None else []
    if node.op_type in BROADCAST_OPS and len(values) > 1:
        out = _numel(node.outputs[0])
        full = [v for v in values if _numel(v) is None or _numel(v) == out]
        values = full or values
    return values


def _cone(value: ir.Value, cap: int = _CONE) -> tuple[list[ir.Value], set[str], list[ir.Value], bool]:
    """What ``value`` is computed from: graph inputs, op types, non-scalar constants; and whether
    the walk stopped at ``cap`` nodes."""
    inputs: list[ir.Value] = []
    consts: list[ir.Value] = []
    ops: set[str] = set()
    seen: set[int] = set()
    stack = [value]
    nodes = 0
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.const_value is not None:
            if v.const_value.size > 1:
                consts.append(v)
            continue
        node = v.producer()
        if node is None:
            if v.is_graph_input():
                inputs.append(v)
            continue
        nodes += 1
        if nodes > cap:
            return inputs, ops, consts, True
        ops.add(node.op_type)
        stack += [i for i in node.inputs if i is not None]
    return inputs, ops, consts, False


#: Ops between a cache concat and the present output (GroupQueryAttention's lowering gathers it).
_CACHE_READ_OPS = _MOVE_OPS | {"Where", "GatherElements", "GatherND", "ScatterND", "Pad"}


def _forward_outputs(value: ir.Value, hops: int = 4) -> list[ir.Value]:
    """Graph outputs ``value`` reaches through data movement within ``hops`` ops (itself included)."""
    found, frontier = [], [value]
    for _ in range(hops + 1):
        nxt: list[ir.Value] = []
        for v in frontier:
            if v.is_graph_output():
                found.append(v)
            for user in v.consumers():
                if is_op(user, _CACHE_READ_OPS):
                    nxt.extend(user.outputs)
        frontier = nxt
    return found


def _backward_outputs(value: ir.Value, hops: int = 3) -> list[ir.Value]:
    """Graph outputs among ``value`` and the data-movement values it was copied from."""
    found, v = [], value
    for _ in range(hops + 1):
        if v.is_graph_output():
            found.append(v)
        node = v.producer()
        if node is None or not is_op(node, _MOVE_OPS) or not node.inputs or node.inputs[0] is None:
            break
        v = node.inputs[0]
    return found


# ----------------------------------------------------------------------------- a block's ops


@dataclasses.dataclass
class BlockView:
    """One attention block seen from its ops (graph references; valid until the split emits)."""

    core: AttentionCore
    nodes: list[ir.Node]  # in graph order
    planned: PlannedBlock | None
    report: BlockReport
    qk: ir.Node | None = None
    chain: list[ir.Node] = dataclasses.field(default_factory=list)  # ops between Q K^T and Softmax
    sides: list[tuple[ir.Node, ir.Value]] = dataclasses.field(default_factory=list)  # their other operands
    q_path: list[ir.Node] = dataclasses.field(default_factory=list)
    k_path: list[ir.Node] = dataclasses.field(default_factory=list)
    v_path: list[ir.Node] = dataclasses.field(default_factory=list)
    rope_nodes: set[int] = dataclasses.field(default_factory=set)
    rope_tables: set[int] = dataclasses.field(default_factory=set)
    mask_values: set[int] = dataclasses.field(default_factory=set)
    end: ir.Value | None = None  # the tensor joined before the output projection
    o_proj: ir.Node | None = None


def _region_nodes(region: Region) -> set[ir.Node]:
    nodes = set(region.nodes())
    for step in region.of_kind("activation"):
        producer = step.value.producer()
        if step.reason == CACHE_CONCAT_REASON and producer is not None:
            nodes.add(producer)
    return nodes


def _neighbourhood(starts: Iterable[ir.Node], stop: set[int]) -> set[ir.Node]:
    """Ops backwards from ``starts`` over data inputs, up to (and including) the projections,
    stopping at values other blocks share and at the cap (a block the split refuses, or the
    parts of a block the split keeps whole: the key/value before the cache concat, a shared K)."""
    nodes: set[ir.Node] = set()
    stack = list(starts)
    while stack and len(nodes) < _MAX_NODES:
        node = stack.pop()
        if node in nodes:
            continue
        nodes.add(node)
        if projection_weight(node) is not None:
            data = node.inputs[0]
            lora = data.producer() if data is not None else None
            if lora is not None and projection_weight(lora) is not None:
                nodes.add(lora)
            continue
        if is_cache_concat(node):
            stack += [v.producer() for v in node.inputs if v is not None and v.producer() is not None]  # type: ignore[misc]
            continue
        for value in _main_inputs(node):
            producer = value.producer()
            if producer is not None and id(value) not in stop and not is_op(producer, "Softmax"):
                stack.append(producer)
    return nodes


def _kept_whole(core: AttentionCore, nodes: set[ir.Node]) -> list[ir.Node]:
    """Producers of what a split block uses whole: the new key/value entries appended to the
    cache (the cache concat is kept whole), a key/value shared by every head (MQA)."""
    qk, _, _ = _score_chain(core)
    kv_side = {core.pv_matmul, *_path(nodes, core.pv_matmul.inputs[1])}
    if qk is not None:
        kv_side |= {qk, *_path(nodes, qk.inputs[1])}
    starts = []
    for node in kv_side:
        if projection_weight(node) is not None:
            continue  # its input is the hidden state: outside the block
        for value in node.inputs:
            producer = value.producer() if value is not None and value.const_value is None else None
            if value is None or producer is None or producer in nodes or producer in starts:
                continue
            if is_cache_concat(producer) or _from_projection(value):
                starts.append(producer)
    return starts


def _path(view_nodes: set[ir.Node], value: ir.Value | None) -> list[ir.Node]:
    """Nodes of the block ``value`` is computed from (within the block)."""
    if value is None:
        return []
    found: list[ir.Node] = []
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        node = v.producer()
        if node is None or node not in view_nodes or id(node) in seen:
            continue
        seen.add(id(node))
        found.append(node)
        stack += [i for i in node.inputs if i is not None]
    return found


def _score_chain(core: AttentionCore) -> tuple[ir.Node | None, list[ir.Node], list[tuple[ir.Node, ir.Value]]]:
    """``MatMul(Q, K^T)``, the ops between it and the Softmax, and their other operands."""
    chain: list[ir.Node] = []
    sides: list[tuple[ir.Node, ir.Value]] = []
    value = core.softmax.inputs[0]
    for _ in range(32):
        node = value.producer() if value is not None else None
        if node is None:
            return None, chain, sides
        if is_op(node, "MatMul", "Einsum") and all(i is not None and i.const_value is None for i in node.inputs):
            return node, chain, sides
        chain.append(node)
        mains = [v for v in _main_inputs(node) if v.producer() is not None]
        main = next((v for v in mains if _leads_to_scores(v)), mains[0] if mains else None)
        sides += [(node, v) for v in node.inputs if v is not None and v is not main]
        if main is None:
            return None, chain, sides
        value = main
    return None, chain, sides


def block_views(model: ir.Model, plan: SplitPlan) -> list[BlockView]:
    """One view per attention core of ``plan`` (in the plan's order), the graph untouched."""
    order = {id(n): i for i, n in enumerate(model.graph)}
    planned = {id(b.core.softmax): b for b in plan.blocks}

    def nodes_of(core: AttentionCore, stop: set[int]) -> set[ir.Node]:
        block = planned.get(id(core.softmax))
        if block is None:
            return _neighbourhood([core.pv_matmul], stop) | {core.softmax}
        nodes = _region_nodes(block.region) | {core.softmax, core.pv_matmul}
        return nodes | _neighbourhood(_kept_whole(core, nodes), stop)

    # values more than one block reads (the mask, position tables) end every block's walk
    rough = [nodes_of(core, set()) for core in plan.cores]
    counts = collections.Counter(id(n) for nodes in rough for n in nodes)
    shared = {id(out) for nodes in rough for n in nodes if counts[id(n)] > 1 for out in n.outputs}
    views = []
    for i, core in enumerate(plan.cores):
        block = planned.get(id(core.softmax))
        nodes = nodes_of(core, shared) if shared else rough[i]
        view = BlockView(core, sorted(nodes, key=lambda n: order.get(id(n), 0)), block, plan.reports[i])
        _fill(view, nodes)
        views.append(view)
    return views


def _fill(view: BlockView, nodes: set[ir.Node]) -> None:
    core = view.core
    view.qk, view.chain, view.sides = _score_chain(core)
    if view.qk is not None:
        view.q_path = _path(nodes, view.qk.inputs[0])
        view.k_path = _path(nodes, view.qk.inputs[1])
    view.v_path = _path(nodes, core.pv_matmul.inputs[1])
    view.end = view.planned.start if view.planned is not None else _end_after(core.output)
    users = list(view.end.consumers()) if view.end is not None else []
    if len(users) == 1 and projection_weight(users[0]) is not None:
        view.o_proj = users[0]


def _end_after(value: ir.Value) -> ir.Value:
    """Past Transpose/Reshape after ``MatMul(P, V)`` to the tensor the output projection reads."""
    for _ in range(6):
        users = list(value.consumers())
        if len(users) != 1 or not is_op(users[0], LAYOUT_OPS) or value.is_graph_output():
            break
        value = users[0].outputs[0]
    return value


# ----------------------------------------------------------------------------- classifiers


def _side_inputs(nodes: Iterable[ir.Node], inside: set[ir.Node]) -> list[tuple[ir.Node, ir.Value]]:
    """Operands of ``nodes`` computed outside ``inside`` (and not scalar constants)."""
    out = []
    for node in nodes:
        for value in node.inputs:
            if value is None or _is_scalar_const(value):
                continue
            producer = value.producer()
            if producer is None or producer not in inside:
                out.append((node, value))
    return out


def _downstream(starts: Iterable[ir.Node], within: set[ir.Node]) -> set[int]:
    seen: set[int] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for out in node.outputs:
            stack += [u for u in out.consumers() if u in within]
    return seen


def _near_upstream(starts: Iterable[ir.Node], within: set[ir.Node], skip: set[int], hops: int) -> list[ir.Node]:
    """Nodes of ``within`` at most ``hops`` ops above ``starts`` (not through values in ``skip``)."""
    found: list[ir.Node] = []
    frontier = list(starts)
    for _ in range(hops):
        nxt = []
        for node in frontier:
            for value in node.inputs:
                producer = value.producer() if value is not None and id(value) not in skip else None
                if producer is not None and producer in within and producer not in found:
                    found.append(producer)
                    nxt.append(producer)
        frontier = nxt
    return found


def _concat_axis(node: ir.Node) -> int | None:
    shape = static_shape(node.outputs[0])
    axis = attr_int(node, "axis", 0)
    if shape is None:
        return axis if axis >= 0 else None
    return axis % len(shape)


def _rope(view: BlockView, lowered: dict[str, str]) -> str:
    """The RoPE of the query path (of the key path when the query has none), or "none"; the RoPE
    ops of both paths are marked for the drawing."""
    on_q = _rope_on(view, view.q_path, lowered)
    on_k = _rope_on(view, view.k_path, lowered)
    return on_q if on_q != "none" else on_k


def _rope_on(view: BlockView, path: list[ir.Node], lowered: dict[str, str]) -> str:
    inside = set(path)
    fused = [n for n in path if n.op_type == "RotaryEmbedding"]
    if fused:
        view.rope_nodes |= {id(n) for n in fused}
        return f"fused {_op_label(fused[0])} (not lowered)"
    projections = [n for n in path if projection_weight(n) is not None]
    data = _downstream(projections, inside) if projections else {id(n) for n in path}
    muls = [
        (node, value)
        for node in path
        if is_op(node, "Mul") and id(node) in data
        for value in node.inputs
        if value is not None
        and not _is_scalar_const(value)
        and (value.producer() is None or id(value.producer()) not in data)
        and not (value.const_value is not None and len([d for d in value.const_value.shape if d != 1]) < 2)
    ]
    tables = {id(v): v for _, v in muls}
    has_sign = any(is_op(n, "Neg", "Sub") for n in path)
    if len(tables) < 2 or not has_sign:
        return "none"
    rope_muls = [n for n, _ in muls]
    down = _downstream(rope_muls, inside)
    feeding = _near_upstream(rope_muls, inside, {id(v) for v in tables.values()}, hops=3)
    view.rope_nodes |= {id(n) for n in rope_muls}
    view.rope_nodes |= {id(n) for n in path if id(n) in down and is_op(n, "Add", "Sub", "Concat")}
    view.rope_nodes |= {id(n) for n in feeding if is_op(n, "Neg", "Slice", "Split", "Concat", "Gather")}
    view.rope_tables |= set(tables)
    interleaved = False
    for node in path:
        if is_op(node, "Slice") and len(node.inputs) > 4:
            steps = const_ints(node.inputs[4])
            interleaved |= bool(steps) and any(abs(s) == 2 for s in steps or [])
        elif is_op(node, "Reshape", "Unsqueeze") and id(node) not in down:
            out, src = static_shape(node.outputs[0]), static_shape(node.inputs[0])
            interleaved |= bool(out and src and len(out) == len(src) + 1 and out[-1] == 2)
    form = "interleaved" if interleaved else "rotate_half"
    partial = ""
    for node in path:
        if not is_op(node, "Concat") or id(node) not in down:
            continue
        shape = static_shape(node.outputs[0])
        if shape is None or _concat_axis(node) != len(shape) - 1:
            continue
        parts = [v for v in node.inputs if v is not None]
        rotated = [v for v in parts if v.producer() is not None and id(v.producer()) in down]
        if rotated and len(rotated) < len(parts):
            dims = [static_shape(v) for v in rotated]
            width = sum(d[-1] for d in dims if d)
            if width < shape[-1]:
                partial = f", partial {width} of {shape[-1]}"
    sources = []
    for value in tables.values():
        inputs, ops, _, _ = _cone(value, 200)
        float_inputs = [v for v in inputs if v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)]
        sources.append("inputs" if float_inputs and not ops & {"Cos", "Sin"} else "graph")
    tables_text = ", cos/sin inputs" if "inputs" in sources else ""
    origin: set[str] = set()
    for node in path:
        if id(node) in view.rope_nodes:
            source = _lowered_from(node, lowered)
            if source is not None:
                origin.add(lowered[source])
    if origin:
        return f"fused {sorted(origin)[0]} (lowered: {form}{partial})"
    return f"{form}{partial}{tables_text}"


def _lowered_from(node: ir.Node, lowered: dict[str, str]) -> str | None:
    """The lowered fused node ``node`` was built from (its name is ``{fused}/...``)."""
    name = node.name or ""
    while "/" in name:
        name = name.rsplit("/", 1)[0]
        if name in lowered:
            return name
    return None


def _causal_array(array: np.ndarray, seq: int | None, total: int | None) -> bool:
    """A lower-triangular mask (offset by the cached length), in any convention: additive
    (0 / very negative), boolean or multiplicative (keep / drop, either polarity)."""
    if seq is None or total is None or seq < 2 or array.ndim < 2 or array.shape[-2:] != (seq, total):
        return False
    first = np.asarray(array).reshape(-1, seq, total)[0]
    expected = np.arange(total)[None, :] <= np.arange(seq)[:, None] + (total - seq)
    if first.dtype == np.bool_:
        candidates = [first]
    else:
        values = np.asarray(first, np.float64)
        candidates = [values > -1e4, values != 0]
    return any(np.array_equal(c, expected) or np.array_equal(~c, expected) for c in candidates)


def _causal_constant(value: ir.Value, seq: int | None, total: int | None) -> bool:
    """A causal mask folded into a constant."""
    tensor = value.const_value
    if tensor is None or tensor.size > _MAX_MASK_ELEMENTS:
        return False
    return _causal_array(np.asarray(tensor.numpy()), seq, total)


class _MaskValues:
    """Computes a mask operand from the graph inputs (a 2-D mask of ones: nothing padded,
    positions after the cached length) by running its small cone, to tell a causal mask built
    from Range / comparisons apart from a padding mask. Values are cached per tensor."""

    def __init__(self, model: ir.Model):
        self.model = model
        self._inputs: object = None
        self._cache: dict[int, bool | None] = {}

    def causal(self, value: ir.Value, seq: int | None, total: int | None) -> bool | None:
        if id(value) not in self._cache:
            try:
                self._cache[id(value)] = self._evaluate(value, seq, total)
            except Exception as e:  # no inputs can be made, onnxruntime refuses the cone: unknown
                logger.debug("mask %s not evaluated: %s", value.name, e)
                self._cache[id(value)] = None
        return self._cache[id(value)]

    def _evaluate(self, value: ir.Value, seq: int | None, total: int | None) -> bool | None:
        from mha2sha.verify.blocks import CHEAP_CONE_BYTES, cone_of, run_sub_model
        from mha2sha.verify.inputs import plan_inputs

        cone = cone_of([value])
        if len(cone.nodes) > _CONE or cone.weight_bytes() > CHEAP_CONE_BYTES:
            return None
        if self._inputs is None:
            self._inputs = plan_inputs(self.model)
        inputs = self._inputs
        feeds = {name: inputs[name] for name in cone.inputs}  # type: ignore[index]
        array = run_sub_model(self.model, cone, feeds, [value])[name_of(value)]
        return _causal_array(array, seq, total)


def _all_zero(value: ir.Value) -> bool:
    tensor = value.const_value
    if tensor is None or tensor.size > _MAX_MASK_ELEMENTS:
        return False
    return not np.any(np.asarray(tensor.numpy()))


def _per_head(value: ir.Value, scores: ir.Value) -> bool:
    """``value`` (broadcast onto the scores) differs per head: its head axis is the scores'."""
    shape, full = static_shape(value), static_shape(scores)
    if shape is None or full is None or len(full) not in (3, 4) or len(shape) > len(full):
        return False
    shape = (1,) * (len(full) - len(shape)) + shape
    axis = 0 if len(full) == 3 else 1
    return full[axis] > 1 and shape[axis] == full[axis]


def _mask(
    view: BlockView, seq: int | None, total: int | None, values: _MaskValues | None
) -> tuple[str, list[str]]:
    """The mask kind (see module docstring) and extra features (per-head bias, softcap)."""
    kinds: list[str] = []
    features: list[str] = []
    scores = view.core.softmax.inputs[0]
    for node, value in view.sides:
        if _is_scalar_const(value):
            continue
        if is_op(node, "Mul", "Div") and value.const_value is not None and value.const_value.size == 1:
            continue
        if is_op(node, "Where") and value is not node.inputs[0] and value.const_value is not None:
            continue  # the fill value of a masked_fill
        if _all_zero(value):
            continue  # baddbmm's empty bias (diffusers), folded to zeros
        per_head = scores is not None and _per_head(value, scores)
        inputs, ops, consts, _ = _cone(value)
        view.mask_values.add(id(value))
        found: list[str] = []
        for inp in inputs:
            shape = static_shape(inp) or ()
            if inp.dtype in (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL) and len(shape) == 2:
                found.append("2-D int mask")
            elif inp.dtype == ir.DataType.BOOL:
                found.append(f"{len(shape)}-D bool mask input")
            elif len(shape) == 4:
                found.append("additive 4-D input")
            elif len(shape) == 2:
                found.append("2-D float mask")
            elif inp.dtype is not None and inp.dtype.is_floating_point():
                found.append(f"{len(shape)}-D float input {inp.name}")
        causal = "Trilu" in ops or any(_causal_constant(c, seq, total) for c in [value, *consts])
        if not causal and ops & _CAUSAL_OPS:
            evaluated = values.causal(value, seq, total) if values is not None else None
            causal = bool(ops & {"Range", "CumSum"}) if evaluated is None else evaluated
        if causal and not per_head:
            found.append("causal (in graph)")
        if per_head:
            features.append("per-head bias (ALiBi / relative position)")
            found = [f for f in found if f == "2-D int mask"]
        kinds += [f for f in found if f not in kinds]
    if any(is_op(n, "Tanh") for n in view.chain):
        features.append("logit softcap")
    return (" + ".join(kinds) or "none"), features


def _kv_cache(view: BlockView) -> tuple[str, int | None, int | None]:
    """KV cache layout, cached length, and KV heads read from the cache."""
    kinds: list[str] = []
    past = kv_heads = None
    for path, which in ((view.k_path, "key"), (view.v_path, "value")):
        concats = [n for n in path if is_cache_concat(n)]
        if not concats:
            continue
        concat = concats[0]
        axis = _concat_axis(concat)
        cache = next(v for v in concat.inputs if v is not None and v.is_graph_input())
        new = [v for v in concat.inputs if v is not None and v is not cache]
        shape = static_shape(cache)
        if shape is not None and axis is not None:
            past = shape[axis]
            if len(shape) == 4:
                kv_heads = shape[1]
        if _forward_outputs(concat.outputs[0]):
            kind = "past/present concat"
        elif any(_backward_outputs(v) for v in new):
            kind = "new entries out"
        else:
            kind = "past in, not returned"
        if kind not in kinds:
            kinds.append(kind)
        if which == "key" and shape is not None and axis is not None and axis == len(shape) - 1 and len(shape) == 4:
            kinds.append("key transposed [B,H,D,T]")
    if not kinds:
        cached = [
            v for n in view.k_path for v in n.inputs
            if v is not None and v.is_graph_input() and len(static_shape(v) or ()) == 4
        ]  # fmt: skip
        if cached and not any(projection_weight(n) is not None for n in view.k_path):
            return "cache input (read only)", None, None
        return "none", None, None
    return ", ".join(kinds), past, kv_heads


def _projections(path: list[ir.Node]) -> list[ir.Node]:
    return [n for n in path if projection_weight(n) is not None]


def _lora(view: BlockView) -> str:
    which = []
    for label, path in (("q", view.q_path), ("k", view.k_path), ("v", view.v_path)):
        for proj in _projections(path):
            data = proj.inputs[0]
            inner = data.producer() if data is not None else None
            weight = projection_weight(inner) if inner is not None else None
            shape = tuple(weight.const_value.shape.numpy()) if weight is not None and weight.const_value is not None else ()
            if len(shape) == 2 and min(shape) * 4 <= max(shape) and label not in which:
                which.append(label)
    return ", ".join(which)


def _packed(view: BlockView) -> str:
    q, k, v = (set(map(id, _projections(p))) for p in (view.q_path, view.k_path, view.v_path))
    if q and q & k and (not v or q & v):
        return "q|k|v"
    if k and v and k & v:
        return "k|v"
    if q and q & k:
        return "q|k"
    return ""


def _cross(view: BlockView) -> bool:
    """Keys computed from another input than the queries (cross-attention)."""

    def sources(path: list[ir.Node]) -> set[int]:
        out = set()
        for proj in _projections(path):
            data = proj.inputs[0]
            inner = data.producer() if data is not None else None
            if inner is not None and projection_weight(inner) is not None:
                continue  # a LoRA branch
            if data is not None:
                out.add(id(data))
        return out

    q, k = sources(view.q_path), sources(view.k_path)
    return bool(q and k and not q & k)


def _layer(view: BlockView, index: int) -> str:
    name = view.core.softmax.name or ""
    folder = name.rsplit("/", 1)[0] if "/" in name else ""
    if folder.strip("/"):
        return folder
    weights = [w.name for n in view.nodes if (w := projection_weight(n)) is not None and w.name]
    parts = [w.split(".") for w in weights if "." in w]
    if parts:
        common = []
        for tokens in zip(*parts, strict=False):
            if len(set(tokens)) != 1:
                break
            common.append(tokens[0])
        prefix = ".".join(common)
        if len(common) >= 2 and any(ch.isdigit() for ch in prefix):
            return prefix
    caches = sorted({name_of(v) for n in view.nodes if is_cache_concat(n) for v in n.inputs if v is not None and v.is_graph_input()})
    if caches:
        return " / ".join(caches)
    return name or f"block {index}"


def _heads_from_shapes(view: BlockView) -> tuple[int | None, int | None]:
    shape = static_shape(view.core.output)
    if shape is None:
        return None, None
    if len(shape) == 4:
        return shape[1], shape[3]
    if len(shape) == 5:
        return shape[1] * shape[2], shape[4]
    return None, shape[-1]


def _info(view: BlockView, index: int, lowered: dict[str, str], values: _MaskValues | None) -> AttentionInfo:
    report = view.report
    info = AttentionInfo(name=report.name, layer=_layer(view, index))
    heads, head_dim = _heads_from_shapes(view)
    info.heads = report.heads or heads
    info.head_dim = report.head_dim or head_dim
    scores = static_shape(view.core.softmax.outputs[0])
    info.seq = scores[-2] if scores and len(scores) >= 2 else None
    total = scores[-1] if scores else None
    info.would_split = report.status == "split"
    info.reason = "" if info.would_split else (report.reason or "single head: nothing to split")
    info.kv_cache, info.past, kv_heads = _kv_cache(view)
    info.kv_heads = report.kv_heads or kv_heads
    info.rope = _rope(view, lowered)
    info.mask, features = _mask(view, info.seq, total, values)
    info.packed_qkv = _packed(view)
    info.lora = _lora(view)
    source = _lowered_from(view.core.softmax, lowered)
    info.fused_op = lowered[source] if source is not None else ""
    if info.heads and info.kv_heads and info.kv_heads < info.heads:
        info.features.append("MQA" if info.kv_heads == 1 else f"GQA {info.heads}/{info.kv_heads}")
    if _cross(view):
        info.features.append("cross-attention")
    if any(n.op_type in _NORM_OPS for n in view.q_path):
        info.features.append("q/k norm")
    if len(static_shape(view.core.output) or ()) == 3:
        info.features.append("heads folded into batch [B*H,S,D]")
    info.features += features
    return info


def _refused_info(refused: RefusedCore, index: int) -> AttentionInfo:
    node = refused.node
    name = refused.name
    layer = name.rsplit("/", 1)[0] if "/" in name.strip("/") else name
    info = AttentionInfo(name=name, layer=layer or f"block {index}", would_split=False, reason=refused.reason)
    if node.op_type in FUSED_ATTENTION_OPS:
        info.fused_op = _op_label(node)
        heads = attr_int(node, "num_heads", 0)
        kv = attr_int(node, "kv_num_heads", 0) or attr_int(node, "k_num_heads", 0)
        info.heads = heads or None
        info.kv_heads = kv or heads or None
        if attr_int(node, "do_rotary", 0):
            info.rope = f"fused {_op_label(node)} (interleaved)" if attr_int(node, "rotary_interleaved", 0) else f"fused {_op_label(node)}"
        if attr_ints(node, "qkv_hidden_sizes") or (node.op_type == "Attention" and not is_onnx_domain(node.domain)):
            info.packed_qkv = "q|k|v"
    elif node.op_type in ("If", "Loop", "Scan"):
        info.features.append(f"inside {node.op_type} subgraphs")
    return info


# ----------------------------------------------------------------------------- drawings

_ROLE_PRIORITY = ("proj", "rope", "kv", "mask", "core", "norm", "layout", "other")


def _role(view: BlockView, node: ir.Node) -> str:
    if projection_weight(node) is not None:
        return "proj"
    if id(node) in view.rope_nodes:
        return "rope"
    if is_cache_concat(node) or (is_op(node, "Expand", "Unsqueeze", "Reshape", "Tile") and len(static_shape(node.outputs[0]) or ()) == 5):
        return "kv"
    if node in view.chain and any(n is node and id(v) in view.mask_values for n, v in view.sides):
        return "mask"
    if node is view.core.softmax or node is view.core.pv_matmul or node is view.qk or node in view.chain:
        return "core"
    if node.op_type in _NORM_OPS:
        return "norm"
    if is_op(node, _MOVE_OPS):
        return "layout"
    return "other"


def _short(name: str | None, limit: int = 34) -> str:
    name = name or "?"
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


class _SketchBuilder:
    def __init__(self, title: str):
        self.sketch = Sketch(title)
        self._ids: dict[object, str] = {}

    def node(self, key: object, label: str, detail: str, role: str, title: str | None = "") -> str:
        if key in self._ids:
            return self._ids[key]
        sid = f"n{len(self._ids)}"
        self._ids[key] = sid
        self.sketch.nodes.append(SketchNode(sid, label, detail, role, title or ""))  # type: ignore[arg-type]
        return sid

    def edge(self, a: str, b: str) -> None:
        if (a, b) not in self.sketch.edges:
            self.sketch.edges.append((a, b))


def _source_role(view: BlockView, value: ir.Value) -> str:
    if id(value) in view.rope_tables:
        return "rope"
    if id(value) in view.mask_values:
        return "mask"
    if value.is_graph_input():
        return "kv" if any(is_cache_concat(u) for u in value.consumers()) else "input"
    return "shared"


def _weight_detail(node: ir.Node) -> str:
    weight = projection_weight(node)
    if weight is None or weight.const_value is None:
        return ""
    return f"W {_shape_text(weight.const_value.shape.numpy())}"


def _mha_sketch(view: BlockView) -> Sketch:
    b = _SketchBuilder("as the graph has it")
    nodes = list(view.nodes) + ([view.o_proj] if view.o_proj is not None and view.o_proj not in view.nodes else [])
    inside = set(nodes)
    for node in nodes:
        detail = _value_shape(node.outputs[0])
        if projection_weight(node) is not None:
            detail = f"{_weight_detail(node)} → {detail}"
        sid = b.node(id(node), _op_label(node), detail, _role(view, node), node.name or node.outputs[0].name)
        for value in node.inputs:
            if value is None or value.const_value is not None:
                continue
            producer = value.producer()
            if producer is not None and producer in inside:
                b.edge(b.node(id(producer), "", "", "other"), sid)
                continue
            src = b.node(("in", id(value)), _short(value.name or "?"), _value_shape(value), _source_role(view, value), value.name)
            b.edge(src, sid)
        for out in node.outputs:
            if out.is_graph_output():
                b.edge(sid, b.node(("out", id(out)), _short(out.name), _value_shape(out), "output", out.name))
    last = view.o_proj or (view.end.producer() if view.end is not None else None)
    if last is not None and last in inside:
        b.edge(b.node(id(last), "", "", "other"), b.node("rest", "rest of the model", "", "output"))
    return b.sketch


def _ranges_text(shape: tuple[int, ...], ranges: tuple[tuple[int, int, int], ...]) -> str:
    cut = {axis % len(shape): (start, stop) for axis, start, stop in ranges}
    return "[" + ",".join(f"{cut[a][0]}:{cut[a][1]}" if a in cut else ":" for a in range(len(shape))) + "]"


def _sha_sketch(view: BlockView, heads: int, kv_heads: int | None) -> Sketch | None:
    block = view.planned
    if block is None:
        return None
    region = block.region
    b = _SketchBuilder("one head after the split (head 0)")
    head = 0
    steps = list(region.steps.values())
    order = {id(n): i for i, n in enumerate(view.nodes)}
    node_steps = sorted((s for s in steps if s.kind == "node" and s.node is not None), key=lambda s: order.get(id(s.node), 0))
    for step in node_steps:
        node = step.node
        assert node is not None
        shape = static_shape(step.value)
        detail = _shape_text(piece_shape(shape, step.spec)) if shape is not None else "?"
        extra = []
        for value, spec in zip(node.inputs, step.in_specs, strict=False):
            if value is None or not spec:
                continue
            child = region.steps.get((id(value), spec))
            if child is not None and child.kind == "param":
                wshape = static_shape(value)
                if wshape is not None:
                    extra.append(f"{_short(value.name, 22)}{_ranges_text(wshape, piece_ranges(spec, head))}")
        if extra:
            detail = f"{'; '.join(extra)} → {detail}"
        sid = b.node((id(step.value), step.spec), _op_label(node), detail, _role(view, node), node.name or step.value.name)
        for value, spec in zip(node.inputs, step.in_specs, strict=False):
            if value is None or value.const_value is not None:
                continue
            if not spec:
                src = b.node(("in", id(value)), _short(value.name or "?"), _value_shape(value), _source_role(view, value), value.name)
                b.edge(src, sid)
                continue
            child = region.steps.get((id(value), spec))
            if child is None:
                continue
            if child.kind == "node":
                b.edge(b.node((id(value), spec), "", "", "other"), sid)
            elif child.kind == "input":
                src = b.node(("cut", id(value), spec), f"{_short(value.name, 24)} (cut in graph)", _ranges_text(static_shape(value) or (), piece_ranges(spec, head)), "kv" if _source_role(view, value) == "kv" else "input", value.name)
                b.edge(src, sid)
            elif child.kind == "activation":
                if child.reason == CACHE_CONCAT_REASON:
                    kv = f"KV head 0 of {kv_heads}" if kv_heads else "KV head 0"
                    src = b.node(("cut", id(value), spec), "Concat(past, new) whole", f"{_value_shape(value)} → {kv}", "kv", value.name)
                else:
                    src = b.node(("cut", id(value), spec), f"cut {_short(value.name, 22)}", child.reason, "shared", value.name)
                b.edge(src, sid)
    start = b.node((id(block.start), block.start_spec), "", "", "other")
    join = b.node("join", f"Concat {heads} heads", _value_shape(block.start), "join")
    b.edge(start, join)
    if view.o_proj is not None:
        b.edge(join, b.node("o_proj", _op_label(view.o_proj), f"{_weight_detail(view.o_proj)} (whole)", "proj", view.o_proj.name))
    note = f"head 0 of {heads}; every head has the same ops on its own slices"
    if kv_heads and kv_heads < heads:
        note += f"; KV head 0 serves query heads 0-{heads // kv_heads - 1}"
    b.sketch.note = note
    return b.sketch


# ----------------------------------------------------------------------------- kinds


def _summary(info: AttentionInfo) -> str:
    parts = []
    if info.heads:
        parts.append(f"{info.heads} heads" + (f" / {info.kv_heads} KV" if info.kv_heads and info.kv_heads != info.heads else ""))
    if info.head_dim:
        parts.append(f"head dim {info.head_dim}")
    if info.seq:
        parts.append(f"{info.seq} tokens" + (f" on {info.past} cached" if info.past else ""))
    for label, value in (("RoPE", info.rope), ("mask", info.mask), ("KV", info.kv_cache)):
        if value and value != "none":
            parts.append(f"{label}: {value}")
    if info.packed_qkv:
        parts.append(f"packed {info.packed_qkv}")
    if info.lora:
        parts.append(f"LoRA on {info.lora}")
    if info.fused_op:
        parts.append(f"from {info.fused_op}")
    parts += info.features
    parts.append("splits" if info.would_split else f"not split: {info.reason}")
    return "; ".join(parts)


def _signature(info: AttentionInfo, view: BlockView | None) -> tuple:
    ops = tuple(sorted(collections.Counter(_op_label(n) for n in view.nodes).items())) if view else ()
    return (
        info.would_split, re.sub(r"'[^']*'", "'…'", info.reason), info.heads, info.kv_heads, info.head_dim,
        info.seq, info.past, info.rope, info.mask, info.kv_cache, info.packed_qkv, info.lora, info.fused_op,
        tuple(info.features), ops,
    )  # fmt: skip


def _label(i: int) -> str:
    label = ""
    i += 1
    while i:
        i, rem = divmod(i - 1, 26)
        label = chr(65 + rem) + label
    return label


def describe_attention(
    model: ir.Model,
    plan: SplitPlan,
    lowering: LowerRecord | None = None,
    *,
    sketches: bool = True,
    examples: list[tuple[str, list[ir.Node]]] | None = None,
) -> StructureRecord:
    """Every attention block of the plan, classified, grouped into kinds (one drawing pair each).

    Call it between :meth:`SplitHeadsPass.plan` and :meth:`SplitHeadsPass.apply`: it reads the
    graph the plan was made on. ``examples`` (a list) receives, per kind, a label and the ops of
    its first block: what the HTP support probe runs.
    """
    lowered = {name: op for name, op, _ in (lowering.lowered if lowering else [])}
    record = StructureRecord()
    entries: list[tuple[AttentionInfo, BlockView | None]] = []
    for i, refused in enumerate(plan.refused):
        entries.append((_refused_info(refused, i), None))
    values = _MaskValues(model)
    for i, block in enumerate(block_views(model, plan)):
        try:
            info = _info(block, i, lowered, values)
        except Exception as e:  # a classifier's bug must not hide the rest of the report
            logger.exception("describing attention block %s failed", block.report.name)
            info = AttentionInfo(block.report.name, block.core.softmax.name or "", would_split=block.report.status == "split")
            info.reason = block.report.reason
            info.features.append(f"analysis error: {type(e).__name__}: {e}")
        entries.append((info, block))
    kinds: dict[tuple, BlockKind] = {}
    for info, view in entries:
        key = _signature(info, view)
        kind = kinds.get(key)
        if kind is None:
            kind = BlockKind(_label(len(kinds)), [], [], _summary(info))
            if sketches and view is not None:
                try:
                    kind.mha = _mha_sketch(view)
                    kind.sha = _sha_sketch(view, info.heads or 1, info.kv_heads) if info.would_split else None
                except Exception:
                    logger.exception("drawing attention block %s failed", info.name)
            kinds[key] = kind
            if examples is not None and view is not None:
                # the output projection is left out: a MatMul like q_proj's, and its weight would
                # add a quarter to the probe's memory
                examples.append((f"attention kind {kind.label} ({info.name})", list(view.nodes)))
        kind.blocks.append(info.name)
        kind.layers.append(info.layer)
        info.kind = kind.label
        record.blocks.append(info)
    record.kinds = list(kinds.values())
    return record
