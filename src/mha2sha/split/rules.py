"""Per-op rules of the head split: one row per op type, holding everything the split knows of it.

A :class:`Rule` answers, for a node whose output ``out_index`` is cut per head by ``spec``:
- ``backward``: which part of each input does one head need? (``None``: the input is shared whole
  by every head.) It raises :class:`Unsplittable` when the op mixes heads or the shapes do not
  allow a contiguous cut; the walk then stops there.
- ``forward``: for pure data movement, the output's cut given input 0's cut (used to push the head
  join past Transpose/Reshape towards the output projection); ``None`` for other ops.
- ``emit``: how a head's node is built (:mod:`mha2sha.split.emit`): ``"clone"`` the op on per-head
  inputs, ``"reshape"`` one Reshape/Expand to the piece's shape, ``"tile"`` a Tile with the piece's
  repeats.
- ``identity_when``: for slicing ops, when the slice is taken along a cut axis the head's input
  piece already is its output piece, and no node is emitted.
Adding an op is one row in :data:`RULES` and one row in ``tests/split/test_rules.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import onnx_ir as ir

from mha2sha.graph import (
    BROADCAST_OPS,
    RESHAPE_OPS,
    UNARY_OPS,
    attr_int,
    attr_ints,
    const_ints,
    is_onnx_domain,
)
from mha2sha.graph import static_shape as shape_or_none
from mha2sha.split.reshape_map import Unmappable, map_spec_through_reshape
from mha2sha.split.spec import AxisCut, HeadSpec

__all__ = ["Unsplittable", "Rule", "RULES", "forward_spec", "rule_of", "static_shape"]

InSpecs = list[HeadSpec | None]


class Unsplittable(Exception):
    """The op cannot be computed per head from per-head inputs."""


def static_shape(value: ir.Value | None) -> tuple[int, ...]:
    """The static shape every tensor of a split region must have (else the walk stops here).

    ``value`` is a node input the op requires (``node.inputs[k]`` is typed optional because
    optional inputs may be omitted; a required one is always there)."""
    assert value is not None, "a required input is missing"
    shape = shape_or_none(value)
    if shape is None:
        raise Unsplittable(f"tensor '{value.name}' has no static shape")
    return shape


def _broadcast(spec: HeadSpec, out_shape: tuple[int, ...], value: ir.Value | None) -> HeadSpec | None:
    """The part of a broadcast operand one head needs (numpy right-aligned broadcasting)."""
    if value is None:
        return None
    shape = static_shape(value)
    shift = len(out_shape) - len(shape)
    cuts = []
    for cut in spec:
        axis = cut.axis - shift
        if axis < 0 or shape[axis] == 1:
            continue  # broadcast over the head axis: shared by every head
        if shape[axis] != out_shape[cut.axis]:
            raise Unsplittable(f"operand '{value.name}' {shape} does not broadcast to {out_shape}")
        cuts.append(cut.moved(axis))
    return tuple(cuts) or None


def _out_shape(node: ir.Node, out_index: int) -> tuple[int, ...]:
    return static_shape(node.outputs[out_index])


def elementwise(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    out_shape = _out_shape(node, out_index)
    return [_broadcast(spec, out_shape, v) for v in node.inputs]


def first_input(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    """Ops that act per element (or along axes we check) on input 0; other inputs are parameters."""
    return [spec] + [None] * (len(node.inputs) - 1)


def _check_axes_uncut(spec: HeadSpec, axes: Sequence[int], rank: int, op: str) -> None:
    normalized = {a % rank for a in axes}
    if any(cut.axis in normalized for cut in spec):
        raise Unsplittable(f"{op} acts across the head axis")


def along_axis(default_axis: int) -> Callable[[ir.Node, int, HeadSpec], InSpecs]:
    """Softmax-like ops: fine unless their ``axis`` attribute is a cut axis."""

    def rule(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
        rank = len(_out_shape(node, 0))
        _check_axes_uncut(spec, [attr_int(node, "axis", default_axis)], rank, node.op_type)
        return first_input(node, out_index, spec)

    return rule


def cumsum(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    axis = const_ints(node.inputs[1])
    if axis is None:
        raise Unsplittable("CumSum with a dynamic axis")
    _check_axes_uncut(spec, axis, len(_out_shape(node, 0)), "CumSum")
    return first_input(node, out_index, spec)


def normalization(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    """LayerNorm / RMSNorm over the trailing axes: fine when every cut axis is a leading axis."""
    if out_index != 0:
        raise Unsplittable(f"{node.op_type} statistics output")
    rank = len(_out_shape(node, 0))
    axis = attr_int(node, "axis", -1) % rank
    if any(cut.axis >= axis for cut in spec):
        raise Unsplittable(f"{node.op_type} normalises across the head axis")
    return first_input(node, out_index, spec)


def reduce(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    in_shape = static_shape(node.inputs[0])
    rank = len(in_shape)
    axes = attr_ints(node, "axes")
    if axes is None and len(node.inputs) > 1:
        axes = const_ints(node.inputs[1])
        if axes is None:
            raise Unsplittable(f"{node.op_type} with dynamic axes")
    axes = sorted(a % rank for a in (axes if axes is not None else range(rank)))
    if attr_int(node, "keepdims", 1):
        mapping = list(range(rank))
    else:
        mapping = [a for a in range(rank) if a not in axes]
    cuts = []
    for cut in spec:
        in_axis = mapping[cut.axis]
        if in_axis in axes:
            raise Unsplittable(f"{node.op_type} reduces the head axis")
        cuts.append(cut.moved(in_axis))
    return [tuple(cuts)] + [None] * (len(node.inputs) - 1)


def transpose(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    rank = len(_out_shape(node, 0))
    perm = attr_ints(node, "perm") or list(reversed(range(rank)))
    return [tuple(sorted(cut.moved(perm[cut.axis]) for cut in spec))]


def reshape(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    try:
        in_spec = map_spec_through_reshape(spec, _out_shape(node, 0), static_shape(node.inputs[0]))
    except Unmappable as e:
        raise Unsplittable(f"{node.op_type}: {e}") from e
    return [in_spec] + [None] * (len(node.inputs) - 1)


def expand(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    return [_broadcast(spec, _out_shape(node, 0), node.inputs[0]), None]


def matmul(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    out_shape = _out_shape(node, 0)
    a, b = node.inputs[0], node.inputs[1]
    rank = len(out_shape)
    if len(static_shape(a)) < 2 or len(static_shape(b)) < 2:
        raise Unsplittable("MatMul with a 1-D operand")
    a_cuts: list[AxisCut] = []
    b_cuts: list[AxisCut] = []
    for cut in spec:
        if cut.axis == rank - 1:
            b_cuts.append(cut.moved(len(static_shape(b)) - 1))
        elif cut.axis == rank - 2:
            a_cuts.append(cut.moved(len(static_shape(a)) - 2))
        else:  # batch axis: broadcast rules over the batch dims
            batch_spec = (cut,)
            for cuts, operand in ((a_cuts, a), (b_cuts, b)):
                cuts.extend(_broadcast(batch_spec, out_shape, operand) or ())
    return [tuple(sorted(a_cuts)) or None, tuple(sorted(b_cuts)) or None]


def gemm(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    out_shape = _out_shape(node, 0)
    trans_a, trans_b = attr_int(node, "transA", 0), attr_int(node, "transB", 0)
    a_cuts, b_cuts = [], []
    for cut in spec:
        if cut.axis == 0:
            a_cuts.append(cut.moved(1 if trans_a else 0))
        else:
            b_cuts.append(cut.moved(0 if trans_b else 1))
    c = node.inputs[2] if len(node.inputs) > 2 else None
    return [tuple(a_cuts) or None, tuple(b_cuts) or None] + (
        [_broadcast(spec, out_shape, c)] if c is not None else []
    )


def conv(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    if attr_int(node, "group", 1) != 1:
        raise Unsplittable("grouped Conv")
    x_cuts, w_cuts = [], []
    for cut in spec:
        if cut.axis == 1:
            w_cuts.append(cut.moved(0))
        elif cut.axis == 0:
            x_cuts.append(cut)
        else:
            raise Unsplittable("Conv cut on a spatial axis")
    bias = [tuple(c.moved(0) for c in w_cuts) or None] if len(node.inputs) > 2 else []
    return [tuple(x_cuts) or None, tuple(w_cuts) or None] + bias


def _slice_bounds(node: ir.Node) -> dict[int, tuple[int, int]]:
    """Static Slice parameters as {axis: (start, stop)}; raises for steps other than 1."""
    in_shape = static_shape(node.inputs[0])
    rank = len(in_shape)
    starts = const_ints(node.inputs[1])
    ends = const_ints(node.inputs[2])
    axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or ends is None:
        raise Unsplittable("Slice with dynamic bounds")
    axes = list(range(len(starts))) if axes is None else axes
    if steps is not None and any(s != 1 for s in steps):
        raise Unsplittable("Slice with step != 1")
    bounds = {}
    for axis, start, end in zip(axes, starts, ends, strict=True):
        axis %= rank
        dim = in_shape[axis]
        start = min(max(start + dim if start < 0 else start, 0), dim)
        end = min(max(end + dim if end < 0 else end, 0), dim)
        bounds[axis] = (start, end)
    return bounds


def slice_(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    bounds = _slice_bounds(node)
    cuts = [
        cut.moved(cut.axis, offset=cut.offset + bounds[cut.axis][0]) if cut.axis in bounds else cut
        for cut in spec
    ]
    return [tuple(cuts)] + [None] * (len(node.inputs) - 1)


def _split_starts(node: ir.Node) -> tuple[int, list[int]]:
    in_shape = static_shape(node.inputs[0])
    axis = attr_int(node, "axis", 0) % len(in_shape)
    sizes = [static_shape(o)[axis] for o in node.outputs]
    return axis, [sum(sizes[:k]) for k in range(len(sizes))]


def split(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    axis, starts = _split_starts(node)
    cuts = [
        cut.moved(axis, offset=cut.offset + starts[out_index]) if cut.axis == axis else cut for cut in spec
    ]
    return [tuple(cuts)] + [None] * (len(node.inputs) - 1)


def gather(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    data_rank = len(static_shape(node.inputs[0]))
    axis = attr_int(node, "axis", 0) % data_rank
    q = len(static_shape(node.inputs[1]))
    cuts = []
    for cut in spec:
        if cut.axis < axis:
            cuts.append(cut)
        elif cut.axis >= axis + q:
            cuts.append(cut.moved(cut.axis - q + 1))
        else:
            raise Unsplittable("Gather indices carry the head axis")
    return [tuple(cuts), None]


def concat(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    rank = len(_out_shape(node, 0))
    axis = attr_int(node, "axis", 0) % rank
    on_axis = [cut for cut in spec if cut.axis == axis]
    if not on_axis:
        return [spec for _ in node.inputs]
    if len(spec) != 1:
        raise Unsplittable("Concat along the head axis with other cuts")
    (cut,) = spec
    lo, hi = cut.offset, cut.offset + cut.block * cut.count
    start = 0
    for k, value in enumerate(node.inputs):
        size = static_shape(value)[axis]
        if start <= lo and hi <= start + size:
            specs: InSpecs = [None] * len(node.inputs)
            specs[k] = (cut.moved(axis, offset=lo - start),)
            return specs
        start += size
    raise Unsplittable("Concat along the head axis spans several inputs")


def tile(node: ir.Node, out_index: int, spec: HeadSpec) -> InSpecs:
    """``repeat_kv`` as Unsqueeze -> Tile: a repeated axis of size 1 is shared (query head ``h`` uses
    KV head ``h // g`` through the cut on the axis before it); a repeated axis of size ``n`` maps
    piece ``i`` to input piece ``i mod (n / block)``."""
    in_shape = static_shape(node.inputs[0])
    repeats = const_ints(node.inputs[1])
    if repeats is None:
        raise Unsplittable("Tile with dynamic repeats")
    cuts = []
    for cut in spec:
        n, r = in_shape[cut.axis], repeats[cut.axis]
        if r == 1:
            cuts.append(cut)
        elif n == 1:
            continue  # every head uses the one repeated slice
        elif n % cut.block == 0 and cut.offset == 0 and cut.count % (n // cut.block) == 0:
            cuts.append(dataclasses.replace(cut, count=n // cut.block))
        else:
            raise Unsplittable(f"Tile repeats the head axis {cut.axis} in pieces that straddle copies")
    return [tuple(cuts) or None, None]


# --- forward rules: data movement carries a cut from input 0 to the output --------------------


def transpose_forward(node: ir.Node, spec: HeadSpec) -> HeadSpec:
    rank = len(static_shape(node.inputs[0]))
    perm = attr_ints(node, "perm") or list(reversed(range(rank)))
    return tuple(sorted(cut.moved(perm.index(cut.axis)) for cut in spec))


def reshape_forward(node: ir.Node, spec: HeadSpec) -> HeadSpec:
    try:
        return map_spec_through_reshape(spec, static_shape(node.inputs[0]), _out_shape(node, 0))
    except Unmappable as e:
        raise Unsplittable(str(e)) from e


# --- slicing ops: no node per head when the slice lies along a cut axis ----------------------


def slices_cut_axis(node: ir.Node, out_index: int, spec: HeadSpec) -> bool:
    """Slice/Split/Concat along a cut axis: the head's input piece is its output piece."""
    op = node.op_type
    if op == "Slice":
        return any(cut.axis in _slice_bounds(node) for cut in spec)
    if op == "Split":
        axis, _ = _split_starts(node)
        return any(cut.axis == axis for cut in spec)
    rank = len(_out_shape(node, out_index))
    return any(cut.axis == attr_int(node, "axis", 0) % rank for cut in spec)


Backward = Callable[[ir.Node, int, HeadSpec], InSpecs]


@dataclasses.dataclass(frozen=True)
class Rule:
    """Everything the split knows about one op type (see the module docstring)."""

    backward: Backward
    emit: Literal["clone", "reshape", "tile"] = "clone"
    forward: Callable[[ir.Node, HeadSpec], HeadSpec] | None = None
    identity_when: Callable[[ir.Node, int, HeadSpec], bool] | None = None


_REDUCE_OPS = "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL2 ReduceSumSquare".split()
_NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")

RULES: dict[str, Rule] = {
    **{op: Rule(elementwise) for op in sorted(BROADCAST_OPS)},
    **{op: Rule(first_input) for op in sorted(UNARY_OPS)},
    "Softmax": Rule(along_axis(-1)),
    "LogSoftmax": Rule(along_axis(-1)),
    "CumSum": Rule(cumsum),
    **{op: Rule(normalization) for op in _NORM_OPS},
    **{op: Rule(reduce) for op in _REDUCE_OPS},
    "Transpose": Rule(transpose, forward=transpose_forward),
    **{op: Rule(reshape, "reshape", forward=reshape_forward) for op in sorted(RESHAPE_OPS)},
    "Expand": Rule(expand, "reshape"),
    "Tile": Rule(tile, "tile"),
    "MatMul": Rule(matmul),
    "Gemm": Rule(gemm),
    "Conv": Rule(conv),
    "Slice": Rule(slice_, identity_when=slices_cut_axis),
    "Split": Rule(split, identity_when=slices_cut_axis),
    "Gather": Rule(gather),
    "Concat": Rule(concat, identity_when=slices_cut_axis),
}


def rule_of(node: ir.Node) -> Rule | None:
    """The split rule of ``node`` (ONNX domain only; contrib ops are lowered before the split)."""
    return RULES.get(node.op_type) if is_onnx_domain(node.domain) else None


def forward_spec(node: ir.Node, spec: HeadSpec) -> HeadSpec:
    """Carry a cut on input 0 forward through a data-movement op; raises :class:`Unsplittable`
    for ops without a forward rule."""
    rule = rule_of(node)
    if rule is None or rule.forward is None:
        raise Unsplittable(f"no forward rule for {node.op_type}")
    return rule.forward(node, spec)
