"""The primitive attention form every attention lowering ends in (what the split anchors on).

``MatMul(Q, K^T) -> Mul(scale) -> (Div, Tanh, Mul: softcap) -> Add(bias)... -> Softmax -> MatMul(P, V)``
with Q ``[B, H, S, D]``, K/V ``[B, Hkv, T, D]`` repeated to H heads as HF's ``repeat_kv`` does
(``Unsqueeze -> Expand -> Reshape``, query head h reads KV head ``h // (H / Hkv)``), and the heads
visible through ``Reshape [0, 0, H, -1] -> Transpose`` on the way in and out. The scale multiplies
the product (as ORT's kernels do: GEMM ``alpha``), and masks are additive biases, so every
attention lowering differs only in how it builds Q, K, V and the biases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from mha2sha.lower._build import Builder, Refused, dims

__all__ = ["Attended", "attend", "head_dim", "heads_first", "heads_last", "repeat_kv"]


def heads_first(b: Builder, x: ir.Value, heads: int, label: str) -> ir.Value:
    """``[B, S, H*D] -> [B, S, H, D] -> [B, H, S, D]`` (no shape needed: ``Reshape [0, 0, H, -1]``)."""
    x4 = b.reshape(x, [0, 0, heads, -1], f"{label}_bshd")
    return b.transpose(x4, [0, 2, 1, 3], label)


def heads_last(b: Builder, y: ir.Value, label: str) -> ir.Value:
    """``[B, H, S, D] -> [B, S, H, D] -> [B, S, H*D]``."""
    t = b.transpose(y, [0, 2, 1, 3], f"{label}_bshd")
    return b.reshape(t, [0, 0, -1], label)


def head_dim(value: ir.Value, heads: int | None = None) -> int | None:
    """Last dim of ``value`` (divided by ``heads`` for a 3-D ``[B, S, H*D]`` tensor), if static."""
    shape = dims(value)
    if not shape or shape[-1] is None:
        return None
    return shape[-1] // heads if heads else shape[-1]


def repeat_kv(b: Builder, x: ir.Value, groups: int, kv_heads: int, label: str) -> ir.Value:
    """``[B, Hkv, T, D] -> [B, Hkv*g, T, D]``, each KV head repeated ``g`` times in place."""
    if groups == 1:
        return x
    u = b.unsqueeze(x, [2], f"{label}_unsqueeze")
    e = b.op("Expand", [u, b.i64([1, 1, groups, 1, 1], f"{label}_expand_shape")], f"{label}_expand")
    shape = dims(x)
    d = shape[3] if shape is not None and len(shape) == 4 else None
    if d is not None:
        return b.reshape(e, [0, kv_heads * groups, -1, d], label)
    # head size unknown: take T and D from Shape(e) = [B, Hkv, g, T, D]
    full = b.op("Shape", [e], f"{label}_shape5", dtype=ir.DataType.INT64)
    td = b.slice(full, [3], [5], [0], f"{label}_td")
    target = b.op("Concat", [b.i64([0, kv_heads * groups], f"{label}_bh"), td], f"{label}_shape", axis=0)
    return b.op("Reshape", [e, target], label)


@dataclasses.dataclass
class Attended:
    """The attention output ``[B, H, S, Dv]`` and the score tensors on the way (for debug outputs)."""

    output: ir.Value
    scaled: ir.Value  # Q K^T * scale
    capped: ir.Value  # after the soft cap (``scaled`` without one)
    masked: ir.Value  # after the biases
    probs: ir.Value  # after the softmax (and the fully-masked-row guard)


def attend(
    b: Builder,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    *,
    scale: float | ir.Value,
    groups: int,
    kv_heads: int,
    softcap: float = 0.0,
    biases: Sequence[ir.Value] = (),
    sink: ir.Value | None = None,
    sink_dims: tuple[int, int, int, int] | None = None,
    zero_masked_rows: bool = False,
    label: str = "",
) -> Attended:
    """Softmax attention of ``q [B,H,S,D]`` over ``k, v [B,Hkv,T,D]``.

    ``biases`` are added to the (soft-capped) scores in order. ``sink`` (``[1|B, H, S|1, 1]`` logits,
    static shapes only) is an extra key whose value row is zero: ORT's smooth softmax / head sink,
    written as a concatenated score column and a zero row appended to V so the anchor stays
    ``Softmax -> MatMul(P, V)``; ``sink_dims`` is ``(B, H, S, Dv)``. ``zero_masked_rows``: a query row whose every score is masked to the
    lowest float gives zero probabilities (ORT's guard), a ``Where`` between Softmax and MatMul.
    """
    p = f"{label}/" if label else ""
    k = repeat_kv(b, k, groups, kv_heads, f"{p}k_rep")
    v = repeat_kv(b, v, groups, kv_heads, f"{p}v_rep")
    kt = b.transpose(k, [0, 1, 3, 2], f"{p}k_t")
    qk = b.op("MatMul", [q, kt], f"{p}qk")
    scale_value = scale if isinstance(scale, ir.Value) else b.scalar(scale, f"{p}scale", like=qk)
    scaled = scores = b.op("Mul", [qk, scale_value], f"{p}scores")
    if softcap > 0.0:
        cap = b.scalar(softcap, f"{p}softcap", like=qk)
        capped = b.op("Tanh", [b.op("Div", [scores, cap], f"{p}softcap_div")], f"{p}softcap_tanh")
        scores = b.op("Mul", [capped, cap], f"{p}scores_capped")
    capped = scores
    for i, bias in enumerate(biases):
        scores = b.op("Add", [scores, bias], f"{p}scores_masked" + (f"_{i}" if i else ""))
    masked = scores
    if sink is not None:
        if sink_dims is None:
            raise Refused("a softmax sink needs static shapes (fix the input shapes first)")
        scores, v = _with_sink(b, scores, v, sink, sink_dims, p)
    probs = b.op("Softmax", [scores], f"{p}probs", axis=-1)
    if zero_masked_rows:
        row_max = b.reduce("ReduceMax", masked, [-1], f"{p}row_max")
        lowest = b.lowest(f"{p}lowest", like=qk)
        dead = b.less_equal(row_max, lowest, f"{p}row_masked")
        probs = b.op("Where", [dead, b.scalar(0.0, f"{p}zero", like=qk), probs], f"{p}probs_guarded")
    out = b.op("MatMul", [probs, v], f"{p}attn")
    return Attended(out, scaled, capped, masked, probs)


def _with_sink(
    b: Builder, scores: ir.Value, v: ir.Value, sink: ir.Value, shape: tuple[int, int, int, int], p: str
) -> tuple[ir.Value, ir.Value]:
    batch, heads, seq, v_size = shape
    column = b.op("Expand", [sink, b.i64([batch, heads, seq, 1], f"{p}sink_shape")], f"{p}sink")
    scores = b.op("Concat", [scores, column], f"{p}scores_sink", axis=-1)
    dtype = b.dtype.numpy() if b.dtype is not None else np.float32
    zeros = b.const(np.zeros([batch, heads, 1, v_size], dtype=dtype), f"{p}sink_value")
    if b.dtype is None:
        zeros = b.op("CastLike", [zeros, v], f"{p}sink_value_cast")
    v = b.op("Concat", [v, zeros], f"{p}v_sink", axis=2)
    return scores, v
