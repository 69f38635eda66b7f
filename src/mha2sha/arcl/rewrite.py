"""ChangeArPass: re-shape a step graph for another AR (tokens per step) and CL (context length).

Rules applied (the trace of :mod:`mha2sha.arcl.trace` decides every one of them from dataflow):

1. Graph inputs and every traced tensor get the shape their Dims give at the new AR and past
   length (``past = CL - AR``; 0 for a prefill graph); outputs likewise.
2. A shape-carrying constant (Reshape / Expand / Tile / ConstantOfShape / Range / Slice / Trilu
   input, and the small integer arithmetic feeding them) gets its moving entries re-evaluated.
3. A mask or position table with moving axes is re-made (:mod:`mha2sha.arcl.tables`).
4. Constants keep their names. One shared by a consumer that needs the old values and one that
   needs new ones is first tried as one tensor for both (it stays one when the trace still
   explains every use, e.g. a torchscript ``Expand`` target also compared with -1); otherwise
   the consumers that need new values get a copy named ``<name>.ar<AR>``.
5. Nothing else changes: no node is added, removed or renamed, so an encodings file of the
   original names every tensor of the result.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from mha2sha.arcl.dims import Dim
from mha2sha.arcl.roles import Roles, find_roles
from mha2sha.arcl.tables import NotATable, regenerate
from mha2sha.arcl.trace import MarkKey, Trace, const_array, is_const
from mha2sha.errors import UserError
from mha2sha.io.names import UniqueNames

__all__ = ["ChangeArPass", "ConstantRewrite", "trace_model", "new_past"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ConstantRewrite:
    """One constant the rewrite changed: where, from what, to what, and what it means."""

    tensor: str
    consumers: tuple[str, ...]  # node names
    old: str
    new: str
    meaning: str
    copy_of: str | None = None  # set when a copy was made for these consumers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def new_past(roles: Roles, ar: int, cl: int | None) -> int:
    """The past length of the new graph; UserError when AR / CL are out of range."""
    if ar < 1:
        raise UserError(f"--ar {ar}: AR (tokens per step) must be at least 1")
    if not roles.has_cache:
        if cl is not None and cl != ar:
            raise UserError(
                f"--cl {cl}: this graph has no KV cache (a prefill graph: CL = AR); a context-length "
                "change needs past key/value inputs"
            )
        return 0
    cl = roles.cl if cl is None else cl
    if cl < ar + 1:
        raise UserError(
            f"--ar {ar} --cl {cl}: CL must be at least AR + 1 (the step reads CL - AR >= 1 cached positions)"
        )
    return cl - ar


def _show(array: np.ndarray) -> str:
    if array.size <= 16:
        return str(array.tolist())
    return f"{array.dtype}{list(array.shape)}"


def _symbolic_vector(base: np.ndarray, marks: dict[tuple[str, int], Dim]) -> str:
    flat = [str(int(x)) for x in base.reshape(-1)]
    for (_, index), d in marks.items():
        flat[index] = str(d)
    return "[" + ", ".join(flat) + "]" if base.ndim else flat[0]


def trace_model(model: ir.Model) -> Trace:
    """Roles and the AR/CL trace of ``model``, with shared constants settled (see rule 4)."""
    trace = Trace(model, find_roles(model)).run()
    _settle_shared(trace)
    return trace


def _settle_shared(trace: Trace) -> None:
    """Try the marks of a constant on its other uses too, so it stays one tensor when that holds."""
    by_value: dict[int, list[MarkKey]] = {}
    for key, marks in trace.marks.items():
        if marks:
            by_value.setdefault(key[0], []).append(key)
    for keys in by_value.values():
        value = trace.refs[keys[0]][0]
        kinds = {frozenset(trace.marks[k].items()) for k in keys}
        uses = [(u.node, u.idx) for u in value.uses()]
        if len(kinds) != 1 or len(uses) == len(keys):
            continue
        marks = dict(trace.marks[keys[0]])
        added = []
        for node, i in uses:
            key = (id(value), id(node), i)
            if key not in trace.marks or not trace.marks[key]:
                trace.marks[key] = dict(marks)
                trace.refs[key] = (value, node, i)
                added.append(key)
        try:
            trace.run()
        except UserError:
            for key in added:
                trace.marks.pop(key, None)
                trace.refs.pop(key, None)
            trace.run()


class ChangeArPass(ir.passes.InPlacePass):
    """Re-shape a step graph for ``ar`` tokens per step and context length ``cl`` (see module doc).

    ``cl=None`` keeps the context length. ``rewrites`` lists every constant changed and
    ``trace`` the Dims of every tensor (both set by the call).
    """

    def __init__(self, ar: int, cl: int | None = None):
        super().__init__()
        self.ar, self.cl = ar, cl
        self.rewrites: list[ConstantRewrite] = []
        self.trace: Trace | None = None
        self.past = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        trace = trace_model(model)
        self.trace = trace
        self.past = new_past(trace.roles, self.ar, self.cl)
        trace.check_constraints(self.ar, self.past)
        self.rewrites = _rewrite_constants(trace, self.ar, self.past)
        _set_shapes(trace, self.ar, self.past)
        modified = (self.ar, self.past) != (trace.ar0, trace.p0)
        return ir.passes.PassResult(model, modified)


def _set_shapes(trace: Trace, ar: int, past: int) -> None:
    graph = trace.graph
    values = [v for v in graph.inputs if not v.is_initializer()]
    for node in graph:
        values.extend(node.outputs)
    for value in values:
        if is_const(value):
            continue
        state = trace.states.get(id(value))
        if state is None or state.shape is None or value.shape is None and value.type is None:
            continue  # no value_info in the model: none is invented
        dims = [d.at(ar, past) for d in state.shape]
        if any(d < 0 for d in dims):
            raise trace.fail(value.producer(), f"'{value.name}' would have a negative size {dims}")
        value.shape = ir.Shape(dims)


def _rewrite_constants(trace: Trace, ar: int, past: int) -> list[ConstantRewrite]:
    names = UniqueNames(trace.graph)
    groups: dict[int, dict[frozenset, list[tuple[ir.Node, int]]]] = {}
    values: dict[int, ir.Value] = {}
    for key, marks in trace.marks.items():
        if not marks:
            continue
        value, node, i = trace.refs[key]
        values[key[0]] = value
        groups.setdefault(key[0], {}).setdefault(frozenset(marks.items()), []).append((node, i))
    records = []
    for vid, by_marks in groups.items():
        value = values[vid]
        base = const_array(value)
        marked_uses = {(id(n), i) for uses in by_marks.values() for n, i in uses}
        others = [u for u in value.uses() if (id(u.node), u.idx) not in marked_uses]
        in_place = len(by_marks) == 1 and not others and not value.is_graph_output()
        for frozen, uses in by_marks.items():
            marks = dict(frozen)
            new, meaning = _new_array(trace, value, uses, base, marks, ar, past)
            if new.shape == base.shape and np.array_equal(new, base):
                continue  # the same AR / CL here: nothing to change, nothing to copy
            consumers = tuple(sorted({n.name or n.op_type for n, _ in uses}))
            if in_place:
                _replace_in_place(value, new)
                copy_of = None
                name = value.name or ""
            else:
                name = names(f"{value.name}.ar{ar}")
                clone = ir.Value(name=name, shape=ir.Shape(new.shape), type=ir.TensorType(ir.DataType.from_numpy(new.dtype)),
                                 const_value=ir.tensor(new, name=name))  # fmt: skip
                trace.graph.register_initializer(clone)
                for node, i in uses:
                    node.replace_input_with(i, clone)
                copy_of = value.name
            records.append(ConstantRewrite(name, consumers, _show(base), _show(new), meaning, copy_of))
    records.sort(key=lambda r: r.tensor)
    return records


def _new_array(
    trace: Trace,
    value: ir.Value,
    uses: list[tuple[ir.Node, int]],
    base: np.ndarray,
    marks: dict[tuple[str, int], Dim],
    ar: int,
    past: int,
) -> tuple[np.ndarray, str]:
    kinds = {kind for kind, _ in marks}
    node = uses[0][0]
    if kinds == {"elem"}:
        flat = base.reshape(-1).copy()
        for (_, index), d in marks.items():
            flat[index] = d.at(ar, past)
        return flat.reshape(base.shape), "values " + _symbolic_vector(base, marks)
    if kinds == {"axis"}:
        dims = {index: d for (_, index), d in marks.items()}
        try:
            return regenerate(base, dims, trace.ar0, trace.p0, ar, past)
        except NotATable as e:
            raise trace.fail(node, f"constant '{value.name}': {e}") from None
    raise trace.fail(node, f"constant '{value.name}' would need both new values and new axes")


def _replace_in_place(value: ir.Value, new: np.ndarray) -> None:
    tensor = ir.tensor(new, name=value.name)
    if value.const_value is not None:
        value.const_value = tensor
    else:
        node = value.producer()
        assert node is not None
        for key in list(node.attributes):
            del node.attributes[key]
        node.attributes["value"] = ir.AttrTensor("value", tensor)
        if value.type is None:  # an untyped Constant output gets no invented value_info
            return
    value.shape = ir.Shape(new.shape)
