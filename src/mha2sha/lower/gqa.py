"""``com.microsoft.GroupQueryAttention`` -> primitive attention with the KV-cache contract kept.

What onnxruntime's CPU kernel computes, per batch ``b`` (``S`` new tokens, ``P`` past entries):
the new tokens sit at absolute positions ``ps_b + s`` with ``ps_b = max(seqlens_k[b] + 1 - S, 0)``
(0 for a first prompt); ``present`` (length ``max(P, total_sequence_length)``) holds
``past[:ps_b]``, then the ``S`` new keys/values, then zeros; query ``s`` attends the keys at
absolute positions ``<= ps_b + s`` (and ``> ps_b + s - local_window_size``), or all of them with
``causal=0``. With ``sliding_window_cache`` the past is a window cache of capacity ``C = P``: it
holds ``R = L(ps_b)`` rows, the ``R`` most recent positions, and ``present`` (length ``C``) the
``L(ps_b + S)`` most recent ones, ``L(T) = T`` while ``T <= C``, else ``T - G * ceil((T - C) / G)``
with ``G = C - local_window_size + 1``; its other rows are unspecified (here 0).

Rules:
- Q/K/V (or one packed QKV, split by width) are projected into heads ``[B, N, S, H]``; with
  ``do_rotary`` Q and K are rotated by :func:`~mha2sha.lower.rotary.rotate` with cos/sin rows
  gathered at the positions above.
- Attention runs over ``Concat(past, new)`` (the cache concat the split keeps whole) with a bias
  that admits exactly the keys above: past entry ``j`` iff ``j < R`` (``R = ps_b`` without a window
  cache; and in the window), new entry ``t`` iff ``t <= s`` (and in the window); the lowest float
  elsewhere. That is the kernel's
  key set in another order. KV heads are repeated for the query heads (``repeat_kv``).
- ``present`` is gathered from the same Concat into the kernel's layout (``GatherElements`` +
  ``Where``); with no past input it is the new keys/values themselves.
- Known positions: when the graph fixes ``ps`` -- ``seqlens_k`` a constant, or batch 1 with a static
  ``total_sequence_length`` (genai's ``Shape(attention_mask)[1]``; the op defines the total as the
  batch's longest ``seqlens_k + 1``, so one row has ``seqlens_k = total - 1``) -- nothing above is
  computed at run time: RoPE positions and the bias are constants, and ``present`` is slices of the
  Concat (plus zero rows), i.e. ``Concat(past, new)`` itself for a full cache (``ps = P``, present
  length ``P + S``). No int64 index math, ``GatherElements`` or ``Where`` is left for HTP; the mask
  input is then not read (a batch-1 mask with zeros contradicts the op's definition of the total).
- ``softcap``, ``scale``, ``smooth_softmax`` (a zero-logit sink) and ``head_sink`` (per-head sink
  logits) as in :func:`~mha2sha.lower._sdpa.attend`.
- The present length is the kernel's ``max(P, total_sequence_length)`` when the total is static
  (genai computes it as ``Shape(attention_mask)[1]``), else the present output's static length,
  else ``P + S``. A past buffer longer than the total (a shared past/present buffer) thus gives a
  present of the past's length, new entries written at ``ps_b``.
Refused: ``position_ids``, ``attention_bias``, quantized caches, ``q_norm_weight``/``k_norm_weight``
(not run on CPU), ``query_seqlens``, the ``output_qk`` output.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx_ir as ir

from mha2sha.graph import attr_float, attr_int
from mha2sha.lower._build import Builder, Refused, dims, input_at, static_dims, used
from mha2sha.lower._sdpa import attend, heads_first, heads_last
from mha2sha.lower.rotary import gather_rows, rotate

__all__ = ["lower_group_query_attention"]

_UNSUPPORTED_INPUTS = {
    9: "position_ids",
    10: "attention_bias",
    12: "k_scale (quantized KV cache)",
    13: "v_scale (quantized KV cache)",
    14: "q_norm_weight (not run by onnxruntime's CPU kernel)",
    15: "k_norm_weight (not run by onnxruntime's CPU kernel)",
    16: "query_seqlens",
}


def _check(node: ir.Node) -> None:
    for i, what in _UNSUPPORTED_INPUTS.items():
        if input_at(node, i) is not None:
            raise Refused(f"{what} is not supported")
    for attr in ("k_quant_type", "v_quant_type"):
        value = node.attributes.get(attr)
        if value is not None and value.as_string() not in ("", "NONE"):
            raise Refused(f"{attr} {value.as_string()} (quantized KV cache) is not supported")
    if attr_int(node, "sliding_window_cache", 0) and attr_int(node, "local_window_size", -1) <= 0:
        raise Refused("sliding_window_cache without a local_window_size")
    if used(node, 3):
        raise Refused("the output_qk output is not supported")
    if attr_int(node, "causal", 1) == 0 and attr_int(node, "local_window_size", -1) > 0:
        raise Refused("local_window_size with causal=0")


def lower_group_query_attention(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    _check(node)
    query, key, value, past_k, past_v, seqlens_k = (input_at(node, i) for i in range(6))
    cos_cache, sin_cache, head_sink = input_at(node, 7), input_at(node, 8), input_at(node, 11)
    if query is None or seqlens_k is None:
        raise Refused("query and seqlens_k are required")
    if (past_k is None) != (past_v is None):
        raise Refused("past_key and past_value must be given together")
    if past_k is not None and past_k.dtype not in (
        None,
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.BFLOAT16,
    ):
        raise Refused(f"a {past_k.dtype} KV cache (quantized) is not supported")
    b.float_type_of(query, key, value, past_k, cos_cache, node.outputs[0])
    heads, kv_heads = attr_int(node, "num_heads", 0), attr_int(node, "kv_num_heads", 0)
    if not heads or not kv_heads or heads % kv_heads:
        raise Refused(f"num_heads {heads} must be a multiple of kv_num_heads {kv_heads}")
    q_shape = static_dims(query)
    if q_shape is None or len(q_shape) != 3:
        raise Refused("GroupQueryAttention needs a static [B, S, D] query (fix the input shapes first)")
    batch, seq, width = q_shape
    packed = key is None
    size = width // (heads + 2 * kv_heads) if packed else width // heads
    if packed:
        query, key, value = b.split(
            query, [heads * size, kv_heads * size, kv_heads * size], -1, ["q_proj", "k_proj", "v_proj"]
        )
    elif value is None:
        raise Refused("key and value must be given together")
    assert key is not None and value is not None
    q = heads_first(b, query, heads, "q")
    k = heads_first(b, key, kv_heads, "k")
    v = heads_first(b, value, kv_heads, "v")

    past = 0
    if past_k is not None:
        p_shape = dims(past_k)
        past_dim = p_shape[2] if p_shape is not None and len(p_shape) == 4 else None
        if past_dim is None:
            raise Refused("the past length must be static")
        past = past_dim
    sliding = attr_int(node, "sliding_window_cache", 0) == 1
    if sliding and past < attr_int(node, "local_window_size", -1):
        raise Refused(f"a window cache of capacity {past} below local_window_size")
    present_len = past if sliding else _present_length(node, b, past, seq)
    if sliding and any(d not in (None, past) for d in _declared_lengths(node)):
        raise Refused(f"a sliding-window cache's present must be as long as its past ({past})")
    window = attr_int(node, "local_window_size", -1)
    known = _known_past_lengths(node, b, seqlens_k, batch, seq, past, sliding) if past else None
    ps = positions = None
    # resident rows of the cache before and after the step (the eviction layout with a window cache)
    resident = resident_after = None
    rows: tuple[np.ndarray, np.ndarray] | None = None  # (resident, resident_after) known from the graph
    if known is not None:  # every position is a constant: no index math in the graph
        b.notes.append(
            f"new entries at {known.tolist()} known from the graph (seqlens_k not read): RoPE positions, mask and"
            " present layout are constants"
        )
        after = known + seq
        rows = (
            (_window_rows(known, past, window), _window_rows(after, past, window))
            if sliding
            else (known, after)
        )
        positions = b.const((known.reshape(-1, 1) + np.arange(seq)).astype(np.int64), "positions")
    elif past:
        ps = _past_lengths(b, seqlens_k, seq)
        if sliding:
            resident = _window_resident(b, ps, past, window, "resident_before")
            after_v = b.op("Add", [ps, b.i64([seq], "seq_len")], "total_lengths")
            resident_after = _window_resident(b, after_v, past, window, "resident_after")
        else:
            resident = ps
            resident_after = b.op("Add", [ps, b.i64([seq], "seq_len")], "present_end")

    if attr_int(node, "do_rotary", 0):
        if cos_cache is None or sin_cache is None:
            raise Refused("do_rotary needs cos_cache and sin_cache")
        steps = b.const(np.arange(seq, dtype=np.int64).reshape(1, seq), "token_offsets")
        if positions is None:
            positions = steps if ps is None else b.op("Add", [ps, steps], "positions")
        q, k = _rope(b, node, q, k, cos_cache, sin_cache, positions, size)

    if past:
        k_all = b.op("Concat", [past_k, k], "key_cache", axis=2)
        v_all = b.op("Concat", [past_v, v], "value_cache", axis=2)
    else:
        k_all, v_all = k, v
    if rows is not None:
        bias = _known_bias(b, node, rows[0], batch, seq, past, like=q)
    else:
        bias = _bias(b, node, resident, batch, seq, past, like=q)
    sink = None
    if head_sink is not None:
        sink = b.reshape(head_sink, [1, heads, 1, 1], "head_sink_1h11")
    elif attr_int(node, "smooth_softmax", -1) == 1:
        sink = b.scalar(0.0, "smooth_softmax_sink", like=q)
        sink = b.reshape(sink, [1, 1, 1, 1], "smooth_softmax_sink_4d")
    scale = attr_float(node, "scale", 0.0) or float(np.float32(1.0 / math.sqrt(size)))
    att = attend(
        b,
        q,
        k_all,
        v_all,
        scale=scale,
        groups=heads // kv_heads,
        kv_heads=kv_heads,
        softcap=attr_float(node, "softcap", 0.0),
        biases=[bias] if bias is not None else [],
        sink=sink,
        sink_dims=(batch, heads, seq, size),
    )
    y = heads_last(b, att.output, "output")
    present = None
    if rows is not None:
        present = _known_present(b, k_all, v_all, *rows, batch, kv_heads, past, seq, size, present_len)
        if present is None:  # batch rows laid out differently: the general gather, on constant rows
            resident = b.const(rows[0].reshape(-1, 1), "resident_rows")
            resident_after = b.const(rows[1].reshape(-1, 1), "present_end_rows")
    if present is not None:
        present_k, present_v = present
    elif past:
        present_k, present_v = _present(
            b, k_all, v_all, resident, resident_after, batch, kv_heads, past, seq, size, present_len
        )
    else:
        if present_len != seq:
            raise Refused(f"present length {present_len} without a past input")
        present_k, present_v = k, v
    return [y, present_k, present_v]


def _declared_lengths(node: ir.Node) -> set[int]:
    return {
        shape[2]
        for shape in (dims(o) for o in node.outputs[1:3])
        if shape is not None and len(shape) == 4 and shape[2] is not None
    }


def _window_resident(b: Builder, total: ir.Value, capacity: int, window: int, label: str) -> ir.Value:
    """Rows a window cache of ``capacity`` holds after ``total`` tokens: ``T`` while it fits, else
    ``T - G * ceil((T - C) / G)`` with ``G = C - W + 1`` (evicting ``G`` positions at once)."""
    g = capacity - window + 1
    over = b.op("Sub", [total, b.i64([capacity - g + 1], f"{label}_c_minus_g_plus_1")], f"{label}_over")
    steps = b.op("Div", [over, b.i64([g], f"{label}_g")], f"{label}_evictions")  # ceil((T-C)/G) for T > C
    evicted = b.op(
        "Sub", [total, b.op("Mul", [steps, b.i64([g], f"{label}_g")], f"{label}_evicted")], f"{label}_kept"
    )
    fits = b.less_equal(total, b.i64([capacity], f"{label}_capacity"), f"{label}_fits")
    return b.op("Where", [fits, total, evicted], label)


def _present_length(node: ir.Node, b: Builder, past: int, seq: int) -> int:
    """The kernel's present length ``max(P, total_sequence_length)``: from the total when its value
    is static (e.g. ``Shape(attention_mask)[1]``), else from a static present output, else ``P + S``."""
    declared = _declared_lengths(node)
    total = b.ctx.infer.data(input_at(node, 6))
    if total is not None:
        length = max(past, int(np.asarray(total).reshape(-1)[0]))
        if declared and declared != {length}:
            raise Refused(f"present length {sorted(declared)} != max(past, total_sequence_length) = {length}")
        return length
    if len(declared) > 1:
        raise Refused(f"present key and value lengths differ: {sorted(declared)}")
    return declared.pop() if declared else past + seq


def _known_past_lengths(
    node: ir.Node, b: Builder, seqlens_k: ir.Value, batch: int, seq: int, past: int, sliding: bool
) -> np.ndarray | None:
    """``ps_b`` ``[B]`` when the graph fixes it, else None (it is then computed in the graph).

    Known when ``seqlens_k`` is a constant, or with batch 1 and a static ``total_sequence_length``
    (genai: ``Shape(attention_mask)[1]``): the op defines the total as the batch's longest
    ``seqlens_k + 1``, so with one row ``seqlens_k[0] = total - 1`` and ``ps = total - S``. (A batch-1
    mask with zeros contradicts that definition; the kernel would then write the new entries
    earlier.) Without a window cache ``ps`` must lie within the past buffer.
    """
    lens = b.ctx.infer.data(seqlens_k)
    if lens is None and batch == 1:
        total = b.ctx.infer.data(input_at(node, 6))
        if total is not None and np.size(total) == 1:
            lens = np.asarray(total, np.int64).reshape(1) - 1
    if lens is None or np.size(lens) != batch:
        return None
    ps = np.maximum(np.asarray(lens, np.int64).reshape(batch) + 1 - seq, 0)
    if not sliding and (ps > past).any():
        return None  # beyond the buffer: the kernel's clipped gather decides
    return ps


def _window_rows(total: np.ndarray, capacity: int, window: int) -> np.ndarray:
    """:func:`_window_resident` on known totals."""
    g = capacity - window + 1
    evicted = total - g * -(-(total - capacity) // g)
    return np.where(total <= capacity, total, evicted)


def _past_lengths(b: Builder, seqlens_k: ir.Value, seq: int) -> ir.Value:
    """``ps_b = max(seqlens_k[b] + 1 - S, 0)`` as int64 ``[B, 1]``: where the new tokens go."""
    lens = b.cast(seqlens_k, ir.DataType.INT64, "seqlens_k_i64")
    shifted = b.op("Add", [lens, b.i64([1 - seq], "one_minus_seq")], "past_lengths_raw")
    clipped = b.op("Max", [shifted, b.i64([0], "zero")], "past_lengths_1d")
    return b.reshape(clipped, [-1, 1], "past_lengths")


def _rope(
    b: Builder,
    node: ir.Node,
    q: ir.Value,
    k: ir.Value,
    cos_cache: ir.Value,
    sin_cache: ir.Value,
    positions: ir.Value,
    size: int,
) -> tuple[ir.Value, ir.Value]:
    """Q and K rotated by the cos/sin rows at ``positions`` ``[B or 1, S]``."""
    half = (dims(cos_cache) or [None])[-1]
    if half is None:
        raise Refused("the width of cos_cache is unknown")
    interleaved = attr_int(node, "rotary_interleaved", 0) == 1
    cos = b.unsqueeze(gather_rows(b, cos_cache, positions, interleaved, "cos"), [1], "cos_b1sr")
    sin = b.unsqueeze(gather_rows(b, sin_cache, positions, interleaved, "sin"), [1], "sin_b1sr")
    rope = functools.partial(rotate, rotary_dim=2 * half, head_size=size, interleaved=interleaved)
    return rope(b, q, cos, sin, label="q_rope"), rope(b, k, cos, sin, label="k_rope")


def _bias(
    b: Builder, node: ir.Node, resident: ir.Value | None, batch: int, seq: int, past: int, like: ir.Value
) -> ir.Value | None:
    """Additive bias over ``Concat(past, new)`` admitting the kernel's keys: past row ``j`` (absolute
    position ``T - S - R + j`` with ``R`` resident rows) iff ``j < R`` and in the window, new token
    ``t`` iff ``t <= s`` and in the window (``R = ps`` without a window cache)."""
    window = attr_int(node, "local_window_size", -1)
    s_idx = np.arange(seq).reshape(seq, 1)
    new_keep = _new_keep(node, seq)
    if not past:
        return _constant_bias(b, new_keep.reshape(1, 1, seq, seq), like)
    assert resident is not None
    ps4 = b.reshape(resident, [-1, 1, 1, 1], "resident_b111")
    j = b.const(np.arange(past, dtype=np.int64).reshape(1, 1, 1, past), "past_positions")
    past_keep = b.op("Less", [j, ps4], "past_valid", dtype=ir.DataType.BOOL)  # [B,1,1,P]
    if window > 0:  # query s at T - S + s: key j - R > s - window
        lower = b.op(
            "Add",
            [ps4, b.const((s_idx - window).reshape(1, 1, seq, 1).astype(np.int64), "window_offsets")],
            "window_lower",
        )
        in_window = b.op("Greater", [j, lower], "past_in_window", dtype=ir.DataType.BOOL)  # [B,1,S,P]
        past_keep = b.op("And", [past_keep, in_window], "past_keep", dtype=ir.DataType.BOOL)
    past_keep = b.op("Expand", [past_keep, b.i64([batch, 1, seq, past], "past_keep_shape")], "past_keep_bsp")
    new_table = b.const(np.broadcast_to(new_keep, (batch, 1, seq, seq)).copy(), "new_keep")
    keep = b.op("Concat", [past_keep, new_table], "key_keep", axis=-1, dtype=ir.DataType.BOOL)
    zero = b.scalar(0.0, "mask_zero", like=like)
    return b.op("Where", [keep, zero, b.lowest("mask_lowest", like=like)], "attn_bias")


def _new_keep(node: ir.Node, seq: int) -> np.ndarray:
    """``[S, S]``: new token ``t`` is visible to query ``s`` (causal, local window)."""
    s_idx = np.arange(seq).reshape(seq, 1)
    t_idx = np.arange(seq).reshape(1, seq)
    keep = np.ones((seq, seq), bool)
    if attr_int(node, "causal", 1) == 1:
        keep &= t_idx <= s_idx
    window = attr_int(node, "local_window_size", -1)
    if window > 0:
        keep &= t_idx > s_idx - window
    return keep


def _constant_bias(b: Builder, keep: np.ndarray, like: ir.Value) -> ir.Value | None:
    """The additive bias of a known key set: 0 where kept, the lowest float elsewhere (None: all kept)."""
    if keep.all():
        return None
    dtype = b.dtype.numpy() if b.dtype is not None else np.float32
    table = np.where(keep, 0, np.finfo(dtype).min).astype(dtype)
    return (
        b.const(table, "causal_bias")
        if b.dtype is not None
        else b.op("CastLike", [b.const(table, "causal_bias_f32"), like], "causal_bias")
    )


def _known_bias(
    b: Builder, node: ir.Node, resident: np.ndarray, batch: int, seq: int, past: int, like: ir.Value
) -> ir.Value | None:
    """:func:`_bias` with the resident rows known: the same key set as a constant table."""
    window = attr_int(node, "local_window_size", -1)
    s_idx = np.arange(seq).reshape(1, 1, seq, 1)
    j = np.arange(past).reshape(1, 1, 1, past)
    r = resident.reshape(-1, 1, 1, 1)
    past_keep = j < r
    if window > 0:
        past_keep = past_keep & (j > r + s_idx - window)
    keep = np.concatenate(
        [
            np.broadcast_to(past_keep, (batch, 1, seq, past)),
            np.broadcast_to(_new_keep(node, seq), (batch, 1, seq, seq)),
        ],
        axis=-1,
    )
    if (keep == keep[:1]).all():
        keep = keep[:1]
    return _constant_bias(b, keep, like)


def _known_present(
    b: Builder,
    k_all: ir.Value,
    v_all: ir.Value,
    resident: np.ndarray,
    resident_after: np.ndarray,
    batch: int,
    kv_heads: int,
    past: int,
    seq: int,
    size: int,
    length: int,
) -> tuple[ir.Value, ir.Value] | None:
    """:func:`_present` with the rows known: slices of ``Concat(past, new)`` and zero rows, joined;
    ``Concat(past, new)`` itself when that is the layout (a full cache: ``R = P``, ``L = P + S``).
    None when the batch rows differ (the gather is needed then)."""
    r = np.arange(length).reshape(1, length)
    first_new = resident_after.reshape(-1, 1) - seq
    offset = r - first_new
    index = np.clip(
        np.where(r < first_new, offset + resident.reshape(-1, 1), offset + past), 0, past + seq - 1
    )
    valid = r < resident_after.reshape(-1, 1)  # a prefix of the rows
    if not ((index == index[:1]).all() and (valid == valid[:1]).all()):
        return None
    used = int(valid[0].sum())
    runs: list[list[int]] = []  # [start, stop) of consecutive cache rows
    for i in index[0, :used].tolist():
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    if used == length == past + seq and runs == [[0, past + seq]]:
        return k_all, v_all
    outs = []
    for cache, name in ((k_all, "present_key"), (v_all, "present_value")):
        pieces = [b.slice(cache, [start], [stop], [2], f"{name}_rows_{start}_{stop}") for start, stop in runs]
        if used < length:
            zeros = np.zeros((batch, kv_heads, length - used, size), np.float32)
            pieces.append(
                b.const(zeros.astype(b.dtype.numpy()), f"{name}_empty_rows")
                if b.dtype is not None
                else b.op("CastLike", [b.const(zeros, f"{name}_empty_rows_f32"), cache], f"{name}_empty_rows")
            )
        outs.append(pieces[0] if len(pieces) == 1 else b.op("Concat", pieces, name, axis=2))
    return outs[0], outs[1]


def _present(
    b: Builder,
    k_all: ir.Value,
    v_all: ir.Value,
    resident: ir.Value | None,
    resident_after: ir.Value | None,
    batch: int,
    kv_heads: int,
    past: int,
    seq: int,
    size: int,
    length: int,
) -> tuple[ir.Value, ir.Value]:
    """The kernel's present layout gathered from ``Concat(past, new)``: rows ``[0, L)`` hold the ``L``
    most recent positions (``L - S`` from the ``R`` resident past rows, then the new tokens), the rest
    is 0. Without a window cache ``R = ps`` and ``L = ps + S``: ``past[:ps]``, the new tokens, zeros."""
    assert resident is not None and resident_after is not None
    r = b.const(np.arange(length, dtype=np.int64).reshape(1, length), "present_positions")
    first_new = b.op("Sub", [resident_after, b.i64([seq], "seq_len")], "present_first_new")
    offset = b.op("Sub", [r, first_new], "present_offset")  # row - first new row
    from_past = b.op("Less", [r, first_new], "present_from_past", dtype=ir.DataType.BOOL)
    past_index = b.op("Add", [offset, resident], "present_past_index")
    new_index = b.op("Add", [offset, b.i64([past], "past_len")], "present_new_index")
    index = b.op("Where", [from_past, past_index, new_index], "present_index_raw")
    index = b.op("Max", [index, b.i64([0], "zero")], "present_index_low")
    index = b.op("Min", [index, b.i64([past + seq - 1], "cache_last")], "present_index")
    valid = b.op("Less", [r, resident_after], "present_valid", dtype=ir.DataType.BOOL)
    index4 = b.op(
        "Expand",
        [
            b.reshape(index, [batch, 1, length, 1], "present_index_4d"),
            b.i64([batch, kv_heads, length, size], "present_shape"),
        ],
        "present_gather_index",
    )
    valid4 = b.reshape(valid, [batch, 1, length, 1], "present_valid_4d")
    zero = b.scalar(0.0, "present_zero", like=k_all)
    outs = []
    for cache, name in ((k_all, "present_key"), (v_all, "present_value")):
        gathered = b.op("GatherElements", [cache, index4], f"{name}_gathered", axis=2)
        outs.append(b.op("Where", [valid4, gathered, zero], name))
    return outs[0], outs[1]
