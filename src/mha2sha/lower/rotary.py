"""Rotary position embedding (ONNX ``RotaryEmbedding``-23, ``com.microsoft.RotaryEmbedding``) -> HF form.

Rules (shared with the GroupQueryAttention lowering):
- Heads are made visible first (``[B, S, H*D] -> [B, S, H, D]``; 4-D inputs are ``[B, H, S, D]``) and
  the rotation acts on the last axis only, so the split sees a per-head computation.
- ``cos``/``sin`` rows are gathered from the caches by position (``Gather(cache, position_ids)``),
  widened from ``rotary_dim / 2`` to ``rotary_dim`` columns (``[c, c]`` half-split, ``[c0, c0, c1,
  c1, ...]`` interleaved; precomputed as a shared initializer when the cache is a constant) and
  unsqueezed at the head axis.
- Half-split: ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = Concat(-x2, x1)``
  (``Slice``/``Neg``/``Concat``), the same products and sums as ``cos*x1 - sin*x2``, ``sin*x1 + cos*x2``.
- Interleaved: the pair swap ``(-x1, x0, -x3, x2, ...)`` is a MatMul with a constant signed
  permutation (exact: one nonzero term per output), so no stepped Slice is needed.
- Partial rotation (``rotary_embedding_dim < head_size``): the tail passes through a Slice/Concat.
- ``com.microsoft`` position ids of shape ``[1]`` mean ``position_ids[0] + arange(S)`` for every batch;
  its ``scale`` attribute is ignored (noted), as onnxruntime's CPU kernel ignores it.
Refused: ``is_packed_batching``, unknown cache width or input rank.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mha2sha.graph import attr_int
from mha2sha.lower._build import Builder, Refused, dims

__all__ = ["gather_rows", "lower_ms_rotary", "lower_onnx_rotary", "rotate"]

_INT64_MAX = int(np.iinfo(np.int64).max)


def _widened(half: np.ndarray, interleaved: bool) -> np.ndarray:
    return np.repeat(half, 2, axis=-1) if interleaved else np.concatenate([half, half], axis=-1)


def widen(b: Builder, table: ir.Value, interleaved: bool, label: str) -> ir.Value:
    """``[..., r/2] -> [..., r]`` columns as the rotation pairs them (shared initializer if constant)."""
    tensor = table.const_value
    if tensor is not None:
        name = f"{table.name}.{'interleaved' if interleaved else 'rotate_half'}"
        return b.derived(
            ("widen", id(table), interleaved), lambda: _widened(tensor.numpy(), interleaved), name
        )
    if not interleaved:
        return b.op("Concat", [table, table], label, axis=-1)
    half = (dims(table) or [None])[-1]
    if half is None:
        raise Refused("the width of the cos/sin cache is unknown")
    index = b.i64(list(np.repeat(np.arange(half), 2)), f"{label}_index")
    return b.op("Gather", [table, index], label, axis=-1)


def gather_rows(b: Builder, cache: ir.Value, positions: ir.Value, interleaved: bool, label: str) -> ir.Value:
    """``cache[positions]`` widened to the rotary dim: ``[max_pos, r/2] x [B, S] -> [B, S, r]``."""
    return b.op("Gather", [widen(b, cache, interleaved, f"{label}_cache"), positions], label, axis=0)


def _swap_pairs(rotary_dim: int) -> np.ndarray:
    """``x @ R`` is ``(-x1, x0, -x3, x2, ...)``: the interleaved rotate_half."""
    r = np.zeros((rotary_dim, rotary_dim), np.float32)
    for i in range(0, rotary_dim, 2):
        r[i + 1, i] = -1.0
        r[i, i + 1] = 1.0
    return r


def rotate(
    b: Builder,
    x: ir.Value,
    cos: ir.Value,
    sin: ir.Value,
    *,
    rotary_dim: int,
    head_size: int | None,
    interleaved: bool,
    label: str,
) -> ir.Value:
    """RoPE on the last axis of ``x`` (heads visible); ``cos``/``sin`` already widened to ``rotary_dim``
    and broadcastable to ``x[..., :rotary_dim]``."""
    partial = head_size is None or rotary_dim < head_size
    if partial:
        x_rot = b.slice(x, [0], [rotary_dim], [-1], f"{label}_rot_part")
        x_pass = b.slice(x, [rotary_dim], [_INT64_MAX], [-1], f"{label}_pass_part")
    else:
        x_rot = x
    if interleaved:
        dtype = b.dtype.numpy() if b.dtype is not None else np.float32
        swap = b.derived(
            ("swap_pairs", rotary_dim, str(dtype)),
            lambda: _swap_pairs(rotary_dim).astype(dtype),
            f"rope_swap_pairs_{rotary_dim}",
        )
        if b.dtype is None:
            swap = b.op("CastLike", [swap, x], f"{label}_swap_cast")
        rotated = b.op("MatMul", [x_rot, swap], f"{label}_rotated")
    else:
        half = rotary_dim // 2
        x1 = b.slice(x_rot, [0], [half], [-1], f"{label}_x1")
        x2 = b.slice(x_rot, [half], [rotary_dim], [-1], f"{label}_x2")
        rotated = b.op("Concat", [b.op("Neg", [x2], f"{label}_neg_x2"), x1], f"{label}_rotated", axis=-1)
    out = b.op(
        "Add",
        [b.op("Mul", [x_rot, cos], f"{label}_cos"), b.op("Mul", [rotated, sin], f"{label}_sin")],
        label if not partial else f"{label}_rotated_part",
    )
    if partial:
        out = b.op("Concat", [out, x_pass], label, axis=-1)
    return out


def _rotary_dim(b: Builder, cos_cache: ir.Value, attr_dim: int) -> int:
    half = (dims(cos_cache) or [None])[-1]
    if half is None:
        if attr_dim:
            return attr_dim
        raise Refused("the width of cos_cache is unknown")
    if attr_dim and attr_dim != 2 * half:
        raise Refused(f"rotary_embedding_dim {attr_dim} does not match cos_cache width {half} * 2")
    return 2 * half


def _apply(
    b: Builder,
    x: ir.Value,
    cos: ir.Value,
    sin: ir.Value,
    *,
    num_heads: int,
    rotary_dim: int,
    interleaved: bool,
) -> ir.Value:
    """Rotate a ``[B, H, S, D]`` or ``[B, S, H*D]`` input; ``cos``/``sin`` are ``[B|1, S, r]``."""
    shape = dims(x)
    if shape is None:
        raise Refused("the rank of the input is unknown")
    if len(shape) == 4:
        cos4 = b.unsqueeze(cos, [1], "cos_b1sr")
        sin4 = b.unsqueeze(sin, [1], "sin_b1sr")
        head_size = shape[3]
        return rotate(
            b,
            x,
            cos4,
            sin4,
            rotary_dim=rotary_dim,
            head_size=head_size,
            interleaved=interleaved,
            label="rope",
        )
    if len(shape) != 3:
        raise Refused(f"input of rank {len(shape)}")
    if num_heads:
        x4 = b.reshape(x, [0, 0, num_heads, -1], "x_bshd")
        head_size = shape[2] // num_heads if shape[2] is not None else None
    else:  # full rotation: the head size is the rotary dim
        x4 = b.reshape(x, [0, 0, -1, rotary_dim], "x_bshd")
        head_size = rotary_dim
    cos4 = b.unsqueeze(cos, [2], "cos_bs1r")
    sin4 = b.unsqueeze(sin, [2], "sin_bs1r")
    y4 = rotate(
        b, x4, cos4, sin4, rotary_dim=rotary_dim, head_size=head_size, interleaved=interleaved, label="rope"
    )
    return b.reshape(y4, [0, 0, -1], "output")


def lower_onnx_rotary(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    x, cos_cache, sin_cache = node.inputs[0], node.inputs[1], node.inputs[2]
    positions = node.inputs[3] if len(node.inputs) > 3 else None
    if x is None or cos_cache is None or sin_cache is None:
        raise Refused("input, cos_cache and sin_cache are required")
    b.float_type_of(x, cos_cache, node.outputs[0])
    interleaved = attr_int(node, "interleaved", 0) == 1
    rotary_dim = _rotary_dim(b, cos_cache, attr_int(node, "rotary_embedding_dim", 0))
    if positions is not None:
        cos = gather_rows(b, cos_cache, positions, interleaved, "cos")
        sin = gather_rows(b, sin_cache, positions, interleaved, "sin")
    else:  # caches already per position: [B, S, r/2]
        cos = widen(b, cos_cache, interleaved, "cos")
        sin = widen(b, sin_cache, interleaved, "sin")
    y = _apply(
        b,
        x,
        cos,
        sin,
        num_heads=attr_int(node, "num_heads", 0),
        rotary_dim=rotary_dim,
        interleaved=interleaved,
    )
    return [y]


def lower_ms_rotary(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    x, positions, cos_cache, sin_cache = (node.inputs[i] for i in range(4))
    if x is None or positions is None or cos_cache is None or sin_cache is None:
        raise Refused("input, position_ids, cos_cache and sin_cache are required")
    if attr_int(node, "is_packed_batching", 0):
        raise Refused("is_packed_batching (ragged batches) is not supported")
    scale = node.attributes.get("scale")
    if scale is not None and scale.as_float() != 1.0:
        b.notes.append("scale ignored: onnxruntime's CPU kernel does not apply it")
    b.float_type_of(x, cos_cache, node.outputs[0])
    interleaved = attr_int(node, "interleaved", 0) == 1
    rotary_dim = _rotary_dim(b, cos_cache, attr_int(node, "rotary_embedding_dim", 0))
    pos_shape = dims(positions)
    if pos_shape is None:
        raise Refused("the rank of position_ids is unknown")
    if len(pos_shape) == 1:  # [1]: an offset, positions offset + arange(S) for every batch
        x_shape = dims(x) or []
        seq = x_shape[2] if len(x_shape) == 4 else (x_shape[1] if len(x_shape) == 3 else None)
        if seq is None:
            raise Refused("position_ids of shape [1] need a static sequence length")
        steps = b.const(np.arange(seq, dtype=np.int64).reshape(1, seq), "positions_arange")
        if positions.dtype not in (None, ir.DataType.INT64):
            positions = b.cast(positions, ir.DataType.INT64, "position_offset")
        positions = b.op("Add", [b.reshape(positions, [1, 1], "position_offset_11"), steps], "positions")
    cos = gather_rows(b, cos_cache, positions, interleaved, "cos")
    sin = gather_rows(b, sin_cache, positions, interleaved, "sin")
    y = _apply(
        b,
        x,
        cos,
        sin,
        num_heads=attr_int(node, "num_heads", 0),
        rotary_dim=rotary_dim,
        interleaved=interleaved,
    )
    return [y]
