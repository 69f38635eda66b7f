"""Trace AR and the past length through a step graph: every size and shape constant as a :class:`Dim`.

The trace runs forward over the graph once, in order, carrying for each tensor its shape as Dims
and, for small integer tensors (shape vectors, indices, scalars), its values as Dims. The graph
inputs seed it (:mod:`mha2sha.arcl.roles`); each op's rule (:mod:`mha2sha.arcl.rules`, one row per
op type) computes its outputs. Where a rule finds a constant size meeting a moving one (a baked
``Reshape`` target ``[1, 3, -1, 16]`` against ``[1, AR, 64]``, a baked ``arange`` mask table meeting
the attention scores ``[.., AR, CL]``), it asks for an *explanation*: a walk backwards through the
producers, with one backward rule per op type, down to the constants that must carry AR or CL
there. Those constants are *marked* -- for that one use, so a constant shared with an unrelated
consumer is never changed under it -- and, when the mark changes something already traced, the
trace starts over with the marks kept. Nothing is decided from a size that happens to equal AR:
the Reshape groups, broadcasting, Concat and Slice arithmetic say which axis is which.

A requirement nothing can explain (a graph input of fixed size meeting AR, two different moving
sizes broadcast together, an op without a rule on a moving size) is a :class:`UserError` naming the
node. The result is a :class:`Trace`: Dims for every tensor, marks per constant use; the rewrite
(:mod:`mha2sha.arcl.rewrite`) evaluates them at a new AR and past length.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from mha2sha.arcl.dims import Dim, NotLinear
from mha2sha.arcl.roles import Roles
from mha2sha.errors import UserError
from mha2sha.graph import is_op

__all__ = ["State", "Trace", "Unexplained", "MarkKey", "const_array", "is_const"]

logger = logging.getLogger(__name__)

#: Integer tensors up to this many elements carry their values through the trace.
DATA_LIMIT = 64
_MAX_RESTARTS = 500


class Unexplained(Exception):
    """A requirement the backward walk cannot meet (message says where and why)."""


class Restart(Exception):
    """Marks changed tensors already traced: trace again from the start."""


@dataclasses.dataclass
class State:
    """A tensor in the trace: its shape (Dims) and, for small integer tensors, its values (Dims)."""

    shape: tuple[Dim, ...] | None
    data: np.ndarray | None = None  # object array of Dim, shape = the concrete shape

    @property
    def moving(self) -> bool:
        if self.shape is not None and any(d.symbolic for d in self.shape):
            return True
        return self.data is not None and any(d.symbolic for d in self.data.reshape(-1))


def is_const(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None:
        return True
    node = value.producer()
    return is_op(node, "Constant")


def const_array(value: ir.Value) -> np.ndarray:
    """The array behind an initializer or a ``Constant`` node's output."""
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    node = value.producer()
    assert node is not None
    attr = next(iter(node.attributes.values()))
    if attr.name == "value":
        return np.asarray(attr.value.numpy())
    if attr.name == "value_int":
        return np.asarray(attr.as_int(), np.int64)
    if attr.name == "value_ints":
        return np.asarray(list(attr.as_ints()), np.int64)
    if attr.name == "value_float":
        return np.asarray(attr.as_float(), np.float32)
    if attr.name == "value_floats":
        return np.asarray(list(attr.as_floats()), np.float32)
    raise Unexplained(f"Constant '{node.name}' with attribute {attr.name}")


def _const_shape(value: ir.Value) -> tuple[int, ...]:
    if value.const_value is not None:
        return tuple(value.const_value.shape.numpy())
    return tuple(const_array(value).shape)


def as_dims(array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for i, x in enumerate(np.asarray(array).reshape(-1)):
        flat[i] = Dim(int(x))
    return out


def _trackable(dtype: ir.DataType | None) -> bool:
    return dtype is not None and (dtype.is_integer() or dtype == ir.DataType.BOOL)


#: (id(constant value), id(consumer node), input index): a constant as one consumer sees it.
MarkKey = tuple[int, int, int]


class Trace:
    """Dims of every tensor of ``model`` given the input ``roles``; see the module docstring."""

    def __init__(self, model: ir.Model, roles: Roles):
        from mha2sha.arcl.rules import BACKWARD, FORWARD  # the tables refer back to Trace

        self.model = model
        self.graph = model.graph
        self.roles = roles
        self.ar0, self.p0 = roles.ar, roles.past
        self.forward, self.backward = FORWARD, BACKWARD
        # marks: per constant use, (kind, index) -> Dim; refs keep the objects behind the ids
        self.marks: dict[MarkKey, dict[tuple[str, int], Dim]] = {}
        self.refs: dict[MarkKey, tuple[ir.Value, ir.Node, int]] = {}
        self.states: dict[int, State] = {}
        self._const_cache: dict[int, State] = {}
        self.restarts = 0
        self.node: ir.Node | None = None  # the node being traced (for error messages and debugging)
        # (Dim that must be >= 0 at the new sizes, node, why): clamped slices valid only in a range
        self.constraints: dict[tuple[int, str], tuple[Dim, ir.Node, str]] = {}
        cached = roles.has_cache
        self.samples = [(self.ar0, self.p0), (self.ar0 + 7919, self.p0 + 6151 if cached else 0),
                        (1, 1 if cached else 0), (4099, 2 if cached else 0)]  # fmt: skip

    # ----------------------------------------------------------------------------- running

    def run(self) -> Trace:
        self.restarts = 0
        while True:
            try:
                self._forward_pass()
                return self
            except Restart:
                self.restarts += 1
                if self.restarts > _MAX_RESTARTS:
                    raise UserError(
                        "the AR/CL trace does not converge (too many constants re-interpreted); "
                        "please report this model"
                    ) from None

    def _forward_pass(self) -> None:
        self.states = {}
        for value in self.graph.inputs:
            if value.is_initializer():
                continue
            role = self.roles.inputs.get(value.name or "")
            shape = tuple(int(d) for d in value.shape)  # type: ignore[union-attr, arg-type]
            dims = tuple(role.axes.get(a, Dim(s)) if role else Dim(s) for a, s in enumerate(shape))
            self.states[id(value)] = State(dims)
        for node in self.graph:
            if is_op(node, "Constant"):
                continue
            self.node = node
            outs = self._evaluate(node)
            for out, state in zip(node.outputs, outs, strict=False):
                self.states[id(out)] = state
        self.node = None

    def _evaluate(self, node: ir.Node) -> list[State]:
        ins = [self.input(node, i) for i in range(len(node.inputs))]
        moving = any(s is not None and s.moving for s in ins)
        rule = self.forward.get(node.op_type) if node.domain in ("", "ai.onnx", "com.microsoft") else None
        if rule is None:
            if moving:
                raise self.fail(node, f"no AR/CL rule for {node.domain + '.' if node.domain else ''}"
                                      f"{node.op_type}, whose inputs move with AR or CL")  # fmt: skip
            return [self._static_state(out) for out in node.outputs]
        try:
            outs = rule(self, node, ins)
        except (Unexplained, NotLinear) as e:
            if moving:
                raise self.fail(node, str(e)) from None
            return [self._static_state(out) for out in node.outputs]
        return outs

    def _static_state(self, value: ir.Value) -> State:
        shape = value.shape
        if shape is None or not all(isinstance(d, int) for d in shape):
            return State(None)
        return State(tuple(Dim(d) for d in shape if isinstance(d, int)))

    # ----------------------------------------------------------------------------- lookups

    def constrain(self, node: ir.Node, d: Dim, why: str) -> None:
        """The rewrite is valid only where ``d >= 0`` (checked at the new AR / past)."""
        self.constraints[(id(node), why)] = (d, node, why)

    def check_constraints(self, ar: int, past: int) -> None:
        for d, node, why in self.constraints.values():
            if d.at(ar, past) < 0:
                raise self.fail(node, f"{why}; not valid at AR {ar}, CL {ar + past}")

    def orig(self, d: Dim) -> int:
        return d.at(self.ar0, self.p0)

    def state(self, value: ir.Value | None) -> State | None:
        """A non-constant tensor's state (None for constants: use :meth:`input`)."""
        if value is None:
            return None
        return self.states.get(id(value))

    def input(self, node: ir.Node, i: int) -> State | None:
        """Input ``i`` of ``node`` as that node sees it (a constant with this use's marks applied)."""
        value = node.inputs[i] if i < len(node.inputs) else None
        if value is None:
            return None
        if not is_const(value):
            return self.states.get(id(value), State(None))
        base = self._const_state(value)
        marks = self.marks.get((id(value), id(node), i))
        if not marks:
            return base
        shape = list(base.shape or ())
        data = base.data.copy() if base.data is not None else None
        for (kind, index), d in marks.items():
            if kind == "axis":
                shape[index] = d
                data = None  # a table along a moving axis has no fixed values
            elif data is not None:
                data.reshape(-1)[index] = d
        return State(tuple(shape), data)

    def _const_state(self, value: ir.Value) -> State:
        cached = self._const_cache.get(id(value))
        if cached is not None:
            return cached
        shape = _const_shape(value)
        data = None
        if int(np.prod(shape, dtype=np.int64)) <= DATA_LIMIT:
            array = const_array(value)
            if array.dtype.kind in "iub":
                data = as_dims(array.astype(np.int64))
        state = State(tuple(Dim(s) for s in shape), data)
        self._const_cache[id(value)] = state
        return state

    def const_of(self, node: ir.Node, i: int) -> np.ndarray | None:
        """The original array of a constant input (no marks), or None."""
        value = node.inputs[i] if i < len(node.inputs) else None
        return const_array(value) if is_const(value) else None  # type: ignore[arg-type]

    # ----------------------------------------------------------------------------- requirements

    def fail(self, node: ir.Node | None, message: str) -> UserError:
        where = f"node '{node.name}' ({node.op_type})" if node is not None else "the graph"
        return UserError(f"AR/CL rewrite: {where}: {message}")

    def require_axis(self, node: ir.Node, i: int, axis: int, d: Dim) -> State:
        """Input ``i`` of ``node`` must have size ``d`` on ``axis``: explain it or fail."""
        state = self.input(node, i)
        assert state is not None and state.shape is not None
        if state.shape[axis] == d:
            return state
        try:
            marks = self.explain(node.inputs[i], "axis", axis, d, (node, i))  # type: ignore[arg-type]
        except Unexplained as e:
            raise self.fail(node, f"input '{node.inputs[i].name}' axis {axis}: {e}") from None  # type: ignore[union-attr]
        self.commit(node, marks)
        return self.input(node, i)  # type: ignore[return-value]

    def require_elem(self, node: ir.Node, i: int, index: int, d: Dim) -> State:
        """Element ``index`` (flat) of the integer input ``i`` of ``node`` must be ``d``."""
        state = self.input(node, i)
        assert state is not None
        if state.data is not None and state.data.reshape(-1)[index] == d:
            return state
        try:
            marks = self.explain(node.inputs[i], "elem", index, d, (node, i))  # type: ignore[arg-type]
        except Unexplained as e:
            raise self.fail(node, f"input '{node.inputs[i].name}'[{index}] must be {d}: {e}") from None  # type: ignore[union-attr]
        self.commit(node, marks)
        return self.input(node, i)  # type: ignore[return-value]

    def unify(self, node: ir.Node, entries: Sequence[tuple[int, int, Dim]], *, broadcast: bool = True) -> Dim:
        """The common size of input axes ``(input index, axis, current Dim)`` (numpy broadcasting).

        Sizes equal at the original AR/past must be equal as Dims: a constant size meeting a
        moving one is explained; two different moving sizes are tried both ways. Size-1 operands
        broadcast (unless ``broadcast=False``, e.g. a MatMul's contracted axes).
        """
        if not entries:
            return Dim(1)
        origs = [self.orig(d) for _, _, d in entries]
        big = max(origs)
        if broadcast and len({o for o in origs if o != 1}) > 1 or not broadcast and len(set(origs)) > 1:
            raise self.fail(node, f"sizes {sorted(set(origs))} do not broadcast")
        carriers = [e for e, o in zip(entries, origs, strict=True) if o == big]
        for i, axis, d in entries:
            if self.orig(d) != big and d.symbolic:
                raise self.fail(
                    node,
                    f"input '{node.inputs[i].name}' axis {axis} ({d}, {self.orig(d)} now) broadcasts against "  # type: ignore[union-attr]
                    f"size {big}: it would not broadcast at another AR/CL",
                )
        forms = []
        for _, _, d in carriers:
            if d.symbolic and d not in forms:
                forms.append(d)
        if not forms:
            return Dim(big)
        if big == 1:  # AR (or P) is 1 here: a size-1 operand broadcasts unless index arithmetic made it
            if len(forms) == 1:
                self._carry_size_one(node, [e for e in carriers if not e[2].symbolic], forms[0])
                return forms[0]
            carriers = [e for e in carriers if e[2].symbolic]
        forms.sort(key=lambda f: (f.c != 0, abs(f.c), abs(f.a) + abs(f.p)))
        problems = []
        for target in forms:
            try:
                marks = []
                for i, axis, d in carriers:
                    if d != target:
                        marks += self.explain(node.inputs[i], "axis", axis, target, (node, i))  # type: ignore[arg-type]
            except Unexplained as e:
                problems.append(f"as {target}: {e}")
                continue
            self.commit(node, marks)
            return target
        raise self.fail(node, "moving sizes cannot be reconciled (" + "; ".join(problems) + ")")

    def _carry_size_one(self, node: ir.Node, entries: Sequence[tuple[int, int, Dim]], target: Dim) -> None:
        """AR (or P) is 1 in this graph, so a size-1 axis meeting it may broadcast or may be baked
        index arithmetic for the new tokens (HF's ``cache_position`` ``[[[[P]]]]`` compared with key
        positions). Explain the size-1 operands down to integer / boolean constants where the
        dataflow allows; float constants (weights, scales) and fixed inputs keep broadcasting."""
        marks: list = []
        for i, axis, _ in entries:
            value = node.inputs[i]
            if (
                value is None
                or is_const(value)
                and value.const_value is not None
                and (value.const_value.dtype.is_floating_point())
            ):
                continue
            try:
                marks += self.explain(value, "axis", axis, target, (node, i))
            except Unexplained:
                continue
        if marks:
            self.commit(node, marks)

    def commit(
        self, node: ir.Node, marks: Iterable[tuple[MarkKey, tuple[ir.Value, ir.Node, int], str, int, Dim]]
    ) -> None:
        """Record marks; trace again when one is not on ``node``'s own inputs."""
        deep = False
        for key, ref, kind, index, d in marks:
            current = self.marks.setdefault(key, {})
            old = current.get((kind, index))
            if old is not None and old != d:
                value, user, i = ref
                raise self.fail(
                    user, f"constant '{value.name}' would need {kind} {index} = {old} and = {d} at once"
                )
            if old is None:
                current[(kind, index)] = d
                self.refs[key] = ref
                if ref[1] is not node:
                    deep = True
        if deep:
            raise Restart

    # ----------------------------------------------------------------------------- explaining

    def explain(self, value: ir.Value, kind: str, index: int, d: Dim, use: tuple[ir.Node, int]) -> list:
        """Marks that make ``value`` (as seen by ``use``) have ``d`` at axis / flat element ``index``.

        Pure: nothing is recorded; raises :class:`Unexplained`.
        """
        return self._explain(value, kind, index, d, use, depth=0)

    def _explain(
        self, value: ir.Value, kind: str, index: int, d: Dim, use: tuple[ir.Node, int], depth: int
    ) -> list:
        if depth > 200:
            raise Unexplained("dataflow too deep")
        node, i = use
        if is_const(value):
            base = self._const_state(value)
            key = (id(value), id(node), i)
            if kind == "axis":
                size = base.shape[index] if base.shape is not None else None
                if size is None or self.orig(d) != int(size):
                    raise Unexplained(f"constant '{value.name}' axis {index} is {size}, not {self.orig(d)}")
            else:
                if base.data is None:
                    raise Unexplained(f"constant '{value.name}' is not a small integer tensor")
                if int(base.data.reshape(-1)[index]) != self.orig(d):
                    raise Unexplained(f"constant '{value.name}'[{index}] is not {self.orig(d)}")
            old = self.marks.get(key, {}).get((kind, index))
            if old is not None and old != d:
                raise Unexplained(f"constant '{value.name}' already carries {old} there, not {d}")
            return [(key, (value, node, i), kind, index, d)]
        state = self.states.get(id(value))
        if state is not None:
            if kind == "axis" and state.shape is not None and state.shape[index] == d:
                return []
            if kind == "elem" and state.data is not None and state.data.reshape(-1)[index] == d:
                return []
        producer = value.producer()
        if producer is None:
            where = "axis" if kind == "axis" else "element"
            raise Unexplained(f"graph input '{value.name}' {where} {index} is fixed (not {d})")
        rule = self.backward.get(producer.op_type)
        if rule is None:
            raise Unexplained(f"no backward rule for {producer.op_type} '{producer.name}'")
        out_index = list(producer.outputs).index(value)
        requests = rule(self, producer, out_index, kind, index, d)
        marks = []
        optional_ok = 0
        reasons = []
        for request in requests:
            j, k, idx, dd = request[:4]
            optional = len(request) > 4 and request[4]
            source = producer.inputs[j]
            if source is None:
                raise Unexplained(f"{producer.op_type} '{producer.name}' has no input {j}")
            try:
                marks += self._explain(source, k, idx, dd, (producer, j), depth + 1)
                optional_ok += 1
            except Unexplained as e:
                if not optional:
                    raise
                reasons.append(str(e))
        if requests and all(len(r) > 4 and r[4] for r in requests) and not optional_ok:
            raise Unexplained("; ".join(reasons[:2]))
        return marks

    # ----------------------------------------------------------------------------- data helpers

    def decide(self, fn, *dims: Dim) -> Dim | None:
        """``fn`` of moving values when it gives the same result at every sample AR/past, else None."""
        results = set()
        for ar, p in self.samples:
            try:
                results.add(int(fn(*(x.at(ar, p) for x in dims))))
            except (ZeroDivisionError, ValueError, OverflowError):
                return None
        return Dim(results.pop()) if len(results) == 1 else None

    def concrete_ints(self, node: ir.Node, state: State | None, what: str) -> list[int]:
        """Values that must not move with AR/CL (axes, perm, split sizes, indices)."""
        if state is None or state.data is None:
            raise Unexplained(f"{what} of {node.op_type} '{node.name}' is not known")
        out = []
        for x in state.data.reshape(-1):
            if x.symbolic:
                raise Unexplained(f"{what} of {node.op_type} '{node.name}' would move with AR/CL ({x})")
            out.append(int(x))
        return out

