"""Which graph input carries AR, the past length or CL on which axis: the seeds of the trace.

Inputs are recognised by the prepared-LLM and Hugging Face naming conventions (DESIGN.md section
5), checked against each other's shapes; the past axis of a KV-cache input is found from dataflow
(the axis of the ``Concat`` that appends the new entries), never from a size that happens to
match:

==========================  ==========================================================
input                       symbolic axes
==========================  ==========================================================
token ids (int, feeds an    ``[.., AR]``
embedding, or named so)
``inputs_embeds``           ``[.., AR, E]``
``position_ids``            ``[.., AR]`` (values: positions ``P + i``)
``cache_position``          ``[AR]``
RoPE ``*cos*`` / ``*sin*``  ``[.., AR, F]``
``*mask*`` rank >= 3        ``[.., AR, CL]``
``*mask*`` rank 2           ``[.., CL]``
past KV (``past``/``cache`` ``P`` on the axis the Concat appends along
in the name, float)
==========================  ==========================================================

A graph without past KV inputs is a prefill graph: P is 0 and stays 0 (CL = AR).
"""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir

from mha2sha.arcl.dims import AR, CL, Dim, P
from mha2sha.errors import UserError
from mha2sha.graph import is_op
from mha2sha.verify.inputs import _embedding_vocab

__all__ = ["InputRole", "Roles", "find_roles"]

_TOKEN_NAMES = frozenset({"input_ids", "decoder_input_ids", "token_ids", "tokens", "input_tokens"})
_EMBED_NAMES = frozenset({"inputs_embeds", "decoder_inputs_embeds"})
# ops that hand a past-KV tensor on unchanged (axis for axis) before the Concat that appends to it
_KV_PASS = frozenset({"Cast", "Identity", "QuantizeLinear", "DequantizeLinear"})


@dataclasses.dataclass(frozen=True)
class InputRole:
    """A graph input's part in the step: ``kind`` and which axes move with AR / P / CL."""

    name: str
    kind: str  # tokens | embeds | positions | cache_position | cos | sin | mask | past
    axes: dict[int, Dim]  # axis (non-negative) -> symbolic size
    rank: int

    def to_dict(self) -> dict:
        return {"kind": self.kind, "axes": {str(a): str(d) for a, d in self.axes.items()}}


@dataclasses.dataclass
class Roles:
    """The seeds of a step graph: its AR, its past length (0: prefill) and each input's role."""

    ar: int
    past: int
    inputs: dict[str, InputRole]

    @property
    def cl(self) -> int:
        return self.ar + self.past

    @property
    def has_cache(self) -> bool:
        return any(r.kind == "past" for r in self.inputs.values())

    def of(self, kind: str) -> list[InputRole]:
        return [r for r in self.inputs.values() if r.kind == kind]


def _tokens(name: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", name.lower()))


def _is_int(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_integer()


def _is_float(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_floating_point()


def _static(value: ir.Value) -> tuple[int, ...]:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        dims = "?" if shape is None else ",".join(str(d) if isinstance(d, int) else "1" for d in shape)
        raise UserError(
            f"input '{value.name}' has a dynamic shape {shape}; the AR/CL rewrite starts from static "
            f"shapes: pass --input-shape {value.name}={dims} (with the model's current AR and CL)"
        )
    return tuple(d for d in shape if isinstance(d, int))  # every dim is static (checked above)


def _past_axis(value: ir.Value, rank: int) -> int | None:
    """The axis of ``value`` along which a Concat appends to it (through casts and transposes)."""
    stack: list[tuple[ir.Value, tuple[int, ...]]] = [(value, tuple(range(rank)))]
    seen: set[int] = set()
    while stack:
        v, axes = stack.pop()  # axes[k] = the input axis that sits at axis k of v
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node, index in v.uses():
            if is_op(node, "Concat") and len(node.inputs) >= 2:
                axis = node.attributes.get_int("axis", 0) % len(axes)
                return axes[axis]
            if node.op_type in _KV_PASS and index == 0:
                stack.extend((out, axes) for out in node.outputs[:1])
            elif node.op_type == "Transpose" and index == 0:
                perm = node.attributes.get_ints("perm", list(reversed(range(len(axes)))))
                stack.append((node.outputs[0], tuple(axes[p] for p in perm)))
    return None


def find_roles(model: ir.Model) -> Roles:
    """Roles of the graph inputs, their AR and past length; UserError when they disagree."""
    graph = model.graph
    feedable = [v for v in graph.inputs if not v.is_initializer()]
    roles: dict[str, InputRole] = {}
    ar_sizes: dict[str, int] = {}
    past_sizes: dict[str, int] = {}
    pending: list[tuple[ir.Value, tuple[int, ...]]] = []
    for v in feedable:
        name = v.name or ""
        lname = name.lower()
        shape = _static(v)
        rank = len(shape)
        kind: str | None = None
        axes: dict[int, Dim] = {}
        if "mask" in lname and "encoder" not in lname and "cross" not in lname:
            if rank >= 3:
                kind, axes = "mask", {rank - 2: AR, rank - 1: CL}
            elif rank >= 1:
                kind, axes = "mask", {rank - 1: CL}
        elif _is_int(v) and rank >= 1 and (lname in _TOKEN_NAMES or _embedding_vocab(v) is not None):
            kind = "positions" if "position" in lname else "tokens"
            axes = {rank - 1: AR}
        elif lname in _EMBED_NAMES and rank >= 2:
            kind, axes = "embeds", {rank - 2: AR}
        elif lname in ("cache_position",) or lname.endswith("cache_position"):
            kind, axes = "cache_position", {rank - 1: AR}
        elif _is_int(v) and (lname.endswith("position_ids") or lname in ("position", "positions")):
            kind, axes = "positions", {rank - 1: AR}
        elif _is_float(v) and rank >= 2 and ({"cos", "sin"} & _tokens(name)):
            kind = "cos" if "cos" in _tokens(name) else "sin"
            axes = {rank - 2: AR}
        elif _is_float(v) and rank >= 3 and any(k in lname for k in ("past", "cache")):
            pending.append((v, shape))
            continue
        if kind is None:
            continue
        for axis, d in axes.items():
            if d == AR:
                ar_sizes[name] = shape[axis]
        roles[name] = InputRole(name, kind, axes, rank)

    for v, shape in pending:
        past_axis = _past_axis(v, len(shape))
        if past_axis is None:
            raise UserError(
                f"cannot trace the past axis of input '{v.name}' {list(shape)}: no Concat appends new "
                "entries to it (the AR/CL rewrite needs the KV cache as graph input and output)"
            )
        roles[v.name or ""] = InputRole(v.name or "", "past", {past_axis: P}, len(shape))
        past_sizes[v.name or ""] = shape[past_axis]

    if not ar_sizes:
        raise UserError(
            "cannot trace the AR axis: no token input (input_ids [1,AR], inputs_embeds, position_ids, "
            "RoPE cos/sin or a 4-D attention mask) was found among the graph inputs "
            f"({', '.join(v.name or '?' for v in feedable)})"
        )
    if len(set(ar_sizes.values())) != 1:
        listed = ", ".join(f"{n}: {s}" for n, s in ar_sizes.items())
        raise UserError(f"inputs disagree on the tokens per step (AR): {listed}")
    ar = next(iter(ar_sizes.values()))
    if len(set(past_sizes.values())) > 1:
        listed = ", ".join(f"{n}: {s}" for n, s in past_sizes.items())
        raise UserError(f"KV-cache inputs disagree on the past length: {listed}")
    past = next(iter(past_sizes.values()), 0)
    if not past_sizes:  # prefill: no past, so CL is AR itself
        roles = {n: dataclasses.replace(r, axes={a: AR if d == CL else d for a, d in r.axes.items()})
                 for n, r in roles.items()}  # fmt: skip
    for role in roles.values():
        if role.kind != "mask":
            continue
        shape = _static(next(v for v in feedable if v.name == role.name))
        want = {axis: d.at(ar, past) for axis, d in role.axes.items()}
        got = {axis: shape[axis] for axis in role.axes}
        if want != got:
            expect = ",".join(str(want.get(a, s)) for a, s in enumerate(shape))
            raise UserError(
                f"mask '{role.name}' {list(shape)} does not fit AR {ar} and past {past} "
                f"(expected [{expect}]: [.., AR, CL] or [.., CL] with CL = past + AR)"
            )
    return Roles(ar, past, roles)
