"""Per-op rules of the AR/CL trace, read like a table (:data:`FORWARD`, :data:`BACKWARD`).

A forward rule computes a node's output :class:`~mha2sha.arcl.trace.State` s (shapes as Dims, and
the values of small integer tensors) from its inputs, asking the trace to explain a constant
size where it meets a moving one (``t.unify``, ``t.require_axis``, ``t.require_elem``).
A backward rule answers "this output must have size ``d`` on axis ``i`` (or value ``d`` at element
``i``): what must the inputs have?" as a list of requests ``(input index, "axis"|"elem", index, Dim)``;
it raises :class:`~mha2sha.arcl.trace.Unexplained` when nothing can make it so.

Values that say *where* rather than *how much* (axes, perms, split sizes, gather indices, pads) must
stay constant: a rule refuses them when they would move.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from mha2sha.arcl.dims import Dim, NotLinear, P, dim
from mha2sha.arcl.trace import DATA_LIMIT, State, Trace, Unexplained, is_const
from mha2sha.graph import attr_int, attr_ints
from mha2sha.split.reshape_map import Unmappable, reshape_groups

#: A change a rule asks of an input: (input index, "axis" | "elem", position, size[, optional]).
Request = tuple[int, str, int, Dim] | tuple[int, str, int, Dim, bool]

__all__ = ["FORWARD", "BACKWARD"]

Forward = Callable[[Trace, ir.Node, list], list]
Backward = Callable[[Trace, ir.Node, int, str, int, Dim], list]

#: A Slice end at least this large means "to the end" (exporters write INT64_MAX or INT32_MAX).
_TO_END = 1 << 30


# ------------------------------------------------------------------------------------- helpers


def _shape(s: State | None) -> tuple[Dim, ...]:
    if s is None or s.shape is None:
        raise Unexplained("an input has no known shape")
    return s.shape


def _size(shape: Sequence[Dim]) -> int | None:
    if any(d.symbolic for d in shape):
        return None
    return int(math.prod(int(d) for d in shape))


def _small(shape: Sequence[Dim]) -> bool:
    size = _size(shape)
    return size is not None and size <= DATA_LIMIT


def _prod(dims: Sequence[Dim]) -> Dim:
    out = Dim(1)
    for d in dims:
        out = out * d
    return out


def _data(arr: list | np.ndarray, shape: Sequence[Dim]) -> np.ndarray:
    out = np.empty(tuple(int(d) for d in shape), dtype=object)
    flat = out.reshape(-1)
    values = np.asarray(arr, dtype=object).reshape(-1)
    for i in range(flat.size):
        flat[i] = dim(values[i])
    return out


def _ints(t: Trace, node: ir.Node, s: State | None, what: str) -> list[int]:
    return t.concrete_ints(node, s, what)


def _is_float_const(value: ir.Value | None) -> bool:
    if not is_const(value):
        return False
    dtype = value.const_value.dtype if value.const_value is not None else None  # type: ignore[union-attr]
    return dtype is not None and dtype.is_floating_point()


# ------------------------------------------------------------------------------------- data ops

_INT_FN: dict[str, Callable[..., int]] = {
    "Equal": lambda a, b: int(a == b),
    "Less": lambda a, b: int(a < b),
    "LessOrEqual": lambda a, b: int(a <= b),
    "Greater": lambda a, b: int(a > b),
    "GreaterOrEqual": lambda a, b: int(a >= b),
    "And": lambda a, b: int(bool(a) and bool(b)),
    "Or": lambda a, b: int(bool(a) or bool(b)),
    "Xor": lambda a, b: int(bool(a) != bool(b)),
    "Max": max,
    "Min": min,
    "Mod": lambda a, b: a % b,
    "Not": lambda a: int(not a),
    "Abs": abs,
}


def _trunc_div(a: Dim, b: Dim) -> Dim:
    if not a.symbolic and not b.symbolic:
        q = abs(int(a)) // abs(int(b))
        return Dim(q if (int(a) >= 0) == (int(b) >= 0) else -q)
    return a // b


_DIM_FN: dict[str, Callable[..., Dim]] = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": _trunc_div,
    "Neg": lambda a: -a,
}


def _elementwise_data(
    t: Trace, op: str, inputs: list[State | None], out_shape: Sequence[Dim]
) -> np.ndarray | None:
    if not _small(out_shape) or any(s is None or s.data is None for s in inputs):
        return None
    arrays = np.broadcast_arrays(*[s.data for s in inputs if s is not None and s.data is not None])
    out = np.empty(arrays[0].shape, dtype=object)
    for idx in np.ndindex(out.shape):
        args = [a[idx] for a in arrays]
        if op == "Where":
            cond = t.decide(lambda c: int(c != 0), args[0])
            if cond is None:
                return None
            out[idx] = args[1] if int(cond) else args[2]
            continue
        fn = _DIM_FN.get(op)
        if fn is not None:
            try:
                out[idx] = fn(*args)
                continue
            except (NotLinear, ZeroDivisionError):
                return None
        ifn = _INT_FN.get(op)
        if ifn is None:
            return None
        r = t.decide(ifn, *args)
        if r is None:
            return None
        out[idx] = r
    return out


# ------------------------------------------------------------------------------------- forward


def f_same(t: Trace, node: ir.Node, ins: list) -> list:
    """Shape-preserving ops; Identity/Cast/Neg/Abs/Not keep integer values."""
    s = ins[0]
    shape = _shape(s)
    data = None
    if s.data is not None:
        op = node.op_type
        if op in ("Identity", "CastLike") or op == "Cast" and attr_int(node, "to", 0) != ir.DataType.BOOL:
            data = s.data
        elif op == "Cast":
            data = _elementwise_data(t, "Not", [State(shape, _elementwise_data(t, "Not", [s], shape))], shape)
        elif op in ("Neg", "Abs", "Not"):
            data = _elementwise_data(t, op, [s], shape)
    return [State(shape, data)] + [State(shape) for _ in node.outputs[1:]]


def f_broadcast(t: Trace, node: ir.Node, ins: list) -> list:
    present = [(i, s) for i, s in enumerate(ins) if s is not None]
    rank = max(len(_shape(s)) for _, s in present)
    out = []
    for k in range(rank):
        entries = []
        for i, _ in present:
            shape = _shape(t.input(node, i))
            off = rank - len(shape)
            if k >= off:
                entries.append((i, k - off, shape[k - off]))
        out.append(t.unify(node, entries))
    ins = [t.input(node, i) for i in range(len(node.inputs))]
    return [State(tuple(out), _elementwise_data(t, node.op_type, ins, out))]


def f_matmul(t: Trace, node: ir.Node, ins: list) -> list:
    a, b = _shape(ins[0]), _shape(ins[1])
    if len(a) < 2 or len(b) < 2:
        raise Unexplained("MatMul of a 1-D tensor")
    t.unify(node, [(0, len(a) - 1, a[-1]), (1, len(b) - 2, b[-2])], broadcast=False)
    a, b = _shape(t.input(node, 0)), _shape(t.input(node, 1))
    rank = max(len(a), len(b))
    batch = []
    for k in range(rank - 2):
        entries = []
        for i, sh in ((0, a), (1, b)):
            off = rank - len(sh)
            if k >= off:
                entries.append((i, k - off, sh[k - off]))
        batch.append(t.unify(node, entries))
    return [State((*batch, a[-2], b[-1]))]


def f_gemm(t: Trace, node: ir.Node, ins: list) -> list:
    a, b = _shape(ins[0]), _shape(ins[1])
    ta, tb = attr_int(node, "transA", 0), attr_int(node, "transB", 0)
    m, k_a = (a[1], a[0]) if ta else (a[0], a[1])
    k_b, n = (b[1], b[0]) if tb else (b[0], b[1])
    t.unify(node, [(0, 0 if ta else 1, k_a), (1, 1 if tb else 0, k_b)], broadcast=False)
    return [State((m, n))]


def f_conv(t: Trace, node: ir.Node, ins: list) -> list:
    x, w = _shape(ins[0]), _shape(ins[1])
    if x[1].symbolic:
        raise Unexplained("Conv channels move with AR/CL")
    spatial = len(x) - 2
    kernel = [int(d) for d in w[2:]]
    strides = attr_ints(node, "strides") or [1] * spatial
    dil = attr_ints(node, "dilations") or [1] * spatial
    pads = attr_ints(node, "pads") or [0] * (2 * spatial)
    auto = node.attributes.get("auto_pad")
    auto_pad = auto.as_string() if auto is not None else "NOTSET"
    out = [x[0], w[0]]
    for i in range(spatial):
        size = x[2 + i]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            if strides[i] != 1 and size.symbolic:
                raise Unexplained("strided Conv along a moving axis")
            out.append(size if strides[i] == 1 else Dim(-(-int(size) // strides[i])))
            continue
        span = size + pads[i] + pads[i + spatial] - dil[i] * (kernel[i] - 1) - 1
        if strides[i] == 1:
            out.append(span + 1)
        elif size.symbolic:
            raise Unexplained("strided Conv along a moving axis")
        else:
            out.append(Dim(int(span) // strides[i] + 1))
    return [State(tuple(out))]


def f_transpose(t: Trace, node: ir.Node, ins: list) -> list:
    shape = _shape(ins[0])
    perm = attr_ints(node, "perm") or list(reversed(range(len(shape))))
    data = None
    if ins[0].data is not None:
        data = np.transpose(ins[0].data, perm)
    return [State(tuple(shape[p] for p in perm), data)]


def _target(t: Trace, node: ir.Node, s: State | None) -> list[Dim]:
    if s is None or s.data is None:
        raise Unexplained(f"the target shape of {node.op_type} '{node.name}' is not known")
    return list(s.data.reshape(-1))


def f_reshape(t: Trace, node: ir.Node, ins: list) -> list:
    x = _shape(ins[0])
    tgt = _target(t, node, ins[1])
    allowzero = attr_int(node, "allowzero", 0)
    out0 = _reshape_orig(t, x, tgt, allowzero)
    groups = _size_one_pairs(x, out0, _groups(node, [t.orig(d) for d in x], out0))
    out: list[Dim] = [Dim(s) for s in out0]
    for gi, go in groups:
        moving = [j for j in gi if x[j].symbolic]
        if not moving:
            for k in go:
                if tgt[k].symbolic:
                    out[k] = tgt[k]
            continue
        if len(moving) == 1:
            j = moving[0]
            outer = math.prod(t.orig(x[a]) for a in gi if a < j)
            inner = math.prod(t.orig(x[a]) for a in gi if a > j)
            if len(go) == 1:
                out[go[0]] = x[j] * (outer * inner)
                continue
            hits = [
                k
                for k in go
                if math.prod(out0[b] for b in go if b > k) == inner
                and math.prod(out0[b] for b in go if b < k) == outer
            ]
            if len(hits) != 1:
                raise Unexplained(f"cannot tell which axis of {out0} carries {x[j]} of the input")
            out[hits[0]] = x[j]
            continue
        if len(gi) == len(go) and all(t.orig(x[a]) == out0[b] for a, b in zip(gi, go, strict=True)):
            for a, b in zip(gi, go, strict=True):
                out[b] = x[a]
            continue
        raise Unexplained(f"two moving sizes ({', '.join(str(x[j]) for j in moving)}) merged by one reshape")
    for k, e in enumerate(tgt):
        if e == -1 or (e == 0 and not allowzero):
            continue
        if e == out[k]:
            continue
        if not e.symbolic and out[k].symbolic:
            t.require_elem(node, 1, k, out[k])
        elif e.symbolic and not out[k].symbolic:
            raise Unexplained(f"target entry {k} moves ({e}) but the reshaped axes do not")
        else:
            raise Unexplained(f"target entry {k} is {e}, the reshape needs {out[k]}")
    data = None
    if ins[0].data is not None:
        data = ins[0].data.reshape(out0)
    return [State(tuple(out), data)]


def _reshape_orig(t: Trace, x: Sequence[Dim], tgt: Sequence[Dim], allowzero: int) -> list[int]:
    src = [t.orig(d) for d in x]
    dst = [t.orig(e) for e in tgt]
    for k, e in enumerate(dst):
        if e == 0 and not allowzero:
            dst[k] = src[k]
    if -1 in dst:
        known = math.prod(e for e in dst if e != -1)
        dst[dst.index(-1)] = math.prod(src) // known if known else 0
    return dst


def _size_one_pairs(
    x: Sequence[Dim], out0: Sequence[int], groups: list[tuple[list[int], list[int]]]
) -> list[tuple[list[int], list[int]]]:
    """Where AR (or P) is 1, size-1 axes pair ambiguously; keep the token axis after the batch:
    a moving size-1 axis left without a partner takes the one of a fixed size-1 axis next to it
    (``[1, AR, 64] -> [1, 64]`` drops the batch axis), and a leading one paired with a leading
    size-1 axis followed by a new size-1 axis takes that one (``[AR, 64] -> [1, AR, 64]`` adds a batch
    axis in front)."""
    groups = [(list(gi), list(go)) for gi, go in groups]
    for g, (gi, go) in enumerate(groups):
        if len(gi) != 1 or not x[gi[0]].symbolic:
            continue
        if not go:
            for h in (g - 1, g + 1):
                if 0 <= h < len(groups):
                    hi, ho = groups[h]
                    if len(hi) == 1 and len(ho) == 1 and not x[hi[0]].symbolic:
                        groups[g], groups[h] = (gi, ho), (hi, [])
                        break
            continue
        if gi == [0] and go == [0] and out0[0] == 1 and g + 1 < len(groups):
            hi, ho = groups[g + 1]
            if not hi and len(ho) == 1 and out0[ho[0]] == 1:
                groups[g], groups[g + 1] = ([], go), (gi, ho)
    return groups


def _groups(node: ir.Node, src: list[int], dst: list[int]) -> list[tuple[list[int], list[int]]]:
    try:
        return reshape_groups(tuple(src), tuple(dst))
    except (Unmappable, IndexError):
        raise Unexplained(f"reshape {src} -> {dst} of '{node.name}' is not a regrouping") from None


def f_flatten(t: Trace, node: ir.Node, ins: list) -> list:
    x = _shape(ins[0])
    axis = attr_int(node, "axis", 1) % (len(x) + 1) if x else 0
    return [State((_prod(x[:axis]), _prod(x[axis:])))]


def _axes_arg(t: Trace, node: ir.Node, ins: list) -> list[int] | None:
    axes = attr_ints(node, "axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = _ints(t, node, ins[1], "axes")
    return axes


def f_unsqueeze(t: Trace, node: ir.Node, ins: list) -> list:
    x = list(_shape(ins[0]))
    axes = _axes_arg(t, node, ins) or []
    rank = len(x) + len(axes)
    out = list(x)
    for a in sorted(a % rank for a in axes):
        out.insert(a, Dim(1))
    data = ins[0].data.reshape([int(d) for d in out]) if ins[0].data is not None else None
    return [State(tuple(out), data)]


def f_squeeze(t: Trace, node: ir.Node, ins: list) -> list:
    x = _shape(ins[0])
    axes = _axes_arg(t, node, ins)
    if axes is None:
        drop = {i for i, d in enumerate(x) if not d.symbolic and int(d) == 1}
    else:
        drop = {a % len(x) for a in axes}
    for a in drop:
        if x[a].symbolic:
            raise Unexplained(f"Squeeze of axis {a}, which moves with AR/CL ({x[a]})")
    out = tuple(d for i, d in enumerate(x) if i not in drop)
    data = ins[0].data.reshape([int(d) for d in out]) if ins[0].data is not None else None
    return [State(out, data)]


def f_concat(t: Trace, node: ir.Node, ins: list) -> list:
    present = [i for i, s in enumerate(ins) if s is not None]
    rank = len(_shape(ins[present[0]]))
    axis = attr_int(node, "axis", 0) % rank
    out = []
    for k in range(rank):
        if k == axis:
            out.append(sum((_shape(t.input(node, i))[k] for i in present), Dim(0)))
            continue
        out.append(t.unify(node, [(i, k, _shape(t.input(node, i))[k]) for i in present], broadcast=False))
    datas = [state.data for i in present if (state := t.input(node, i)) is not None and state.data is not None]
    data: np.ndarray | None = None
    if len(datas) == len(present) and _small(out):
        data = np.concatenate(datas, axis=axis)
    return [State(tuple(out), data)]


def f_split(t: Trace, node: ir.Node, ins: list) -> list:
    x = _shape(ins[0])
    axis = attr_int(node, "axis", 0) % len(x)
    n = len(node.outputs)
    if x[axis].symbolic:
        if n != 1:
            raise Unexplained(f"Split along axis {axis}, which moves with AR/CL ({x[axis]})")
        return [State(x)]
    sizes = attr_ints(node, "split")
    if sizes is None and len(ins) > 1 and ins[1] is not None:
        sizes = _ints(t, node, ins[1], "split sizes")
    if sizes is None:
        total = int(x[axis])
        chunk = -(-total // n)
        sizes = [min(chunk, total - i * chunk) for i in range(n)]
    outs = []
    for size in sizes:
        shape = list(x)
        shape[axis] = Dim(size)
        outs.append(State(tuple(shape)))
    return outs


def _slice_args(t: Trace, node: ir.Node, ins: list, rank: int) -> list[tuple[int, Dim, Dim, int, int, int]]:
    """(axis, start, end, step, start input index, end input index) per sliced axis; -1: attribute."""
    if len(ins) == 1:  # opset < 10: attributes
        starts = [Dim(v) for v in attr_ints(node, "starts") or []]
        ends = [Dim(v) for v in attr_ints(node, "ends") or []]
        axes = attr_ints(node, "axes") or list(range(len(starts)))
        steps = [1] * len(starts)
        return [(a % rank, s, e, st, -1, -1) for a, s, e, st in zip(axes, starts, ends, steps, strict=True)]
    starts = list(_target(t, node, ins[1]))
    ends = list(_target(t, node, ins[2]))
    axes = _ints(t, node, ins[3], "axes") if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = _ints(t, node, ins[4], "steps") if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    return [(a % rank, s, e, st, 1, 2) for a, s, e, st in zip(axes, starts, ends, steps, strict=True)]


def _bound(
    t: Trace, v: Dim, size: Dim, step: int, is_end: bool, node: ir.Node | None = None
) -> tuple[Dim, bool]:
    """A Slice start/end as a Dim of the sliced axis; True when it means "to the end"."""
    if v.symbolic:
        return v, False
    x = int(v)
    n = t.orig(size)
    if is_end and step > 0 and x >= _TO_END:
        return size, True
    if x < 0:
        if size.symbolic:
            if n + x < 0 and node is not None:  # "the last -x entries" of fewer than -x: all of them
                t.constrain(node, -(size + x), f"slices the last {-x} entries of {size} (a window)")
                return Dim(0), False
            return size + x, False
        return Dim(max(n + x, 0 if step > 0 else -1)), False
    if size.symbolic and x >= n and is_end and step > 0:
        return size, True
    return Dim(min(x, n if step > 0 else n - 1)), False


def f_slice(t: Trace, node: ir.Node, ins: list) -> list:
    x = list(_shape(ins[0]))
    args = _slice_args(t, node, ins, len(x))
    out = list(x)
    for j, (axis, s, e, step, _, ei) in enumerate(args):
        size = x[axis]
        moving = size.symbolic or s.symbolic or e.symbolic
        if step != 1:
            if moving:
                raise Unexplained(f"Slice with step {step} along a moving axis")
            n = int(size)
            out[axis] = Dim(len(range(*slice(int(s), int(e), step).indices(n))))
            continue
        start, _ = _bound(t, s, size, step, False, node)
        end, to_end = _bound(t, e, size, step, True, node)
        if to_end and size.symbolic and not e.symbolic and int(e) < _TO_END and ei >= 0:
            t.require_elem(node, ei, j, size)  # an end written as the old size means "all of it"
        out[axis] = end - start
        if t.orig(out[axis]) < 0:
            out[axis] = Dim(0)
    data = None
    if ins[0].data is not None and not any(d.symbolic for d in out):
        index = [slice(None)] * len(x)
        for axis, s, e, step, _, _ in args:
            n = int(x[axis])
            index[axis] = slice(*slice(int(_bound(t, s, x[axis], step, False)[0]),
                                       int(_bound(t, e, x[axis], step, True)[0]), step).indices(n))  # fmt: skip
        data = ins[0].data[tuple(index)]
    return [State(tuple(out), data)]


def f_gather(t: Trace, node: ir.Node, ins: list) -> list:
    x, idx = _shape(ins[0]), _shape(ins[1])
    axis = attr_int(node, "axis", 0) % len(x)
    out = (*x[:axis], *idx, *x[axis + 1 :])
    data = None
    if ins[0].data is not None and ins[1].data is not None and _small(out):
        where = np.asarray(_ints(t, node, ins[1], "indices")).reshape([int(d) for d in idx])
        n = int(x[axis])
        data = np.take(ins[0].data, np.where(where < 0, where + n, where), axis=axis)
    return [State(out, data)]


def f_gather_elements(t: Trace, node: ir.Node, ins: list) -> list:
    return [State(_shape(ins[1]))]


def f_gather_nd(t: Trace, node: ir.Node, ins: list) -> list:
    x, idx = _shape(ins[0]), _shape(ins[1])
    batch = attr_int(node, "batch_dims", 0)
    last = idx[-1]
    if last.symbolic:
        raise Unexplained("GatherND index depth moves with AR/CL")
    return [State((*idx[:-1], *x[batch + int(last) :]))]


def f_expand(t: Trace, node: ir.Node, ins: list) -> list:
    x = _shape(ins[0])
    tgt = _target(t, node, ins[1])
    rank = max(len(x), len(tgt))
    out: list[Any] = []  # Dims (never None: an axis absent from one side is taken from the other)
    for k in range(rank):
        kx, kt = k - (rank - len(x)), k - (rank - len(tgt))
        xd = x[kx] if kx >= 0 else None
        td = tgt[kt] if kt >= 0 else None
        if xd is None:
            out.append(td)
            continue
        if td is None or t.orig(td) == 1 and not td.symbolic:
            out.append(xd)
            continue
        if t.orig(xd) == 1 and not xd.symbolic:
            out.append(td)
            continue
        if xd == td:
            out.append(xd)
        elif xd.symbolic and not td.symbolic and t.orig(xd) == int(td):
            t.require_elem(node, 1, kt, xd)
            out.append(xd)
        elif td.symbolic and not xd.symbolic and t.orig(td) == int(xd):
            t.require_axis(node, 0, kx, td)
            out.append(td)
        else:
            raise Unexplained(f"expands {xd} to {td}")
    data = None
    if ins[0].data is not None and _small(out):
        data = np.broadcast_to(ins[0].data, [int(d) for d in out]).copy()
    return [State(tuple(out), data)]


def f_tile(t: Trace, node: ir.Node, ins: list) -> list:
    x = _shape(ins[0])
    reps = _target(t, node, ins[1])
    out = []
    for k, (d, r) in enumerate(zip(x, reps, strict=True)):
        if r.symbolic:
            if d.symbolic or int(d) != 1:
                raise Unexplained(f"Tile repeats axis {k} of size {d} a moving number of times")
            out.append(r)
        else:
            out.append(d * int(r))
    return [State(tuple(out))]


def f_constant_of_shape(t: Trace, node: ir.Node, ins: list) -> list:
    shape = tuple(_target(t, node, ins[0]))
    data = None
    if _small(shape):
        attr = node.attributes.get("value")
        fill = 0
        if attr is not None:
            arr = np.asarray(attr.value.numpy()).reshape(-1)
            if arr.dtype.kind in "iub":
                fill = int(arr[0])
            else:
                return [State(shape)]
        data = _data(np.full([int(d) for d in shape], fill), shape) if shape else _data([fill], ())
    return [State(shape, data)]


def f_range(t: Trace, node: ir.Node, ins: list) -> list:
    start, limit, delta = (_target(t, node, s)[0] for s in ins[:3])
    if delta.symbolic:
        raise Unexplained("Range step moves with AR/CL")
    step = int(delta)
    if start.symbolic or limit.symbolic:
        if step == 1:
            length = limit - start
        elif step == -1:
            length = start - limit
        else:
            raise Unexplained(f"Range with step {step} between moving bounds")
        return [State((length,))]
    n = max(0, -(-(int(limit) - int(start)) // step))
    data = _data(list(range(int(start), int(limit), step)), (Dim(n),)) if n <= DATA_LIMIT else None
    return [State((Dim(n),), data)]


def f_shape(t: Trace, node: ir.Node, ins: list) -> list:
    x = _shape(ins[0])
    start = attr_int(node, "start", 0)
    end = node.attributes.get("end")
    dims = x[start : int(end.as_int()) if end is not None else len(x)]
    return [State((Dim(len(dims)),), _data(list(dims), (Dim(len(dims)),)))]


def f_size(t: Trace, node: ir.Node, ins: list) -> list:
    try:
        total = _prod(_shape(ins[0]))
    except NotLinear:
        return [State(())]
    return [State((), _data([total], ()))]


def _reduce_axes(t: Trace, node: ir.Node, ins: list, rank: int) -> list[int]:
    axes = attr_ints(node, "axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = _ints(t, node, ins[1], "axes")
    if not axes:
        if attr_int(node, "noop_with_empty_axes", 0):
            return []
        return list(range(rank))
    return sorted(a % rank for a in axes)


def f_reduce(t: Trace, node: ir.Node, ins: list) -> list:
    x = _shape(ins[0])
    axes = _reduce_axes(t, node, ins, len(x))
    keep = attr_int(node, "keepdims", 1)
    out = tuple(Dim(1) if i in axes else d for i, d in enumerate(x) if keep or i not in axes)
    return [State(out)]


def f_argmax(t: Trace, node: ir.Node, ins: list) -> list:
    x = _shape(ins[0])
    axis = attr_int(node, "axis", 0) % len(x)
    keep = attr_int(node, "keepdims", 1)
    out = tuple(Dim(1) if i == axis else d for i, d in enumerate(x) if keep or i != axis)
    return [State(out)]


def f_norm(t: Trace, node: ir.Node, ins: list) -> list:
    """LayerNormalization & co: output 0 like input 0; statistics reduce from ``axis`` on."""
    x = _shape(ins[0])
    axis = attr_int(node, "axis", -1) % len(x)
    stats = tuple(d if i < axis else Dim(1) for i, d in enumerate(x))
    return [State(x)] + [State(stats) for _ in node.outputs[1:]]


def f_trilu(t: Trace, node: ir.Node, ins: list) -> list:
    x = _shape(ins[0])
    gap = x[-1] - x[-2]  # columns beyond the rows: the past length of a [.., AR, CL] mask
    if gap.symbolic and len(ins) > 1 and ins[1] is not None:
        k = _target(t, node, ins[1])[0]
        want = Dim(t.orig(k) - t.orig(gap)) + gap
        if k != want:
            t.require_elem(node, 1, 0, want)
    return [State(x)]


def f_pad(t: Trace, node: ir.Node, ins: list) -> list:
    x = _shape(ins[0])
    if len(ins) > 1 and ins[1] is not None:
        pads = _ints(t, node, ins[1], "pads")
    else:
        pads = attr_ints(node, "pads") or [0] * (2 * len(x))
    axes = list(range(len(x)))
    if len(ins) > 3 and ins[3] is not None:
        axes = [a % len(x) for a in _ints(t, node, ins[3], "axes")]
    out = list(x)
    n = len(axes)
    for j, a in enumerate(axes):
        out[a] = x[a] + pads[j] + pads[j + n]
    return [State(tuple(out))]


def f_topk(t: Trace, node: ir.Node, ins: list) -> list:
    x = list(_shape(ins[0]))
    axis = attr_int(node, "axis", -1) % len(x)
    k = _target(t, node, ins[1])[0]
    x[axis] = k
    return [State(tuple(x)), State(tuple(x))]


def f_qdq(t: Trace, node: ir.Node, ins: list) -> list:
    x = _shape(ins[0])
    scale = ins[1]
    if scale is not None and scale.shape and len(scale.shape) == 1 and int(scale.shape[0]) > 1:
        axis = attr_int(node, "axis", 1) % len(x)
        if x[axis].symbolic:
            raise Unexplained("per-axis quantization along a moving axis")
    return [State(x)]


def f_scatter(t: Trace, node: ir.Node, ins: list) -> list:
    return [State(_shape(ins[0]))]


def f_rotary(t: Trace, node: ir.Node, ins: list) -> list:
    """RotaryEmbedding (opset 23 / com.microsoft): the output is shaped like the input."""
    return [State(_shape(ins[0]))]


def f_refuse(t: Trace, node: ir.Node, ins: list) -> list:
    if any(s is not None and s.moving for s in ins):
        if node.op_type in _FUSED_ATTENTION:
            raise Unexplained(
                f"fused {node.op_type} on tensors that move with AR/CL: lower it first "
                "(mha2sha convert --ar lowers fused attention, then builds the variants)"
            )
        raise Unexplained(f"{node.op_type} on tensors that move with AR/CL is not supported")
    return [t._static_state(out) for out in node.outputs]


#: fused attention ops: their masks and caches are not traced; convert lowers them first
_FUSED_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention")

_UNARY = (
    "Identity Cast CastLike Neg Abs Sqrt Exp Log Relu LeakyRelu Elu Selu Celu Sigmoid HardSigmoid Tanh "
    "Erf Reciprocal Floor Ceil Round Sign Sin Cos Tan Not IsNaN IsInf Gelu FastGelu QuickGelu BiasGelu "
    "Mish Softplus Softsign HardSwish Clip Dropout CumSum Softmax LogSoftmax Hardmax Shrink "
    "ThresholdedRelu LpNormalization"
).split()
_BROADCAST = (
    "Add Sub Mul Div Pow And Or Xor Equal Less LessOrEqual Greater GreaterOrEqual Max Min Sum Mean Mod "
    "BitShift BitwiseAnd BitwiseOr BitwiseXor PRelu Where"
).split()

FORWARD: dict[str, Forward] = {
    **{op: f_same for op in _UNARY},
    **{op: f_broadcast for op in _BROADCAST},
    "QuantizeLinear": f_qdq,
    "DequantizeLinear": f_qdq,
    "MatMul": f_matmul,
    "Gemm": f_gemm,
    "Conv": f_conv,
    "Transpose": f_transpose,
    "Reshape": f_reshape,
    "Flatten": f_flatten,
    "Unsqueeze": f_unsqueeze,
    "Squeeze": f_squeeze,
    "Concat": f_concat,
    "Split": f_split,
    "Slice": f_slice,
    "Gather": f_gather,
    "GatherElements": f_gather_elements,
    "GatherND": f_gather_nd,
    "Expand": f_expand,
    "Tile": f_tile,
    "ConstantOfShape": f_constant_of_shape,
    "Range": f_range,
    "Shape": f_shape,
    "Size": f_size,
    "Trilu": f_trilu,
    "Pad": f_pad,
    "TopK": f_topk,
    "ArgMax": f_argmax,
    "ArgMin": f_argmax,
    "ScatterND": f_scatter,
    "RotaryEmbedding": f_rotary,
    "ScatterElements": f_scatter,
    **{
        op: f_reduce
        for op in "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL2 ReduceL1 "
        "ReduceSumSquare ReduceLogSumExp".split()
    },  # fmt: skip
    **{
        op: f_norm
        for op in (
            "LayerNormalization",
            "SimplifiedLayerNormalization",
            "RMSNormalization",
            "SkipSimplifiedLayerNormalization",
            "SkipLayerNormalization",
        )
    },  # fmt: skip
    **{
        op: f_refuse
        for op in (
            "Einsum",
            "Resize",
            "NonZero",
            "If",
            "Loop",
            "Scan",
            "Compress",
            *_FUSED_ATTENTION,
        )
    },  # fmt: skip
}


# ------------------------------------------------------------------------------------- backward


def b_same(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind == "axis":
        return [(0, "axis", index, d)]
    if node.op_type in ("Identity", "Cast", "CastLike"):
        return [(0, "elem", index, d)]
    if node.op_type == "Neg":
        return [(0, "elem", index, -d)]
    raise Unexplained(f"{node.op_type} '{node.name}' does not carry sizes")


def _broadcast_index(out_shape: Sequence[int], in_shape: Sequence[int], flat: int) -> int:
    idx = np.unravel_index(flat, tuple(out_shape)) if out_shape else ()
    off = len(out_shape) - len(in_shape)
    sub = [0 if in_shape[k] == 1 else idx[k + off] for k in range(len(in_shape))]
    return int(np.ravel_multi_index(sub, tuple(in_shape))) if in_shape else 0


def b_broadcast(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    ins = [t.input(node, i) for i in range(len(node.inputs))]
    if kind == "axis":
        rank = max(len(_shape(s)) for s in ins if s is not None)
        requests: list[Request] = []
        size = t.orig(d)
        for i, s in enumerate(ins):
            if s is None:
                continue
            shape = _shape(s)
            k = index - (rank - len(shape))
            if k < 0:
                continue
            if t.orig(shape[k]) == 1 and size != 1:
                continue  # broadcast operand: shared by every row
            if size == 1:  # AR or P is 1 here: each size-1 operand may broadcast (optional)
                if not _is_float_const(node.inputs[i]) and not shape[k].symbolic:
                    requests.append((i, "axis", k, d, True))
                continue
            requests.append((i, "axis", k, d))
        if not requests:
            raise Unexplained(f"no operand of {node.op_type} '{node.name}' can carry {d}")
        return requests
    # element of a small integer result: change the operand that is a constant
    out_shape = [t.orig(x) for x in _shape(t.state(node.outputs[out]))]
    shapes = [[t.orig(x) for x in _shape(s)] for s in ins]
    flats = [_broadcast_index(out_shape, sh, index) for sh in shapes]
    vals = [s.data.reshape(-1)[f] if s is not None and s.data is not None else None for s, f in zip(ins, flats, strict=True)]
    op = node.op_type
    if op == "Where":
        cond = vals[0]
        if cond is None or cond.symbolic:
            raise Unexplained(f"Where '{node.name}' condition is not known")
        branch = 1 if int(cond) else 2
        return [(branch, "elem", flats[branch], d)]
    if op not in ("Add", "Sub", "Mul"):
        raise Unexplained(f"{op} '{node.name}' does not carry sizes")
    order = sorted(range(2), key=lambda i: (not is_const(node.inputs[i]), i))
    for i in order:
        other = vals[1 - i]
        if other is None or other.symbolic:
            continue
        try:
            if op == "Add":
                want = d - other
            elif op == "Sub":
                want = d + other if i == 0 else other - d
            else:
                if int(other) == 0:
                    continue
                want = d // other
                if want * other != d:
                    continue
        except NotLinear:
            continue
        return [(i, "elem", flats[i], want)]
    raise Unexplained(f"{op} '{node.name}' has no constant operand to change")


def b_matmul(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind != "axis":
        raise Unexplained("MatMul values")
    a, b = _shape(t.input(node, 0)), _shape(t.input(node, 1))
    rank = max(len(a), len(b))
    if index == rank - 2:
        return [(0, "axis", len(a) - 2, d)]
    if index == rank - 1:
        return [(1, "axis", len(b) - 1, d)]
    requests: list[Request] = []
    for i, sh in ((0, a), (1, b)):
        k = index - (rank - len(sh))
        if k >= 0 and t.orig(sh[k]) == t.orig(d):
            requests.append((i, "axis", k, d))
    return requests


def b_transpose(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind != "axis":
        raise Unexplained("Transpose values")
    rank = len(_shape(t.input(node, 0)))
    perm = attr_ints(node, "perm") or list(reversed(range(rank)))
    return [(0, "axis", perm[index], d)]


def b_reshape(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind == "elem":
        return [(0, "elem", index, d)]
    x = _shape(t.input(node, 0))
    tgt = _target(t, node, t.input(node, 1))
    allowzero = attr_int(node, "allowzero", 0)
    out0 = _reshape_orig(t, x, tgt, allowzero)
    for gi, go in _size_one_pairs(x, out0, _groups(node, [t.orig(v) for v in x], out0)):
        if index not in go:
            continue
        real_in = [j for j in gi if t.orig(x[j]) != 1] or gi
        real_out = [k for k in go if out0[k] != 1] or go
        if len(real_in) != 1 or real_out != [index]:
            raise Unexplained(f"reshape group {[t.orig(x[j]) for j in gi]} -> {[out0[k] for k in go]}")
        requests = [(0, "axis", real_in[0], d)]
        e = tgt[index]
        if not (e == -1 or e == 0 and not allowzero):
            requests.append((1, "elem", index, d))
        return requests
    raise Unexplained(f"axis {index} not produced by reshape '{node.name}'")


def b_unsqueeze(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind == "elem":
        return [(0, "elem", index, d)]
    ins = [t.input(node, i) for i in range(len(node.inputs))]
    x = _shape(ins[0])
    axes = sorted(a % (len(x) + len(_axes_arg(t, node, ins) or [])) for a in _axes_arg(t, node, ins) or [])
    if index in axes:
        raise Unexplained(f"axis {index} is inserted by Unsqueeze '{node.name}' (size 1)")
    return [(0, "axis", index - sum(1 for a in axes if a < index), d)]


def b_squeeze(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind == "elem":
        return [(0, "elem", index, d)]
    ins = [t.input(node, i) for i in range(len(node.inputs))]
    x = _shape(ins[0])
    axes = _axes_arg(t, node, ins)
    drop = (
        sorted(a % len(x) for a in axes)
        if axes is not None
        else [i for i, v in enumerate(x) if t.orig(v) == 1]
    )
    kept = [i for i in range(len(x)) if i not in drop]
    return [(0, "axis", kept[index], d)]


def b_expand(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    x = _shape(t.input(node, 0))
    tgt = _target(t, node, t.input(node, 1))
    rank = max(len(x), len(tgt))
    if kind == "elem":
        out_shape = [t.orig(v) for v in _shape(t.state(node.outputs[0]))]
        return [(0, "elem", _broadcast_index(out_shape, [t.orig(v) for v in x], index), d)]
    kx, kt = index - (rank - len(x)), index - (rank - len(tgt))
    if t.orig(d) == 1:  # AR or P is 1: the input axis, the target entry, or both may carry it
        requests: list[Request] = [(0, "axis", kx, d, True)] if kx >= 0 else []
        if kt >= 0:
            requests.append((1, "elem", kt, d, True))
        return requests
    requests = []
    if kx >= 0 and t.orig(x[kx]) == t.orig(d):
        requests.append((0, "axis", kx, d))
    if kt >= 0 and not (tgt[kt] == 1 and requests):
        requests.append((1, "elem", kt, d))
    if not requests:
        raise Unexplained(f"Expand '{node.name}' axis {index}")
    return requests


def b_tile(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind != "axis":
        raise Unexplained("Tile values")
    x = _shape(t.input(node, 0))
    reps = _target(t, node, t.input(node, 1))
    if reps[index] == 1:
        return [(0, "axis", index, d)]
    if t.orig(x[index]) == 1:
        return [(1, "elem", index, d)]
    raise Unexplained(f"Tile '{node.name}' repeats axis {index}")


def b_constant_of_shape(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind != "axis":
        raise Unexplained("ConstantOfShape fills one value")
    return [(0, "elem", index, d)]


def b_range(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind != "axis":
        raise Unexplained("Range values")
    start, limit, delta = (_target(t, node, t.input(node, i))[0] for i in range(3))
    if delta != 1:
        raise Unexplained(f"Range '{node.name}' with step {delta}")
    if start.symbolic:
        return [(1, "elem", 0, start + d)]
    if d.a and t.p0 > 0 and int(start) == t.p0:  # positions of the new tokens: past .. past + AR
        return [(0, "elem", 0, P), (1, "elem", 0, P + d)]
    return [(1, "elem", 0, start + d)]


def b_slice(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    ins = [t.input(node, i) for i in range(len(node.inputs))]
    x = list(_shape(ins[0]))
    if kind == "elem":
        if len(x) != 1:
            raise Unexplained("Slice of a multi-dimensional value")
        args = _slice_args(t, node, ins, 1)
        if not args:
            return [(0, "elem", index, d)]
        _, s, _, step, _, _ = args[0]
        start, _ = _bound(t, s, x[0], step, False)
        return [(0, "elem", int(start) + index * step, d)]
    args = _slice_args(t, node, ins, len(x))
    for j, (axis, s, e, step, si, ei) in enumerate(args):
        if axis != index:
            continue
        if step != 1 or si < 0:
            raise Unexplained(f"Slice '{node.name}' axis {axis}")
        size = x[axis]
        start, _ = _bound(t, s, size, step, False)
        end, to_end = _bound(t, e, size, step, True)
        if to_end:
            if size.symbolic:
                if t.orig(size - d) < 0:
                    raise Unexplained(f"slice of {size} cannot give {d}")
                want = size - d
                return [(si, "elem", j, want if not s.symbolic and int(s) >= 0 else -d)]
            raise Unexplained(f"Slice '{node.name}' takes the rest of a fixed axis")
        requests: list[Request] = []
        if not start.symbolic and d.a and t.p0 > 0 and int(start) == t.p0:  # [past : past + AR]
            requests.append((si, "elem", j, P))
            start = P
        requests.append((ei, "elem", j, start + d))
        return requests
    return [(0, "axis", index, d)]


def b_gather(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    x = _shape(t.input(node, 0))
    idx_state = t.input(node, 1)
    idx = _shape(idx_state)
    axis = attr_int(node, "axis", 0) % len(x)
    if kind == "axis":
        if index < axis:
            return [(0, "axis", index, d)]
        if index < axis + len(idx):
            return [(1, "axis", index - axis, d)]
        return [(0, "axis", index - len(idx) + 1, d)]
    if len(x) != 1 or idx_state.data is None:  # type: ignore[union-attr]
        raise Unexplained(f"Gather '{node.name}' values")
    where = int(idx_state.data.reshape(-1)[index])  # type: ignore[union-attr]
    return [(0, "elem", where % t.orig(x[0]), d)]


def b_gather_nd(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind != "axis":
        raise Unexplained(f"GatherND '{node.name}' values")
    idx = _shape(t.input(node, 1))
    batch = attr_int(node, "batch_dims", 0)
    if index < len(idx) - 1:
        return [(1, "axis", index, d)]
    return [(0, "axis", index - (len(idx) - 1) + batch + int(idx[-1]), d)]


def b_concat(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    present = [i for i in range(len(node.inputs)) if node.inputs[i] is not None]
    shapes = {i: _shape(t.input(node, i)) for i in present}
    rank = len(shapes[present[0]])
    axis = attr_int(node, "axis", 0) % rank
    if kind == "axis":
        if index == axis:
            raise Unexplained(f"the concatenated axis of '{node.name}'")
        return [(i, "axis", index, d) for i in present]
    if rank != 1:
        raise Unexplained("Concat of multi-dimensional values")
    offset = 0
    for i in present:
        n = t.orig(shapes[i][0])
        if index < offset + n:
            return [(i, "elem", index - offset, d)]
        offset += n
    raise Unexplained("index out of range")


def b_shape(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind != "elem":
        raise Unexplained("Shape output length")
    rank = len(_shape(t.input(node, 0)))
    start = attr_int(node, "start", 0) % (rank + 1) if rank else 0
    return [(0, "axis", start + index, d)]


def b_reduce(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind != "axis":
        raise Unexplained("reduced values")
    ins = [t.input(node, i) for i in range(len(node.inputs))]
    rank = len(_shape(ins[0]))
    axes = _reduce_axes(t, node, ins, rank)
    keep = attr_int(node, "keepdims", 1)
    mapping = list(range(rank)) if keep else [a for a in range(rank) if a not in axes]
    src = mapping[index]
    if src in axes:
        raise Unexplained(f"axis {index} is reduced by '{node.name}'")
    return [(0, "axis", src, d)]


def b_conv(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind != "axis" or index == 1:
        raise Unexplained("Conv output channels")
    if index == 0:
        return [(0, "axis", 0, d)]
    strides = attr_ints(node, "strides") or []
    w = _shape(t.input(node, 1))
    if any(s != 1 for s in strides) or int(w[index]) != 1:
        raise Unexplained("Conv spatial axis with a kernel or stride")
    return [(0, "axis", index, d)]


def b_norm(t: Trace, node: ir.Node, out: int, kind: str, index: int, d: Dim) -> list:
    if kind != "axis" or out != 0:
        raise Unexplained("normalisation statistics")
    return [(0, "axis", index, d)]


BACKWARD: dict[str, Backward] = {
    **{op: b_same for op in _UNARY},
    **{op: b_broadcast for op in _BROADCAST},
    "QuantizeLinear": b_same,
    "DequantizeLinear": b_same,
    "Trilu": b_same,
    "MatMul": b_matmul,
    "Transpose": b_transpose,
    "Reshape": b_reshape,
    "Unsqueeze": b_unsqueeze,
    "Squeeze": b_squeeze,
    "Expand": b_expand,
    "Tile": b_tile,
    "ConstantOfShape": b_constant_of_shape,
    "Range": b_range,
    "Slice": b_slice,
    "Gather": b_gather,
    "GatherND": b_gather_nd,
    "GatherElements": b_same,
    "RotaryEmbedding": b_same,
    "Concat": b_concat,
    "Shape": b_shape,
    "Conv": b_conv,
    **{
        op: b_reduce
        for op in "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL2 ReduceL1 "
        "ReduceSumSquare ReduceLogSumExp".split()
    },  # fmt: skip
    **{op: b_norm for op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")},
}
