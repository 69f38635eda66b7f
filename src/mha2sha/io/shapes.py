"""Static input shapes for models exported with dynamic dims, in one run.

Exporters name their dynamic dims (``batch_size``, ``sequence_length``, ``past_sequence_length``,
``past_sequence_length + 1``, ``total_sequence_length``, ``encoder_sequence_length`` ...). The same
name is the same size everywhere, and a name that is an expression of others (optimum's
``past_sequence_length + 1``, torch's ``s0 + s1``) is computed from them, so the sizes are
consistent by construction (an ``attention_mask`` of past + new is past + new). The user gives the
roles (``--seq-len``, ``--past-len``, ``--batch-size``) or any dim explicitly (``--input-shape``);
when something is still unknown, one error lists every dynamic input with a complete, consistent
command line to copy.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
import re
from collections.abc import Mapping

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

from mha2sha.errors import UserError
from mha2sha.graph import name_of

__all__ = ["ShapeRoles", "ShapeSuggestion", "check_shapes", "resolve_input_shapes", "suggest_input_shapes"]

#: Dim names (lower case, non-alphanumerics as "_") and the role whose size they take.
_ROLE_NAMES = {
    "batch": {"batch", "batch_size", "n", "b", "bs", "batchsize", "unk__batch"},
    "seq": {
        "sequence", "sequence_length", "seq", "seq_len", "seqlen", "s", "decoder_sequence_length",
        "tokens", "num_tokens", "query_length", "target_sequence_length",
    },
    "past": {
        "past_sequence_length", "past_seq_len", "past_length", "past_len", "past_key_values_length",
        "past_decoder_sequence_length", "cache_length", "past",
    },
    "total": {"total_sequence_length", "total_seq_len", "total_length", "all_sequence_length", "kv_sequence_length"},
    "encoder_seq": {"encoder_sequence_length", "encoder_sequence_length_out", "encoder_seq_len", "source_sequence_length"},
}  # fmt: skip

_SUGGESTED = {"batch": 1, "seq": 128, "past": 128, "encoder_seq": 128}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


@dataclasses.dataclass(frozen=True)
class ShapeRoles:
    """Sizes by role (``None``: not given). ``total`` is always ``past + seq``."""

    batch: int | None = None
    seq: int | None = None
    past: int | None = None
    encoder_seq: int | None = None

    def __post_init__(self) -> None:
        for role in ("batch", "seq", "past", "encoder_seq"):
            size = getattr(self, role)
            if size is not None and size < 1:
                raise UserError(f"{_FLAGS[role]} must be at least 1, not {size}")

    def size(self, role: str) -> int | None:
        if role == "total":
            return None if self.seq is None or self.past is None else self.seq + self.past
        if role == "batch" and self.batch is None:
            return 1  # HTP graphs run one sequence at a time
        return getattr(self, role)


def _normal(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def _role(name: str) -> str | None:
    normal = _normal(name)
    return next((role for role, names in _ROLE_NAMES.items() if normal in names), None)


def _evaluate(expr: str, sizes: Mapping[str, int]) -> int | None:
    """``past_sequence_length + 1`` with the sizes of the names in it; None when one is unknown."""
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        return None

    def value(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return sizes.get(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            return None if left is None or right is None else _OPS[type(node.op)](left, right)
        return None

    return value(tree)


def _dim_size(dim: object, roles: ShapeRoles, named: Mapping[str, int]) -> int | None:
    if isinstance(dim, int):
        return dim
    if not isinstance(dim, ir.SymbolicDim) or dim.value is None:
        return None
    name = dim.value
    if name in named:
        return named[name]
    role = _role(name)
    if role is not None:
        return roles.size(role)
    sizes = dict(named)
    for token in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", name):
        token_role = _role(token)
        size = roles.size(token_role) if token_role is not None else None
        if size is not None:
            sizes.setdefault(token, size)
    return _evaluate(name, sizes)


def _dynamic_inputs(model: ir.Model) -> list[ir.Value]:
    return [
        v
        for v in model.graph.inputs
        if not v.is_initializer() and (v.shape is None or not all(isinstance(d, int) for d in v.shape))
    ]


def _fmt(shape: ir.Shape | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ",".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape) + "]"


def resolve_input_shapes(
    model: ir.Model, explicit: Mapping[str, tuple[int, ...]], roles: ShapeRoles
) -> dict[str, tuple[int, ...]]:
    """Static shapes for every dynamic graph input: ``explicit`` ones as given, the others from the
    dim names and ``roles``. Raises one UserError listing every input still unknown, with a
    complete suggested command line (roles filled with typical sizes)."""
    resolved = dict(explicit)
    named: dict[str, int] = {}
    for value in model.graph.inputs:  # explicit shapes fix the size of their named dims everywhere
        given = explicit.get(name_of(value))
        if given is not None and value.shape is not None and len(value.shape) == len(given):
            for dim, size in zip(value.shape, given, strict=True):
                if isinstance(dim, ir.SymbolicDim) and dim.value:
                    named.setdefault(dim.value, size)
    missing: list[ir.Value] = []
    for value in _dynamic_inputs(model):
        if value.name in explicit:
            continue
        if value.shape is None:
            missing.append(value)
            continue
        dims = [_dim_size(d, roles, named) for d in value.shape]
        if any(d is None for d in dims):
            missing.append(value)
            continue
        resolved[name_of(value)] = tuple(d for d in dims if d is not None)
    if missing:
        raise UserError(_missing_message(model, missing, explicit, roles))
    return resolved


_FLAGS = {"batch": "--batch-size", "seq": "--seq-len", "past": "--past-len", "encoder_seq": "--encoder-seq-len"}


def _roles_in(name: str) -> set[str]:
    """Roles a dim name needs: its own, or those of the names in an expression (total = seq + past)."""
    roles = {_role(name)} | {_role(token) for token in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", name)}
    if "total" in roles:
        roles |= {"seq", "past"}
    return {r for r in roles if r in _FLAGS}


@dataclasses.dataclass(frozen=True)
class ShapeSuggestion:
    """A consistent set of static shapes for a model's dynamic inputs, and the flags that give it.

    ``flags`` is one command line (roles where the dim names tell them, typical sizes for roles not
    given, ``--input-shape`` for dims whose name says nothing, shown as 1); ``shapes`` are the
    static shapes those flags give; ``unknown`` lists the dims no name explained (``input[axis]
    name``): their size is a placeholder the user must check.
    """

    dynamic: list[tuple[str, str]]  # (input, declared shape with dim names)
    flags: list[str]
    shapes: dict[str, tuple[int, ...]]
    unknown: list[str]


def suggest_input_shapes(
    model: ir.Model, explicit: Mapping[str, tuple[int, ...]], roles: ShapeRoles
) -> ShapeSuggestion:
    """Static shapes for every dynamic input not in ``explicit`` (see :class:`ShapeSuggestion`)."""
    dynamic = [v for v in _dynamic_inputs(model) if v.name not in explicit]
    needed: set[str] = set()
    for value in dynamic:
        for dim in value.shape or ():
            if isinstance(dim, ir.SymbolicDim) and dim.value:
                needed |= _roles_in(dim.value)
    suggested = ShapeRoles(
        **{role: roles.size(role) if roles.size(role) is not None else _SUGGESTED[role] for role in _FLAGS}
    )
    flags = [f"{_FLAGS[role]} {suggested.size(role)}" for role in _FLAGS if role in needed]
    shapes: dict[str, tuple[int, ...]] = {}
    unknown: list[str] = []
    for value in dynamic:
        dims = [_dim_size(d, suggested, {}) for d in (value.shape or ())]
        if value.shape is None or any(d is None for d in dims):
            shown = ",".join(str(d) if d is not None else "1" for d in dims) or "1"
            flags.append(f"--input-shape {value.name}={shown}")
            for axis, (dim, size) in enumerate(zip(value.shape or (), dims, strict=False)):
                if size is None:
                    unknown.append(f"{value.name}[{axis}] {getattr(dim, 'value', None) or '?'}")
            if value.shape is None:
                unknown.append(f"{value.name} (no shape declared)")
        shapes[name_of(value)] = tuple(d if d is not None else 1 for d in dims) if value.shape is not None else (1,)
    listing = [(name_of(v), _fmt(v.shape)) for v in dynamic]
    return ShapeSuggestion(listing, flags, shapes, unknown)


def _missing_message(
    model: ir.Model, missing: list[ir.Value], explicit: Mapping[str, tuple[int, ...]], roles: ShapeRoles
) -> str:
    """Every dynamic input, and one consistent command line: roles where the names tell them,
    ``--input-shape`` for the rest."""
    suggestion = suggest_input_shapes(model, explicit, roles)
    listing = ", ".join(f"{name} {shape}" for name, shape in suggestion.dynamic)
    return (
        f"the split needs static shapes; {len(suggestion.dynamic)} input(s) are dynamic: {listing}. "
        f"Fix them in one run with: {' '.join(suggestion.flags)}"
    )


def check_shapes(model: ir.Model) -> None:
    """The static input shapes fit the graph: strict ONNX shape inference of the model as loaded
    (declared intermediate shapes ignored: exporters leave traced sizes there). A conflict --
    a size the graph cannot take, two inputs that disagree -- is bad input, named by its node."""
    intermediates = [v for node in model.graph for v in node.outputs if not v.is_graph_output()]
    saved = [(v, v.shape) for v in intermediates]
    for value in intermediates:
        value.shape = None
    try:
        try:
            _strict_inference(model, data_prop=True)
        except onnx.shape_inference.InferenceError:
            # ONNX's data propagation has false alarms inside If branches ("Data for input 0
            # already exists"): a conflict counts only when inference without it finds one too
            _strict_inference(model, data_prop=False)
    except onnx.shape_inference.InferenceError as e:
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 400 else detail[:397] + "..."
        raise UserError(f"the input shapes do not fit the model: {detail}") from None
    finally:
        for value, shape in saved:
            value.shape = shape


def _strict_inference(model: ir.Model, *, data_prop: bool) -> None:
    _c_api_utils.call_onnx_api(
        lambda proto: onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=data_prop),
        model,
    )
