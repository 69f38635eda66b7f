"""The op vocabulary every stage shares: which ops do what, and how to read a node or a value.

Knowledge about ONNX ops lives here once (it used to be 7 lists in 6 files that drifted apart):
a stage asks ``is_op(node, ...)`` / ``node.op_type in DATA_MOVEMENT_OPS`` instead of keeping its
own list. What one stage does *with* an op (the split's per-head rule, a layout move) stays with
that stage; what an op *is* is written here. This module imports nothing of the project, so every
folder can depend on it without cycles.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

__all__ = [
    "BROADCAST_OPS",
    "DATA_MOVEMENT_OPS",
    "ELEMENTWISE_OPS",
    "FUSED_ATTENTION_OPS",
    "LAYOUT_OPS",
    "NONDETERMINISTIC_OPS",
    "RESHAPE_OPS",
    "UNARY_OPS",
    "attr_float",
    "attr_int",
    "attr_ints",
    "const_array",
    "const_ints",
    "is_onnx_domain",
    "is_op",
    "name_of",
    "static_shape",
]

#: Ops whose inputs broadcast against each other (numpy rules) and whose output element depends
#: only on the same-index input elements.
BROADCAST_OPS = frozenset(
    (
        "Add Sub Mul Div Pow Where Max Min Sum Mean Equal Less LessOrEqual Greater GreaterOrEqual And Or Xor "
        "Mod PRelu BitShift"
    ).split()
)

#: Element-wise ops of one data input (input 0); other inputs are parameters (Clip bounds,
#: Dropout ratio, CastLike's type donor).
UNARY_OPS = frozenset(
    (
        "Neg Sqrt Tanh Exp Log Cast CastLike Relu Sigmoid Erf Reciprocal Identity Abs Sin Cos Floor Ceil "
        "Round Sign Not IsNaN IsInf Gelu Softplus Softsign Elu LeakyRelu HardSigmoid HardSwish Clip Dropout "
        "Selu Celu Mish ThresholdedRelu"
    ).split()
)

#: Every op that computes each output element from the same-index elements of its inputs.
ELEMENTWISE_OPS = BROADCAST_OPS | UNARY_OPS

#: Ops that only re-index their input (each output element is one input element, one to one).
RESHAPE_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten"})
LAYOUT_OPS = RESHAPE_OPS | {"Transpose", "Identity"}

#: Ops that only move or repeat values: the output lies on the input's quantization grid, so it
#: carries the input's encoding (data movement inherits, DESIGN.md section 3).
DATA_MOVEMENT_OPS = LAYOUT_OPS | {"Expand", "Tile"}

#: Fused attention ops (ONNX opset 23+ and onnxruntime contrib): the lowering stage rewrites them
#: into primitives; any left afterwards are reported as multi-head blocks, never ignored.
FUSED_ATTENTION_OPS = frozenset(
    {
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "PackedMultiHeadAttention",
        "PackedAttention",
        "DecoderMaskedMultiHeadAttention",
        "DecoderMaskedSelfAttention",
        "SparseAttention",
    }
)

#: Ops whose outputs differ between runs: never folded into constants.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


def is_onnx_domain(domain: str) -> bool:
    return domain in ("", "ai.onnx")


def is_op(node: ir.Node | None, *op_types: str | Iterable[str]) -> bool:
    """``node`` is one of ``op_types`` (names or sets of names) in the default ONNX domain."""
    if node is None or not is_onnx_domain(node.domain):
        return False
    return any(node.op_type == kind if isinstance(kind, str) else node.op_type in kind for kind in op_types)


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(x) for x in attr.as_ints()]


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (initializer or folded), else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def const_ints(value: ir.Value | None) -> list[int] | None:
    """A constant integer tensor as a flat list, else None."""
    array = const_array(value)
    return None if array is None else [int(x) for x in np.asarray(array).reshape(-1)]


def name_of(value: ir.Value) -> str:
    """The name of a value a graph holds. onnx_ir names every value added to a graph (and a loaded
    model's values carry their proto names), so only a detached, never-named value has none."""
    assert value.name is not None, "a graph value without a name"
    return value.name


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape as ints, or None when unknown or symbolic (a constant's own shape counts)."""
    if value is None:
        return None
    shape: ir.ShapeProtocol | None = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    if shape is None:
        return None
    dims = tuple(shape)
    ints = tuple(int(d) for d in dims if isinstance(d, int))
    return ints if len(ints) == len(dims) else None
