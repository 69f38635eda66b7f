"""Drive an LLM step graph through a real token loop, so graphs of different AR / CL can be compared.

A step graph processes AR tokens per call against a KV cache of ``P = CL - AR`` positions. Two
variants of one model (AR 128 and AR 1, CL 512 and CL 2048) never see the same inputs, so they are
compared the way they are used: the same prompt of T tokens is fed in chunks of AR, the cache is
carried from step to step as the graph's I/O contract says, and the logits of every prompt token
(and the cache at the end) must agree.

The :class:`StepContract` says which input is what and which output returns the new KV entries
(prepared graphs, ``[.., AR, ..]``) or the whole cache (Hugging Face ``present = concat(past, new)``,
``[.., CL, ..]``) for each past input, and which output holds the logits;
:func:`mha2sha.arcl.contract.infer_contract` reads it from a graph (input roles and the AR/CL
trace), :func:`mha2sha.arcl.contract.compare_step_graphs` compares two graphs of one model.

The loop keeps the ``n`` valid cached entries right-aligned in the past input (slots ``P - n ..
P - 1``; the rest is masked). Each call sees:

=========================  ==========================================================
input                      value for new token ``i`` of the chunk (absolute position n + i)
=========================  ==========================================================
token ids                  the prompt's ids; a short last chunk is padded after its tokens
mask ``[.., AR, CL]``      row ``i`` sees the valid past slots and new columns ``<= i``
                           (float: 0 / :data:`~mha2sha.verify.inputs.MASK_NEG`, bool, int 1/0)
mask ``[.., CL]``          1 on the valid past slots and every new column (the graph adds the
                           causal part)
``position_ids``           ``n + i``
``cache_position``         ``P + i`` (its index in ``concat(past, new)``)
RoPE cos / sin ``[.., F]`` ``cos/sin((n + i) * theta ** (-k / F))``, ``F`` = half the head dim
=========================  ==========================================================

Padded tokens come after the real ones, so causality hides them from every real token; only the
real tokens' new entries enter the cache. A prefill graph (no cache) is one call on up to AR
tokens.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from mha2sha.errors import UserError
from mha2sha.verify.inputs import MASK_NEG, ROPE_THETA

__all__ = [
    "KvSlot",
    "LoopCheck",
    "LoopResult",
    "StepContract",
    "compare_loops",
    "prompt_tokens",
    "run_token_loop",
]


@dataclasses.dataclass(frozen=True)
class KvSlot:
    """One past KV input and the output that carries its new entries."""

    past: str
    axis: int  # the past axis of the input
    output: str
    out_axis: int
    kind: str  # "new" (only the AR new entries) | "present" (past + new, CL entries)


@dataclasses.dataclass(frozen=True)
class StepContract:
    """How one step graph is fed and what it returns (see the module docstring)."""

    ar: int
    past: int
    #: name -> (numpy dtype name, shape): each size is ``(c, a, p)`` = ``c + a * AR + p * past``,
    #: so one contract serves every AR / CL variant of the graph (:meth:`at`)
    inputs: dict[str, tuple[str, tuple[tuple[int, int, int], ...]]]
    tokens: str | None = None
    embeds: str | None = None
    mask: str | None = None
    positions: str | None = None
    cache_position: str | None = None
    cos: str | None = None
    sin: str | None = None
    kv: tuple[KvSlot, ...] = ()
    logits: str = "logits"
    logits_axis: int = 1
    vocab: int = 100

    @property
    def cl(self) -> int:
        return self.ar + self.past

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(c + a * self.ar + p * self.past for c, a, p in self.inputs[name][1])

    def at(self, ar: int, past: int) -> StepContract:
        """The same contract for the variant of this graph with ``ar`` tokens per step and ``past``."""
        return dataclasses.replace(self, ar=ar, past=past)

    @property
    def capacity(self) -> int:
        """The longest prompt one loop can process: every chunk starts with at most P cached tokens."""
        return (self.past // self.ar + 1) * self.ar if self.kv else self.ar

    def to_dict(self) -> dict:
        return {
            "ar": self.ar,
            "cl": self.cl,
            "style": self.style,
            "kv": [dataclasses.asdict(s) for s in self.kv],
            "logits": self.logits,
        }

    @property
    def style(self) -> str:
        if not self.kv:
            return "prefill"
        kinds = {s.kind for s in self.kv}
        return "new-entries" if kinds == {"new"} else "present" if kinds == {"present"} else "mixed"


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class LoopResult:
    """Logits of every prompt token ``[T, ...]`` and the final cache per past input (``T`` entries)."""

    logits: np.ndarray
    kv: dict[str, np.ndarray]
    steps: int


def prompt_tokens(contract: StepContract, length: int, seed: int = 0) -> np.ndarray:
    """``length`` token ids inside the vocabulary, the same for every variant of a model."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, max(contract.vocab, 1), size=length).astype(np.int64)


def _rope(rows: np.ndarray, freqs: int, kind: str, theta: float) -> np.ndarray:
    inv = theta ** (-np.arange(freqs, dtype=np.float64) / max(freqs, 1))
    angles = rows.astype(np.float64)[:, None] * inv[None, :]
    return np.cos(angles) if kind == "cos" else np.sin(angles)


def _fill(shape: tuple[int, ...], grid: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``grid`` (its trailing axes) broadcast to ``shape``."""
    return np.ascontiguousarray(np.broadcast_to(grid, shape).astype(dtype))


def _mask(contract: StepContract, shape: tuple[int, ...], dtype: np.dtype, n: int) -> np.ndarray:
    ar, past = contract.ar, contract.past
    if len(shape) >= 3:
        rows = np.arange(ar)[:, None]
        cols = np.arange(shape[-1])[None, :]
        visible = np.where(cols < past, cols >= past - n, cols - past <= rows)
    else:
        cols = np.arange(shape[-1])
        visible = (cols >= past - n) if contract.kv else np.ones(shape[-1], dtype=bool)
    if dtype == np.bool_:
        grid = visible
    elif dtype.kind == "f" or dtype.name == "bfloat16":
        grid = np.where(visible, 0.0, MASK_NEG)
    else:
        grid = visible.astype(np.int64)
    return _fill(shape, grid, dtype)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _session(path: str | os.PathLike):
    import onnxruntime as ort

    from mha2sha.verify.runner import session_options

    try:
        return ort.InferenceSession(
            os.fspath(path), session_options("basic"), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise UserError(f"onnxruntime cannot load {path}: {' '.join(str(exc).split())[:300]}") from None


def run_token_loop(
    model: str | os.PathLike,
    contract: StepContract,
    tokens: Sequence[int] | np.ndarray,
    *,
    rope_theta: float = ROPE_THETA,
    session=None,
) -> LoopResult:
    """Feed ``tokens`` through the step graph at ``model`` in chunks of AR (see the module docstring)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    total = len(tokens)
    if total < 1:
        raise UserError("the token loop needs at least one token")
    if total > contract.capacity:
        raise UserError(
            f"a prompt of {total} tokens does not fit a step with AR {contract.ar} and CL {contract.cl} "
            f"(at most {contract.capacity})"
        )
    sess = session or _session(model)
    ar, past = contract.ar, contract.past
    dtypes = {name: _np_dtype(d) for name, (d, _) in contract.inputs.items()}
    shapes = {name: contract.shape(name) for name in contract.inputs}
    caches = {s.past: np.zeros(shapes[s.past], dtypes[s.past]) for s in contract.kv}
    history: dict[str, list[np.ndarray]] = {s.past: [] for s in contract.kv}
    logits: list[np.ndarray] = []
    rng_embeds = np.random.default_rng(1234)
    embed_table = None
    n = 0
    steps = 0
    outputs = [contract.logits, *(s.output for s in contract.kv)]
    while n < total:
        r = min(ar, total - n)
        feeds: dict[str, np.ndarray] = {}
        pos = np.arange(n, n + ar)
        if contract.tokens:
            ids = np.zeros(ar, np.int64)
            ids[:r] = tokens[n : n + r]
            feeds[contract.tokens] = _fill(shapes[contract.tokens], ids, dtypes[contract.tokens])
        if contract.embeds:
            shape = shapes[contract.embeds]
            if embed_table is None:
                embed_table = rng_embeds.standard_normal((contract.vocab, shape[-1]))
            ids = np.zeros(ar, np.int64)
            ids[:r] = tokens[n : n + r]
            feeds[contract.embeds] = _fill(shape, embed_table[ids], dtypes[contract.embeds])
        if contract.mask:
            feeds[contract.mask] = _mask(contract, shapes[contract.mask], dtypes[contract.mask], n)
        if contract.positions:
            feeds[contract.positions] = _fill(shapes[contract.positions], pos, dtypes[contract.positions])
        if contract.cache_position:
            grid = np.arange(past, past + ar)
            feeds[contract.cache_position] = _fill(
                shapes[contract.cache_position], grid, dtypes[contract.cache_position]
            )
        for name, kind in ((contract.cos, "cos"), (contract.sin, "sin")):
            if name:
                shape = shapes[name]
                feeds[name] = _fill(shape, _rope(pos, shape[-1], kind, rope_theta), dtypes[name])
        for slot in contract.kv:
            feeds[slot.past] = caches[slot.past]
        try:
            got = dict(zip(outputs, sess.run(outputs, feeds), strict=True))
        except Exception as exc:
            raise UserError(
                f"onnxruntime failed in the token loop of {model}: {' '.join(str(exc).split())[:300]}"
            ) from None
        steps += 1
        logits.append(np.take(got[contract.logits], np.arange(r), axis=contract.logits_axis))
        for slot in contract.kv:
            out = got[slot.output]
            start = past if slot.kind == "present" else 0
            new = np.take(out, np.arange(start, start + r), axis=slot.out_axis)
            history[slot.past].append(new)
            if past:
                joined = np.concatenate(
                    [caches[slot.past], new.astype(caches[slot.past].dtype)], axis=slot.axis
                )
                caches[slot.past] = np.take(joined, np.arange(joined.shape[slot.axis] - past, joined.shape[slot.axis]),
                                            axis=slot.axis)  # fmt: skip
        n += r
    all_logits = np.concatenate(logits, axis=contract.logits_axis)
    all_logits = np.moveaxis(all_logits, contract.logits_axis, 0).reshape(total, -1)
    kv = {name: np.concatenate(parts, axis=next(s.axis for s in contract.kv if s.past == name))
          for name, parts in history.items()}  # fmt: skip
    return LoopResult(all_logits, kv, steps)


# ----------------------------------------------------------------------------- comparing


@dataclasses.dataclass(frozen=True)
class LoopCheck:
    """One compared quantity: ``max_err`` is norm-relative (float) or in LSBs (quantized)."""

    name: str
    max_err: float
    ok: bool
    worst_token: int | None = None
    unit: str = "rel"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        same = np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(a[~np.isnan(a)], b[~np.isnan(b)])
        return 0.0 if same else float("inf")
    return (
        float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), np.finfo(np.float64).tiny))
        if a.size
        else 0.0
    )


def compare_loops(
    reference: LoopResult,
    candidate: LoopResult,
    *,
    rtol: float = 1e-5,
    lsb: Mapping[str, float] | None = None,
    max_lsb: float = 1.0,
) -> list[LoopCheck]:
    """Per-token logits and the final cache of two loops on the same prompt.

    Float: each token's logits ``max|a - b| / max|a|`` <= ``rtol`` (worst token reported), each
    cache likewise. With ``lsb`` (quantization step per name) the difference is counted in steps
    and must be at most ``max_lsb``.
    """
    checks = []
    tokens = reference.logits.shape[0]
    if candidate.logits.shape != reference.logits.shape:
        return [LoopCheck("logits", float("inf"), False)]

    def measure(name: str, a: np.ndarray, b: np.ndarray) -> float:
        if lsb is not None and name in lsb:
            diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
            return float(np.rint(diff / lsb[name]).max()) if diff.size else 0.0
        return _rel(a, b)

    errs = [measure("logits", reference.logits[t], candidate.logits[t]) for t in range(tokens)]
    worst = int(np.argmax(errs))
    limit = max_lsb if lsb is not None and "logits" in lsb else rtol
    unit = "lsb" if lsb is not None and "logits" in lsb else "rel"
    checks.append(LoopCheck("logits", errs[worst], errs[worst] <= limit, worst, unit))
    for name, ref in reference.kv.items():
        got = candidate.kv.get(name)
        err = float("inf") if got is None else measure(name, ref, got)
        limit = max_lsb if lsb is not None and name in lsb else rtol
        unit = "lsb" if lsb is not None and name in lsb else "rel"
        checks.append(LoopCheck(name, err, err <= limit, None, unit))
    return checks
