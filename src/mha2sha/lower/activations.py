"""Contrib activations and bias adds -> standard ONNX.

Rules:
- ``Gelu`` / ``BiasGelu`` (erf form) and ``FastGelu`` (tanh form, optional bias): ONNX ``Gelu``
  (``approximate`` "none" / "tanh") from opset 20, else ``0.5 * x * (1 + Erf(x * 1/sqrt(2)))`` /
  ``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` in primitives.
- ``QuickGelu``: ``x * Sigmoid(alpha * x)`` (alpha 1.702 by default).
- ``BiasAdd``: ``x + bias + skip``. ``BiasSplitGelu``: ``x + bias`` split in halves on the last
  axis, ``left * Gelu(right)``.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from mha2sha.graph import attr_float
from mha2sha.lower._build import Builder, Refused, dims

__all__ = [
    "lower_bias_add",
    "lower_bias_gelu",
    "lower_bias_split_gelu",
    "lower_fast_gelu",
    "lower_gelu",
    "lower_quick_gelu",
]


def gelu(b: Builder, x: ir.Value, approximate: str, label: str) -> ir.Value:
    if b.opset >= 20:
        return b.op("Gelu", [x], label, approximate=approximate)
    half = b.scalar(0.5, f"{label}_half", like=x)
    one = b.scalar(1.0, f"{label}_one", like=x)
    if approximate == "none":
        inner = b.op(
            "Erf",
            [b.op("Mul", [x, b.scalar(1.0 / math.sqrt(2.0), f"{label}_rsqrt2", like=x)], f"{label}_scaled")],
            f"{label}_erf",
        )
    else:
        cube = b.op("Mul", [b.op("Mul", [x, x], f"{label}_square"), x], f"{label}_cube")
        poly = b.op(
            "Add",
            [x, b.op("Mul", [cube, b.scalar(0.044715, f"{label}_c", like=x)], f"{label}_cube_c")],
            f"{label}_poly",
        )
        arg = b.op(
            "Mul", [poly, b.scalar(math.sqrt(2.0 / math.pi), f"{label}_sqrt_2_pi", like=x)], f"{label}_arg"
        )
        inner = b.op("Tanh", [arg], f"{label}_tanh")
    gate = b.op("Mul", [b.op("Add", [inner, one], f"{label}_one_plus"), half], f"{label}_gate")
    return b.op("Mul", [x, gate], label)


def _x(node: ir.Node, b: Builder) -> ir.Value:
    x = node.inputs[0]
    if x is None:
        raise Refused("the input is required")
    b.float_type_of(x, node.outputs[0], *node.inputs[1:])
    return x


def _with_bias(node: ir.Node, b: Builder, x: ir.Value) -> ir.Value:
    bias = node.inputs[1] if len(node.inputs) > 1 else None
    return x if bias is None else b.op("Add", [x, bias], "biased")


def lower_gelu(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    return [gelu(b, _x(node, b), "none", "output")]


def lower_bias_gelu(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    x = _x(node, b)
    return [gelu(b, _with_bias(node, b, x), "none", "output")]


def lower_fast_gelu(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    x = _x(node, b)
    return [gelu(b, _with_bias(node, b, x), "tanh", "output")]


def lower_quick_gelu(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    x = _x(node, b)
    alpha = b.scalar(attr_float(node, "alpha", 1.702), "alpha", like=x)
    gate = b.op("Sigmoid", [b.op("Mul", [x, alpha], "alpha_x")], "sigmoid")
    return [b.op("Mul", [x, gate], "output")]


def lower_bias_add(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    x = _x(node, b)
    if len(node.inputs) < 3 or node.inputs[1] is None or node.inputs[2] is None:
        raise Refused("X, bias and skip are required")
    biased = b.op("Add", [x, node.inputs[1]], "biased")
    return [b.op("Add", [biased, node.inputs[2]], "output")]


def lower_bias_split_gelu(node: ir.Node, b: Builder) -> list[ir.Value | None]:
    x = _x(node, b)
    width = (dims(node.inputs[1]) or [None])[-1] if len(node.inputs) > 1 else None
    if width is None:
        raise Refused("the bias width is unknown")
    biased = _with_bias(node, b, x)
    left, right = b.split(biased, [width // 2, width // 2], -1, ["left", "right"])
    return [b.op("Mul", [left, gelu(b, right, "none", "gelu_right")], "output")]
