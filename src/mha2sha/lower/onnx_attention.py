"""ONNX ``Attention`` (opset 23, 24) -> primitive attention, as onnxruntime's CPU kernel computes it.

Rules:
- 3-D ``Q [B,S,Hq*D]``, ``K/V [B,L,Hkv*D]`` are split into heads with ``q_num_heads`` /
  ``kv_num_heads`` (``Reshape [0,0,H,-1] -> Transpose``), the output joined back to ``[B,S,Hq*Dv]``;
  4-D inputs are used as they are. ``Hq > Hkv`` repeats each KV head ``Hq/Hkv`` times (``repeat_kv``).
- ``past_key``/``past_value`` are appended to with ``Concat`` on the sequence axis: that Concat is
  ``present_key``/``present_value``.
- Scores are ``(Q K^T) * scale`` (default ``1/sqrt(head_size)``), soft-capped
  (``softcap * tanh(x / softcap)``) before any mask.
- Masks follow the kernel: a boolean ``attn_mask`` False, a causal position (``j > i + past``) and a
  key at or after ``nonpad_kv_seqlen[b]`` all set the bias to the lowest float (assigned, not added
  to a float mask); a float ``attn_mask`` is added elsewhere. Causal with ``nonpad_kv_seqlen`` is
  bottom-right aligned per batch (``j <= i + nonpad[b] - S``).
- A query row whose masked scores are all the lowest float (or -inf) gives a zero output row.
- ``qk_matmul_output`` modes 0-3 are the scaled product, the soft-capped scores, the masked scores
  and the probabilities. ``softmax_precision`` is ignored (noted): the softmax runs in the input type.
Refused: ``attn_mask`` whose last axis is not the total sequence length (onnxruntime rejects it),
causal or ``nonpad_kv_seqlen`` masks without static sequence lengths, the opset-25 window attributes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from mha2sha.graph import attr_float, attr_int
from mha2sha.lower._build import Builder, Refused, dims, input_at
from mha2sha.lower._sdpa import attend, head_dim, heads_first, heads_last

__all__ = ["lower_attention"]


def default_scale(
    b: Builder, head_size: int | None, like: ir.Value, label: str = "scale"
) -> float | ir.Value:
    """``1/sqrt(head_size)`` as the kernels compute it (double, then float); in-graph when unknown."""
    if head_size is not None:
        return float(np.float32(1.0 / math.sqrt(head_size)))
    shape = b.op("Shape", [like], f"{label}_shape", dtype=ir.DataType.INT64)
    last = b.slice(shape, [-1], [np.iinfo(np.int64).max], [0], f"{label}_head_size")
    size = b.to_float(last, f"{label}_head_size_f", like=like)
    root = b.op("Sqrt", [size], f"{label}_sqrt")
    return b.reshape(b.op("Reciprocal", [root], f"{label}_1d"), [], label)


def lower_attention(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    query, key, value = node.inputs[0], node.inputs[1], node.inputs[2]
    mask, past_k, past_v, nonpad = (input_at(node, i) for i in (3, 4, 5, 6))
    if query is None or key is None or value is None:
        raise Refused("Q, K and V are required")
    if (past_k is None) != (past_v is None):
        raise Refused("past_key and past_value must be given together")
    if nonpad is not None and past_k is not None:
        raise Refused("nonpad_kv_seqlen with past_key/past_value is invalid")
    for window in ("left_window_size", "right_window_size"):
        if attr_int(node, window, -1) != -1:
            raise Refused(f"{window} (opset 25) is not supported")
    if "softmax_precision" in node.attributes:
        b.notes.append("softmax_precision ignored: the softmax runs in the input type")
    b.float_type_of(query, key, value, past_k, node.outputs[0])

    hq_attr, hkv_attr = attr_int(node, "q_num_heads", 0), attr_int(node, "kv_num_heads", 0)
    q_shape = dims(query)
    rank = len(q_shape) if q_shape is not None else (3 if hq_attr and hkv_attr else None)
    hq: int | None
    hkv: int | None
    if rank == 3:
        if not (hq_attr and hkv_attr):
            raise Refused("3-D inputs need q_num_heads and kv_num_heads")
        hq, hkv = hq_attr, hkv_attr
        q = heads_first(b, query, hq, "q")
        k = heads_first(b, key, hkv, "k")
        v = heads_first(b, value, hkv, "v")
        size = head_dim(query, hq)
        seq_axis = 1
    elif rank == 4:
        hq = hq_attr or (q_shape[1] if q_shape else None)
        hkv = hkv_attr or (dims(key) or [None, None])[1]
        if hq is None or hkv is None:
            raise Refused("4-D inputs with unknown head counts")
        q, k, v = query, key, value
        size = head_dim(query)
        seq_axis = 2
    else:
        raise Refused("the rank of Q is unknown")
    if hq % hkv:
        raise Refused(f"q_num_heads {hq} is not a multiple of kv_num_heads {hkv}")

    if past_k is not None:
        k = b.op("Concat", [past_k, k], "present_key", axis=2)
        v = b.op("Concat", [past_v, v], "present_value", axis=2)
    present_k, present_v = k, v  # without a past: the keys/values in [B, Hkv, L, D]

    scale = attr_float(node, "scale", 0.0) or default_scale(b, size, q)
    bias, guard = _bias(node, b, query, key, past_k, mask, nonpad, seq_axis)
    att = attend(
        b,
        q,
        k,
        v,
        scale=scale,
        groups=hq // hkv,
        kv_heads=hkv,
        softcap=attr_float(node, "softcap", 0.0),
        biases=[bias] if bias is not None else [],
        zero_masked_rows=guard,
    )
    y = heads_last(b, att.output, "output") if rank == 3 else att.output
    mode = attr_int(node, "qk_matmul_output_mode", 0)
    qk_out = {0: att.scaled, 1: att.capped, 2: att.masked, 3: att.probs}.get(mode)
    return [y, present_k, present_v, qk_out]


def _seq_len(value: ir.Value, axis: int) -> int | None:
    shape = dims(value)
    return shape[axis] if shape is not None and len(shape) > axis else None


def _bias(
    node: ir.Node,
    b: Builder,
    query: ir.Value,
    key: ir.Value,
    past_k: ir.Value | None,
    mask: ir.Value | None,
    nonpad: ir.Value | None,
    seq_axis: int,
) -> tuple[ir.Value | None, bool]:
    """The additive bias and whether fully masked rows are possible (the zero-row guard)."""
    causal = attr_int(node, "is_causal", 0) == 1
    s, kv = _seq_len(query, seq_axis), _seq_len(key, seq_axis)
    past = _seq_len(past_k, 2) if past_k is not None else 0
    total = kv + past if kv is not None and past is not None else None
    if mask is not None:
        mask_shape = dims(mask)
        last = mask_shape[-1] if mask_shape else None
        if last is not None and total is not None and last != total:
            raise Refused(f"attn_mask last axis {last} != total sequence length {total}")
    if (causal or nonpad is not None) and (s is None or total is None):
        raise Refused("a causal or nonpad_kv_seqlen mask needs static sequence lengths")

    allowed: ir.Value | None = None  # bool, True where a key may be attended
    if causal and nonpad is None:
        assert s is not None and total is not None and past is not None
        allowed = b.const(np.tril(np.ones((s, total), bool), past), "causal")
    if nonpad is not None:
        assert s is not None and total is not None
        keys = b.const(np.arange(total, dtype=np.int64).reshape(1, 1, 1, total), "key_positions")
        lengths = b.reshape(nonpad, [-1, 1, 1, 1], "nonpad_b111")
        allowed = b.op("Less", [keys, lengths], "nonpad_valid", dtype=ir.DataType.BOOL)
        if causal:  # bottom-right per batch: j <= i + nonpad[b] - S
            rows = b.const(np.arange(total, dtype=np.int64)[:s].reshape(1, 1, s, 1) - s, "query_offsets")
            frontier = b.op("Add", [rows, lengths], "causal_frontier")
            within = b.less_equal(keys, frontier, "causal_valid")
            allowed = b.op("And", [allowed, within], "allowed", dtype=ir.DataType.BOOL)
    float_mask = None
    if mask is not None:
        if mask.dtype == ir.DataType.BOOL:
            allowed = mask if allowed is None else b.op("And", [mask, allowed], "mask_allowed")
        elif mask.dtype is None:
            raise Refused("the element type of attn_mask is unknown")
        else:
            float_mask = mask
    if allowed is None:
        return float_mask, float_mask is not None
    if allowed.const_value is not None and float_mask is None and b.dtype is not None:
        keep = allowed.const_value.numpy()
        table = np.where(keep, 0, np.finfo(b.dtype.numpy()).min).astype(b.dtype.numpy())
        bias = b.const(table, "causal_bias")
    else:
        base = float_mask if float_mask is not None else b.scalar(0.0, "mask_zero", like=query)
        bias = b.op("Where", [allowed, base, b.lowest("mask_lowest", like=query)], "attn_bias")
    return bias, mask is not None or nonpad is not None
