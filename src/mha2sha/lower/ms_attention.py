"""``com.microsoft.Attention`` and ``com.microsoft.MultiHeadAttention`` -> primitive attention.

Rules (as onnxruntime's CPU kernels compute them):
- ``Attention``: ``input @ weights + bias`` (one MatMul, the packed-QKV form the split slices) split
  into Q, K, V by ``qkv_hidden_sizes`` (equal thirds by default), heads ``[B,S,N*H] -> [B,N,S,H]``.
  ``past [2,B,N,P,H]`` is split into key and value, each appended to by ``Concat``; ``present`` is
  the two stacked again.
- ``MultiHeadAttention``: separate Q/K/V ``[B,S,D]`` (K/V ``[B,L,D]``), packed QKV ``[B,S,N,3,H]``,
  packed KV ``[B,L,N,2,H]``, or cross-attention K/V already ``[B,N,L,H]``; ``bias`` (q|k|v) is
  added to the 3-D or packed projections; ``past_key``/``past_value`` are appended to.
- Masks become additive biases: a raw mask (``[B,T]``, ``[B,S,T]``: ``> 0`` keeps) or key lengths
  (``[B]``: keys ``>= len`` masked; ``[2B]``: also keys before the start) add
  ``mask_filter_value`` (default -10000) where masked; ``unidirectional`` sets ``j > i + past`` to the
  lowest float; ``attention_bias [B|1, N|1, S, T]`` is added after.
- Scores are ``(Q K^T) * scale`` (default ``1/sqrt(head_size)``).
Refused: 4-D Megatron masks (the CPU kernel does not run them), ``[3B+2]`` key-length masks,
``do_rotary``, ``past_present_share_buffer`` / ``past_sequence_length`` / ``cache_indirection``
(a buffer written in place), the ``qk`` output.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from mha2sha.graph import attr_float, attr_int, attr_ints
from mha2sha.lower._build import Builder, Refused, dims, input_at, used
from mha2sha.lower._sdpa import attend, heads_first, heads_last

__all__ = ["lower_ms_attention", "lower_multi_head_attention"]


def _scale(node: ir.Node, head_size: int | None) -> float:
    scale = attr_float(node, "scale", 0.0)
    if scale:
        return scale
    if head_size is None:
        raise Refused("the head size is unknown (needed for the default scale)")
    return float(np.float32(1.0 / math.sqrt(head_size)))


def key_mask_bias(
    b: Builder,
    mask: ir.Value,
    *,
    batch: int | None,
    total: int | None,
    filter_value: float,
    like: ir.Value,
) -> ir.Value:
    """The additive bias of a contrib ``mask_index`` / ``key_padding_mask`` (``[B,1,S|1,T]``)."""
    shape = dims(mask)
    if shape is None:
        raise Refused("the rank of the mask is unknown")
    filler = b.scalar(filter_value, "mask_filter_value", like=like)
    zero = b.scalar(0.0, "mask_zero", like=like)
    if len(shape) in (2, 3):
        if shape[-1] is not None and total is not None and shape[-1] != total:
            raise Refused(f"a mask over {shape[-1]} keys with {total} keys in total")
        keep = b.op(
            "Greater",
            [mask, b.const(np.asarray(0, mask.dtype.numpy() if mask.dtype else np.int32), "mask_threshold")],
            "mask_keep",
            dtype=ir.DataType.BOOL,
        )
        bias = b.op("Where", [keep, zero, filler], "mask_bias")
        return b.unsqueeze(bias, [1, 2] if len(shape) == 2 else [1], "mask_bias_4d")
    if len(shape) == 1:
        if total is None or batch is None or shape[0] is None:
            raise Refused("a key-length mask needs static batch and sequence sizes")
        keys = b.const(np.arange(total, dtype=np.int64).reshape(1, total), "key_positions")
        lengths = b.cast(mask, ir.DataType.INT64, "mask_lengths")
        if shape[0] == batch:
            ends = b.reshape(lengths, [batch, 1], "mask_ends")
            keep = b.op("Less", [keys, ends], "mask_keep", dtype=ir.DataType.BOOL)
        elif shape[0] == 2 * batch:
            ends, starts = b.split(
                b.reshape(lengths, [2 * batch, 1], "mask_bounds"),
                [batch, batch],
                0,
                ["mask_ends", "mask_starts"],
            )
            before_end = b.op("Less", [keys, ends], "mask_before_end", dtype=ir.DataType.BOOL)
            if b.opset >= 12:
                after_start = b.op(
                    "GreaterOrEqual", [keys, starts], "mask_after_start", dtype=ir.DataType.BOOL
                )
            else:  # keys >= start  <=>  keys > start - 1
                before = b.op("Sub", [starts, b.i64([1], "one")], "mask_starts_m1")
                after_start = b.op("Greater", [keys, before], "mask_after_start", dtype=ir.DataType.BOOL)
            keep = b.op("And", [before_end, after_start], "mask_keep", dtype=ir.DataType.BOOL)
        else:
            raise Refused(f"a 1-D mask of {shape[0]} entries (only [B] and [2B] key lengths are supported)")
        bias = b.op("Where", [keep, zero, filler], "mask_bias")
        return b.reshape(bias, [batch, 1, 1, total], "mask_bias_4d")
    raise Refused(f"a {len(shape)}-D mask is not run by onnxruntime's CPU kernel")


def causal_bias(
    b: Builder, base: ir.Value | None, *, seq: int | None, total: int | None, past: int | None, like: ir.Value
) -> ir.Value:
    """``base`` (or 0) where ``j <= i + past``, the lowest float elsewhere (assigned, as the kernels do)."""
    if seq is None or total is None or past is None:
        raise Refused("a causal mask needs static sequence lengths")
    keep = np.tril(np.ones((seq, total), bool), past)
    if base is None and b.dtype is not None:
        dtype = b.dtype.numpy()
        return b.const(np.where(keep, 0, np.finfo(dtype).min).astype(dtype), "causal_bias")
    base = base if base is not None else b.scalar(0.0, "causal_zero", like=like)
    return b.op("Where", [b.const(keep, "causal"), base, b.lowest("causal_lowest", like=like)], "causal_bias")


def _masks(
    b: Builder,
    node: ir.Node,
    mask: ir.Value | None,
    attention_bias: ir.Value | None,
    *,
    batch: int | None,
    seq: int | None,
    kv: int | None,
    past: int | None,
    like: ir.Value,
) -> list[ir.Value]:
    total = kv + past if kv is not None and past is not None else None
    bias = None
    if mask is not None:
        filter_value = attr_float(node, "mask_filter_value", -10000.0)
        bias = key_mask_bias(b, mask, batch=batch, total=total, filter_value=filter_value, like=like)
    if attr_int(node, "unidirectional", 0) and (seq is None or seq > 1 or past is None):
        bias = causal_bias(b, bias, seq=seq, total=total, past=past, like=like)
    biases = [bias] if bias is not None else []
    if attention_bias is not None:
        biases.append(attention_bias)
    return biases


def _refuse_buffer_sharing(node: ir.Node, first_extra: int) -> None:
    if attr_int(node, "past_present_share_buffer", 0):
        raise Refused("past_present_share_buffer (the cache is written in place) is not supported")
    for i in range(first_extra, len(node.inputs)):
        if node.inputs[i] is not None:
            raise Refused(f"input {i} (past_sequence_length / cache_indirection) is not supported")


def lower_ms_attention(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    x, weights, bias, mask, past, attention_bias = (input_at(node, i) for i in range(6))
    if x is None or weights is None:
        raise Refused("input and weights are required")
    if attr_int(node, "do_rotary", 0):
        raise Refused("do_rotary (RoPE with caches computed inside the kernel) is not supported")
    _refuse_buffer_sharing(node, 6)
    b.float_type_of(x, weights, bias, node.outputs[0])
    heads = attr_int(node, "num_heads", 0)
    w_shape = dims(weights)
    sizes = attr_ints(node, "qkv_hidden_sizes")
    if not sizes:
        if w_shape is None or w_shape[-1] is None:
            raise Refused("the weights' width is unknown")
        sizes = [w_shape[-1] // 3] * 3
    if any(s % heads for s in sizes):
        raise Refused(f"qkv_hidden_sizes {sizes} are not multiples of num_heads {heads}")
    if past is not None and sizes[0] != sizes[2]:
        raise Refused("past state needs equal Q and V hidden sizes")
    qkv = b.op("MatMul", [x, weights], "qkv_matmul")
    if bias is not None:
        qkv = b.op("Add", [qkv, bias], "qkv")
    q3, k3, v3 = b.split(qkv, sizes, -1, ["q_proj", "k_proj", "v_proj"])
    q, k, v = (heads_first(b, t, heads, name) for t, name in ((q3, "q"), (k3, "k"), (v3, "v")))
    past_len: int | None = 0
    present = None
    if past is not None:
        past_k, past_v = b.split(past, [1, 1], 0, ["past_key_5d", "past_value_5d"])
        k = b.op("Concat", [b.squeeze(past_k, [0], "past_key"), k], "present_key", axis=2)
        v = b.op("Concat", [b.squeeze(past_v, [0], "past_value"), v], "present_value", axis=2)
        past_len = (dims(past) or [None] * 4)[3]
        if used(node, 1):
            present = b.op(
                "Concat",
                [b.unsqueeze(k, [0], "present_key_5d"), b.unsqueeze(v, [0], "present_value_5d")],
                "present",
                axis=0,
            )
    x_shape = dims(x) or [None, None]
    seq = x_shape[1]
    biases = _masks(b, node, mask, attention_bias, batch=x_shape[0], seq=seq, kv=seq, past=past_len, like=qkv)
    att = attend(b, q, k, v, scale=_scale(node, sizes[0] // heads), groups=1, kv_heads=heads, biases=biases)
    return [heads_last(b, att.output, "output"), present]


def lower_multi_head_attention(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    query, key, value, bias, mask, attention_bias, past_k, past_v = (input_at(node, i) for i in range(8))
    if query is None:
        raise Refused("query is required")
    _refuse_buffer_sharing(node, 8)
    if used(node, 3):
        raise Refused("the qk output is not supported")
    if (past_k is None) != (past_v is None):
        raise Refused("past_key and past_value must be given together")
    b.float_type_of(query, key, value, bias, past_k, node.outputs[0])
    heads = attr_int(node, "num_heads", 0)
    q_shape, k_shape = dims(query), dims(key)
    if q_shape is None or (key is not None and k_shape is None):
        raise Refused("the rank of query/key is unknown")
    bq = bk = bv = None
    if bias is not None:
        width = (dims(bias) or [None])[0]
        if len(q_shape) == 5:  # packed [B,S,N,3,H]
            n, h = q_shape[2], q_shape[4]
            d_q = n * h if n is not None and h is not None else None
        else:
            d_q = q_shape[-1]
        if width is None or d_q is None:
            raise Refused("the bias or hidden width is unknown")
        bq, bk, bv = b.split(bias, [d_q, d_q, width - 2 * d_q], 0, ["bias_q", "bias_k", "bias_v"])

    new_kv = True  # key/value are new tokens (not a precomputed [B,N,L,H] cross-attention cache)
    if len(q_shape) == 5:  # packed QKV [B,S,N,3,H]
        if key is not None:
            raise Refused("packed QKV with a key input")
        q, k, v = (
            b.op("Gather", [query, b.i64(i, f"qkv_index_{i}")], f"{n}_bsnh", axis=3)
            for i, n in enumerate("qkv")
        )
        q, k, v = (
            _bsnh_to_bnsh(b, t, bb, heads, n) for t, bb, n in ((q, bq, "q"), (k, bk, "k"), (v, bv, "v"))
        )
        kv = q_shape[1]
    else:
        if bq is not None:
            query = b.op("Add", [query, bq], "q_biased")
        q = heads_first(b, query, heads, "q")
        if key is None:
            raise Refused("key is required unless query is packed QKV")
        assert k_shape is not None  # known whenever key is given (checked above)
        if len(k_shape) == 5:  # packed KV [B,L,N,2,H]
            if value is not None:
                raise Refused("packed KV with a value input")
            k, v = (
                b.op("Gather", [key, b.i64(i, f"kv_index_{i}")], f"{n}_bsnh", axis=3)
                for i, n in enumerate("kv")
            )
            k = _bsnh_to_bnsh(b, k, bk, heads, "k")
            v = _bsnh_to_bnsh(b, v, bv, heads, "v")
            kv = k_shape[1]
        elif len(k_shape) == 4:  # cross attention: key/value already [B,N,L,H]
            if value is None:
                raise Refused("4-D key needs a 4-D value")
            if bk is not None:
                raise Refused("a bias with 4-D (already projected) key/value")
            k, v, kv, new_kv = key, value, k_shape[2], False
        else:
            if value is None:
                raise Refused("value is required with a 3-D key")
            if bk is not None:
                key = b.op("Add", [key, bk], "k_biased")
                value = b.op("Add", [value, bv], "v_biased")
            k = heads_first(b, key, heads, "k")
            v = heads_first(b, value, heads, "v")
            kv = k_shape[1]
    past: int | None = 0
    present_k = present_v = None
    if past_k is not None:
        if not new_kv:
            raise Refused("past_key/past_value with 4-D key/value")
        k = present_k = b.op("Concat", [past_k, k], "present_key", axis=2)
        v = present_v = b.op("Concat", [past_v, v], "present_value", axis=2)
        past = (dims(past_k) or [None] * 3)[2]
    else:  # without a past: the keys/values in [B, N, L, H]
        present_k, present_v = k, v
    head_size = (
        q_shape[-1] // heads
        if len(q_shape) == 3 and q_shape[-1] is not None
        else (q_shape[-1] if len(q_shape) == 5 else None)
    )
    biases = _masks(b, node, mask, attention_bias, batch=q_shape[0], seq=q_shape[1], kv=kv, past=past, like=q)
    att = attend(b, q, k, v, scale=_scale(node, head_size), groups=1, kv_heads=heads, biases=biases)
    return [heads_last(b, att.output, "output"), present_k, present_v]


def _bsnh_to_bnsh(b: Builder, x: ir.Value, bias: ir.Value | None, heads: int, label: str) -> ir.Value:
    if bias is not None:
        x = b.op("Add", [x, b.reshape(bias, [heads, -1], f"bias_{label}_nh")], f"{label}_biased")
    return b.transpose(x, [0, 2, 1, 3], label)
