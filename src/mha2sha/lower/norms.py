"""Normalisations the HTP backend and ONNX shape inference do not know -> standard ONNX.

Rules:
- RMS norms (``RMSNormalization``-23, ``SimplifiedLayerNormalization``, ``com.microsoft.
  SkipSimplifiedLayerNormalization``): ``x / Sqrt(ReduceMean(x * x) + eps) * scale`` over the axes
  from ``axis`` on. With ``stash_type`` float and a lower-precision input the statistics run in
  float (``Cast`` in, ``Cast`` of the normalised tensor back, then the scale).
- Layer norms (``com.microsoft.SkipLayerNormalization``, ``LayerNormalization`` of ORT's opset-1
  schema or the ``com.microsoft`` domain): ``LayerNormalization`` from opset 17, else
  ``(x - mean) / Sqrt(var + eps) * gamma + beta`` in primitives.
- ``Skip*`` ops first add ``input + skip (+ bias)``; their 4th output is that sum, and their
  ``mean``/``inv_std_var`` outputs are lowered when something reads them.
- ``EmbedLayerNormalization``: ``Gather`` of the word / position / segment tables (positions
  ``arange(S)`` when not given), summed in that order (the 3rd output), layer-normalised; the
  ``mask_index`` output is the number of ones per mask row (int32), as the kernel counts it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mha2sha.graph import attr_float, attr_int
from mha2sha.lower._build import Builder, Refused, dims, input_at, used

__all__ = [
    "lower_embed_layer_norm",
    "lower_layer_norm",
    "lower_rms_norm",
    "lower_simplified_layer_norm",
    "lower_skip_layer_norm",
    "lower_skip_simplified_layer_norm",
]


def _axes(x: ir.Value, axis: int) -> list[int]:
    """The normalised axes ``[axis, ..., rank-1]`` (negative, so no rank is needed for axis < 0)."""
    if axis < 0:
        return list(range(axis, 0))
    shape = dims(x)
    if shape is None:
        raise Refused("a non-negative axis needs the input rank")
    return list(range(axis - len(shape), 0))


def _stash(b: Builder, x: ir.Value, stash_type: int) -> tuple[ir.Value, bool]:
    """``x`` in the statistics precision and whether it was cast (lower precision with a float stash)."""
    if stash_type == 1 and b.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return b.cast(x, ir.DataType.FLOAT, "x_float"), True
    if stash_type not in (1, int(b.dtype or ir.DataType.FLOAT)):
        raise Refused(f"stash_type {stash_type} is not supported")
    return x, False


def rms(
    b: Builder, x: ir.Value, axes: list[int], eps: float, stash_type: int = 1, label: str = ""
) -> tuple[ir.Value, ir.Value]:
    """``x / Sqrt(mean(x^2) + eps)`` and its inverse RMS (in the stash precision)."""
    p = f"{label}_" if label else ""
    xs, cast = _stash(b, x, stash_type)
    square = b.op("Mul", [xs, xs], f"{p}square")
    mean = b.reduce("ReduceMean", square, axes, f"{p}mean_square")
    eps_value = _const_like(b, eps, f"{p}epsilon", cast)
    root = b.op("Sqrt", [b.op("Add", [mean, eps_value], f"{p}mean_square_eps")], f"{p}rms")
    normalized = b.op("Div", [xs, root], f"{p}normalized")
    if cast:
        normalized = b.cast(normalized, b.dtype, f"{p}normalized_cast")  # type: ignore[arg-type]
    return normalized, root


def _const_like(b: Builder, x: float, label: str, as_float32: bool) -> ir.Value:
    if as_float32:
        return b.const(np.asarray(x, np.float32), label)
    return b.scalar(x, label)


def layer_norm(
    b: Builder,
    x: ir.Value,
    gamma: ir.Value,
    beta: ir.Value | None,
    axis: int,
    eps: float,
    stash_type: int = 1,
    label: str = "",
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """LayerNorm ``(y, mean, inv_std)``: ONNX ``LayerNormalization`` from opset 17, else primitives."""
    p = f"{label}_" if label else ""
    if b.opset >= 17:
        outs = b.op_multi(
            "LayerNormalization",
            [x, gamma, beta],
            "layer_norm",
            outputs=3,
            labels=[f"{p}layer_norm", f"{p}mean", f"{p}inv_std_var"],
            axis=axis,
            epsilon=eps,
            stash_type=stash_type,
        )
        return outs[0], outs[1], outs[2]
    axes = _axes(x, axis)
    xs, cast = _stash(b, x, stash_type)
    mean = b.reduce("ReduceMean", xs, axes, f"{p}mean")
    centered = b.op("Sub", [xs, mean], f"{p}centered")
    var = b.reduce("ReduceMean", b.op("Mul", [centered, centered], f"{p}square"), axes, f"{p}variance")
    eps_value = _const_like(b, eps, f"{p}epsilon", cast)
    std = b.op("Sqrt", [b.op("Add", [var, eps_value], f"{p}variance_eps")], f"{p}std")
    inv_std = b.op("Reciprocal", [std], f"{p}inv_std_var")
    normalized = b.op("Mul", [centered, inv_std], f"{p}normalized")
    if cast:
        normalized = b.cast(normalized, b.dtype, f"{p}normalized_cast")  # type: ignore[arg-type]
    y = b.op("Mul", [normalized, gamma], f"{p}scaled")
    if beta is not None:
        y = b.op("Add", [y, beta], f"{p}layer_norm")
    return y, mean, inv_std


def _skip_sum(b: Builder, node: ir.Node, bias: ir.Value | None) -> ir.Value:
    total = b.op("Add", [node.inputs[0], node.inputs[1]], "input_skip")
    if bias is not None:
        total = b.op("Add", [total, bias], "input_skip_bias")
    return total


def lower_rms_norm(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    """ONNX ``RMSNormalization`` (opset 23) and ORT's ``SimplifiedLayerNormalization``."""
    x, scale = node.inputs[0], node.inputs[1]
    if x is None or scale is None:
        raise Refused("X and scale are required")
    b.float_type_of(x, node.outputs[0])
    axes = _axes(x, attr_int(node, "axis", -1))
    normalized, root = rms(b, x, axes, attr_float(node, "epsilon", 1e-5), attr_int(node, "stash_type", 1))
    y = b.op("Mul", [normalized, scale], "output")
    inv = b.op("Reciprocal", [root], "inv_std_var") if used(node, 1) else None
    return [y, inv]


lower_simplified_layer_norm = lower_rms_norm


def lower_skip_simplified_layer_norm(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    x, gamma, bias = node.inputs[0], input_at(node, 2), input_at(node, 3)
    if x is None or node.inputs[1] is None or gamma is None:
        raise Refused("input, skip and gamma are required")
    b.float_type_of(x, node.outputs[0])
    total = _skip_sum(b, node, bias)
    normalized, root = rms(b, total, [-1], attr_float(node, "epsilon", 1e-12))
    y = b.op("Mul", [normalized, gamma], "output")
    inv = b.op("Reciprocal", [root], "inv_std_var") if used(node, 2) else None
    return [y, None, inv, total]


def lower_skip_layer_norm(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    x, gamma, beta, bias = node.inputs[0], input_at(node, 2), input_at(node, 3), input_at(node, 4)
    if x is None or node.inputs[1] is None or gamma is None:
        raise Refused("input, skip and gamma are required")
    b.float_type_of(x, node.outputs[0])
    total = _skip_sum(b, node, bias)
    y, mean, inv = layer_norm(b, total, gamma, beta, -1, attr_float(node, "epsilon", 1e-12))
    return [y, mean, inv, total]


def lower_layer_norm(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    """``LayerNormalization`` outside the standard (ORT's opset-1 schema, ``com.microsoft``)."""
    x, gamma, beta = node.inputs[0], node.inputs[1], input_at(node, 2)
    if x is None or gamma is None:
        raise Refused("X and Scale are required")
    b.float_type_of(x, node.outputs[0])
    y, mean, inv = layer_norm(
        b,
        x,
        gamma,
        beta,
        attr_int(node, "axis", -1),
        attr_float(node, "epsilon", 1e-5),
        attr_int(node, "stash_type", 1),
    )
    return [y, mean, inv]


def lower_embed_layer_norm(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    ids, segment_ids, words, positions_table = (input_at(node, i) for i in range(4))
    segments, gamma, beta, mask, position_ids = (input_at(node, i) for i in range(4, 9))
    if ids is None or words is None or positions_table is None or gamma is None or beta is None:
        raise Refused("input_ids, word/position embeddings, gamma and beta are required")
    b.float_type_of(words, node.outputs[0])
    total = b.op("Gather", [words, ids], "word_embedding", axis=0)
    if position_ids is None:
        seq = (dims(ids) or [None, None])[1]
        if seq is None:
            raise Refused("positions arange(S) need a static sequence length")
        position_ids = b.const(np.arange(seq, dtype=np.int64).reshape(1, seq), "position_ids")
    position = b.op("Gather", [positions_table, position_ids], "position_embedding", axis=0)
    total = b.op("Add", [total, position], "word_position")
    if segments is not None and segment_ids is not None:
        segment = b.op("Gather", [segments, segment_ids], "segment_embedding", axis=0)
        total = b.op("Add", [total, segment], "embedding_sum")
    y, _, _ = layer_norm(b, total, gamma, beta, -1, attr_float(node, "epsilon", 1e-12))
    mask_index = None
    if used(node, 1):
        if mask is None:
            raise Refused("mask_index without a mask input")
        one = b.const(np.asarray(1, dtype=(mask.dtype or ir.DataType.INT32).numpy()), "mask_one")
        ones = b.op("Equal", [mask, one], "mask_is_one", dtype=ir.DataType.BOOL)
        count = b.cast(ones, ir.DataType.INT32, "mask_ones")
        mask_index = b.reduce("ReduceSum", count, [1], "mask_index", keepdims=0)
    return [y, mask_index, total]
