"""Channel / block axes of weights, from how the model consumes them.

0.6.1 and 1.0.0 files do not record the per-channel axis: it is "the output channel", which
depends on the consuming op. These are AIMET's rules (``QuantizationSimModel._get_quantization_axes``):
Conv ``W[out,in,...]`` -> (0, 1); ConvTranspose ``W[in,out,...]`` -> (1, 0); Gemm ``B`` -> (0, 1)
with ``transB=1`` else (1, 0); MatMul ``B[..., in, out]`` -> (-1, -2). A weight reaching its
consumer through one Transpose gets the axis mapped back through the permutation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TypeAlias

import onnx
import onnx_ir as ir

from mha2sha.encodings.model import EncodingSet
from mha2sha.errors import UserError
from mha2sha.graph import is_onnx_domain, is_op, static_shape
from mha2sha.io.names import graphs

__all__ = [
    "ModelLike",
    "as_ir_model",
    "channel_axes",
    "consumer_axes",
    "initializer_names",
    "resolve_axes",
    "tensor_shapes",
]

logger = logging.getLogger(__name__)

AxisPair = tuple[int, int | None]

#: What the functions taking "a model" accept: an onnx_ir model, a proto, or the path of a file.
ModelLike: TypeAlias = ir.Model | onnx.ModelProto | str | os.PathLike[str]


def as_ir_model(model: ModelLike) -> ir.Model:
    """Accept an ``onnx_ir.Model``, an ``onnx.ModelProto`` or a path."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        return ir.load(os.fspath(model))
    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    raise TypeError(f"expected onnx_ir.Model, onnx.ModelProto or a path, got {type(model).__name__}")


def initializer_names(model: ModelLike) -> set[str]:
    """Names of every initializer and Constant output (all graphs): AIMET's "parameters" in 2.x."""
    model = as_ir_model(model)
    names: set[str] = set()
    for g in graphs(model):
        names.update(n for n in g.initializers if n)
    for node in model.graph.all_nodes():
        if is_op(node, "Constant"):
            names.update(o.name for o in node.outputs if o.name)
    return names


def consumer_axes(node: ir.Node, index: int, rank: int) -> AxisPair | None:
    """(output-channel axis, input-channel axis) of input ``index`` of ``node`` when it is a weight."""
    op = node.op_type
    if not is_onnx_domain(node.domain):
        return None
    if op == "Conv" and index == 1:
        return (0, 1)
    if op == "ConvTranspose" and index == 1:
        return (1, 0)
    if op in ("Conv", "ConvTranspose", "Gemm") and index == 2:
        return (0, None) if rank == 1 else None
    if op == "Gemm" and index == 1:
        trans = node.attributes.get("transB")
        return (0, 1) if trans is not None and trans.as_int() else (1, 0)
    if op == "MatMul" and index == 1 and rank >= 2:
        return (rank - 1, rank - 2)
    return None


def channel_axes(model: ModelLike) -> dict[str, AxisPair]:
    """``{weight name: (channel axis, block axis)}`` for every weight whose consumer fixes it."""
    model = as_ir_model(model)
    out: dict[str, AxisPair] = {}
    for g in graphs(model):
        for name, value in g.initializers.items():
            shape: ir.ShapeProtocol | None = value.shape
            if shape is None and value.const_value is not None:
                shape = value.const_value.shape
            if shape is None:
                continue
            rank = len(shape)
            for consumer, idx in value.uses():
                axes = consumer_axes(consumer, idx, rank)
                if axes is None and consumer.op_type == "Transpose" and consumer.outputs[0].uses():
                    perm_attr = consumer.attributes.get("perm")
                    perm = list(perm_attr.as_ints()) if perm_attr is not None else list(range(rank))[::-1]
                    nxt, nidx = next(iter(consumer.outputs[0].uses()))
                    inner = consumer_axes(nxt, nidx, rank)
                    if inner is not None:
                        axes = (perm[inner[0]], None if inner[1] is None else perm[inner[1]])
                if axes is not None:
                    if name in out and out[name] != axes:
                        logger.warning(
                            "weight %s is consumed along two channel axes %s and %s", name, out[name], axes
                        )
                        continue
                    out[name] = axes
    return out


def tensor_shapes(model: ModelLike) -> dict[str, tuple[int, ...]]:
    """Static shapes of every named tensor that has one (initializers, inputs, node outputs)."""
    model = as_ir_model(model)
    shapes: dict[str, tuple[int, ...]] = {}

    def add(v: ir.Value) -> None:
        shape = static_shape(v)  # the value's own shape, else its constant's; only all-int shapes
        if v.name and shape is not None:
            shapes[v.name] = shape

    for g in graphs(model):
        for v in g.inputs:
            add(v)
        for v in g.initializers.values():
            add(v)
        for node in g:
            for o in node.outputs:
                add(o)
    return shapes


def resolve_axes(
    es: EncodingSet,
    *,
    model: ModelLike | None = None,
    channel_axes: Mapping[str, int | AxisPair] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Fill ``axis``/``block_axis``/``rank`` of per-channel and blocked encodings, in place.

    Priority: the axis the file states (2.x) > ``channel_axes`` from the caller > the consuming
    op in ``model`` > the only dimension whose size equals the channel count (logged, since a
    coincidental size match is how per-head passes go wrong). Raises UserError when a stated or
    derived axis contradicts the tensor's shape.
    """
    axes: dict[str, AxisPair] = {}
    all_shapes: dict[str, tuple[int, ...]] = {}
    if model is not None:
        model = as_ir_model(model)
        axes.update(globals()["channel_axes"](model))
        all_shapes.update(tensor_shapes(model))
    for name, a in (channel_axes or {}).items():
        axes[name] = a if isinstance(a, tuple) else (a, None)
    all_shapes.update(shapes or {})
    for name, enc in es.items():
        shape = all_shapes.get(name)
        if shape is not None and enc.rank is None:
            enc.rank = len(shape)
        if enc.enc_type == "PER_TENSOR" or not enc.has_scale:
            continue
        rank = len(shape) if shape is not None else enc.rank
        if enc.axis is None and name in axes:
            c, b = axes[name]
            enc.axis = c % rank if rank else c
            if enc.block_axis is None and b is not None and enc.enc_type in ("PER_BLOCK", "LPBQ"):
                enc.block_axis = b % rank if rank else b
        n = enc.num_channels
        if enc.axis is None and shape is not None:
            if n is None and enc.enc_type == "PER_BLOCK":
                n = None  # flat per-block with unknown channel count: cannot guess
            matches = [i for i, d in enumerate(shape) if n is not None and d == n]
            if len(matches) == 1:
                enc.axis = matches[0]
                logger.info("channel axis of %s guessed from its shape %s: %d", name, shape, enc.axis)
        if (
            enc.enc_type in ("PER_BLOCK", "LPBQ")
            and enc.block_axis is None
            and enc.axis is not None
            and rank == 2
        ):
            enc.block_axis = 1 - enc.axis
        if shape is None or enc.axis is None:
            continue
        if enc.axis >= len(shape):
            raise UserError(f"encoding {name}: channel axis {enc.axis} out of range for shape {list(shape)}")
        if enc.enc_type == "PER_BLOCK" and enc.scale.ndim == 1:
            enc.resolve_blocks(shape[enc.axis])
        if enc.num_channels is not None and enc.num_channels != shape[enc.axis]:
            raise UserError(
                f"encoding {name}: {enc.num_channels} channels but axis {enc.axis} of shape {list(shape)} "
                f"has {shape[enc.axis]}"
            )
        if enc.enc_type in ("PER_BLOCK", "LPBQ") and enc.block_axis is not None and enc.block_size:
            nb = enc.num_blocks
            expected = -(-shape[enc.block_axis] // enc.block_size)
            if nb is not None and nb != expected:
                raise UserError(
                    f"encoding {name}: {nb} blocks per channel but axis {enc.block_axis} of shape "
                    f"{list(shape)} with block size {enc.block_size} needs {expected}"
                )
