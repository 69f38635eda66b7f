"""The token-loop contract of a step graph, read from its input roles and the AR/CL trace.

:func:`infer_contract` says how :func:`mha2sha.verify.token_loop.run_token_loop` feeds a graph: which
input holds the token ids, the mask, positions or RoPE tables (:mod:`mha2sha.arcl.roles`), and, from
the trace, which output returns each past input's new entries (``[.., AR, ..]``: prepared graphs) or
the whole cache (``[.., CL, ..]``: Hugging Face ``present``), and the logits' token axis. Outputs are
paired with past inputs by the naming conventions (``past_key_0_in`` -> ``past_key_0_out``,
``past_key_0`` -> ``present_key_0``), else by dataflow (the Concat that appends to the input), and a
pairing is only accepted when the trace gives the output an AR or CL axis there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from mha2sha.arcl.dims import AR, CL, Dim
from mha2sha.arcl.roles import find_roles
from mha2sha.arcl.trace import Trace
from mha2sha.errors import UserError
from mha2sha.io.load import load_model
from mha2sha.verify.inputs import ROPE_THETA, _embedding_vocab
from mha2sha.verify.token_loop import (
    KvSlot,
    LoopCheck,
    StepContract,
    compare_loops,
    prompt_tokens,
    run_token_loop,
)

__all__ = ["compare_step_graphs", "infer_contract"]


def infer_contract(model: ir.Model, trace: Trace | None = None) -> StepContract:
    """The token-loop contract of the step graph ``model`` (``trace``: its AR/CL trace, if made)."""
    roles = trace.roles if trace is not None else find_roles(model)
    trace = trace or Trace(model, roles).run()
    graph = model.graph
    inputs = {}
    fields: dict[str, object] = {}
    for v in graph.inputs:
        if v.is_initializer():
            continue
        name = v.name or ""
        state = trace.state(v)
        inputs[name] = (np.dtype(v.dtype.numpy()).name, tuple((d.c, d.a, d.p) for d in state.shape))  # type: ignore[union-attr]
        role = roles.inputs.get(name)
        kind = role.kind if role else None
        key = {"tokens": "tokens", "embeds": "embeds", "mask": "mask", "positions": "positions",
               "cache_position": "cache_position", "cos": "cos", "sin": "sin"}.get(kind or "")  # fmt: skip
        if key is None and kind != "past":
            raise UserError(
                f"input '{name}' has no role in a token loop (token ids, mask, positions, RoPE "
                "cos/sin, past KV); the LLM step check cannot feed it"
            )
        if key is not None:
            if fields.get(key) is not None:
                raise UserError(f"two inputs look like the {key}: '{fields[key]}' and '{name}'")
            fields[key] = name
            if key == "tokens":
                fields["vocab"] = _embedding_vocab(v) or 100
    outputs = {o.name or "": o for o in graph.outputs}
    slots = []
    used: set[str] = set()
    for role in roles.of("past"):
        axis = next(iter(role.axes))
        out = _paired_output(role.name, outputs, used, trace, axis)
        if out is None:
            raise UserError(
                f"no output returns the new entries of '{role.name}' (expected e.g. "
                f"'{_candidates(role.name)[0] if _candidates(role.name) else 'present_*'}')"
            )
        value, kind = out
        used.add(value.name or "")
        slots.append(KvSlot(role.name, axis, value.name or "", axis, kind))
    logits = outputs.get("logits")
    if logits is None:
        rest = [o for o in graph.outputs if o.name not in used]
        logits = rest[0] if rest else None
    if logits is None:
        raise UserError("the step graph has no logits output")
    state = trace.state(logits)
    shape = state.shape if state is not None else None
    ar_axis = next((k for k, d in enumerate(shape or ()) if d == AR), None)
    if ar_axis is None:
        raise UserError(
            f"output '{logits.name}' has no axis of the new tokens (last-token-only logits cannot be "
            "compared per token)"
        )
    return StepContract(roles.ar, roles.past, inputs, kv=tuple(slots), logits=logits.name or "",
                        logits_axis=ar_axis, **fields)  # type: ignore[arg-type]  # fmt: skip


def _candidates(name: str) -> list[str]:
    """Output names the conventions give the entries appended to past input ``name``."""
    out = []
    if name.endswith("_in"):
        out.append(name[:-3] + "_out")
    for a, b in (("past_key_values", "present"), ("past_key", "present_key"), ("past_value", "present_value"),
                 ("past", "present"), ("cache", "present")):  # fmt: skip
        if a in name:
            out.append(name.replace(a, b, 1))
    return out


def _paired_output(
    name: str, outputs: Mapping[str, ir.Value], used: set[str], trace: Trace, axis: int
) -> tuple[ir.Value, str] | None:
    """The output holding ``name``'s new entries (by naming convention, else by dataflow)."""

    def kind_of(value: ir.Value) -> str | None:
        state = trace.state(value)
        if state is None or state.shape is None or axis >= len(state.shape):
            return None
        d: Dim = state.shape[axis]
        return "new" if d == AR else "present" if d == CL else None

    for cand in _candidates(name):
        value = outputs.get(cand)
        if value is not None and cand not in used and kind_of(value):
            return value, kind_of(value)  # type: ignore[return-value]
    # dataflow: the Concat appending to the past input, or its new-entries operand
    past = next(v for v in trace.graph.inputs if v.name == name)
    for node, _ in past.uses():
        if node.op_type != "Concat":
            continue
        for value in (node.outputs[0], *node.inputs):
            if value is not None and value.is_graph_output() and value.name not in used and kind_of(value):
                return value, kind_of(value)  # type: ignore[return-value]
    return None


def compare_step_graphs(
    original: str | os.PathLike,
    candidate: str | os.PathLike,
    *,
    tokens: int | None = None,
    rtol: float = 1e-5,
    seed: int = 0,
    rope_theta: float = ROPE_THETA,
) -> tuple[list[LoopCheck], int, tuple[int, int]]:
    """Two step graphs of one model (any AR / CL each) through the same prompt.

    Returns the checks (:func:`compare_loops`), the prompt length and the steps each took. The
    prompt is ``tokens`` long, by default long enough to take both graphs through several steps
    and short enough to fit both caches.
    """
    contracts = [infer_contract(load_model(p)) for p in (original, candidate)]
    fit = min(c.capacity for c in contracts)
    length = tokens if tokens is not None else min(fit, max(32, 2 * max(c.ar for c in contracts)))
    if not 1 <= length <= fit:
        raise UserError(f"a prompt of {length} tokens does not fit both graphs (at most {fit})")
    if contracts[0].vocab != contracts[1].vocab:
        raise UserError(
            f"the graphs have different vocabularies ({contracts[0].vocab} vs {contracts[1].vocab})"
        )
    prompt = prompt_tokens(contracts[0], length, seed)
    ref = run_token_loop(original, contracts[0], prompt, rope_theta=rope_theta)
    got = run_token_loop(candidate, contracts[1], prompt, rope_theta=rope_theta)
    return compare_loops(ref, got, rtol=rtol), length, (ref.steps, got.steps)
