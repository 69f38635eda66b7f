"""Apply AIMET encodings to a float model as QuantizeLinear/DequantizeLinear, and compare two.

This is how quantized equivalence is checked on the host: the MHA model with its encodings and
the SHA model with the propagated encodings both become QDQ models, run on onnxruntime's CPU
provider with graph optimisations off, and their outputs are compared in LSBs.

Placement (the same as ``aimet_onnx.quantsim.encodings_to_onnx_qdq``): an activation gets
``Q -> DQ`` right after its producer (or at the graph input) and every consumer reads the DQ
output; a graph output keeps its name on the DQ output. A parameter gets ``Q -> DQ`` on the
initializer; an int32 bias (``QuantizeLinear`` cannot produce int32) is quantized offline and
only a ``DQ`` is inserted. Plain-cast float encodings (fp16) become ``Cast -> Cast``.

AIMET's sign convention (verified against ``aimet_onnx`` QuantizationSimModel in the tests):
``q = clamp(round(x / scale) - offset, 0, 2**bw - 1)`` on the unsigned grid, so the ONNX zero
point is ``-offset`` (uint) or ``-offset - 2**(bw-1)`` (int): offset -128 at 8 bits is the
symmetric int8 grid with zero point 0; 2.x files store that zero point directly.

Dtypes: standard ``ai.onnx`` Q/DQ when the model's opset can express the encoding (8-bit from
opset 10/13, 16-bit, 4-bit and blocked from 21); below opset 21, 16/4-bit encodings use ORT's
``com.microsoft`` Q/DQ (same arithmetic, no opset conversion of the rest of the model) and
blocked weights (per-block, LPBQ) are fake-quantized offline with numpy (round half to even,
like ORT), because ``com.microsoft`` Q/DQ has no ``block_size``. A symmetric activation of a 0.6.1 /
1.0.0 file gets the unsigned dtype with the shifted zero point (int16 zp 0 -> uint16 zp 32768, the
same grid), as AIMET's 2.x export writes it; weights stay signed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from mha2sha.encodings.axes import ModelLike, as_ir_model, resolve_axes
from mha2sha.encodings.model import Encoding, EncodingSet, copied_activation, dtype_bits, dtype_is_signed
from mha2sha.errors import InternalError, UserError
from mha2sha.graph import DATA_MOVEMENT_OPS, is_op, name_of

__all__ = [
    "to_qdq",
    "to_qdq_ir",
    "run_qdq",
    "run_qdq_model",
    "run_qdq_compare",
    "fake_quantize",
    "max_steps",
    "output_lsb",
]

logger = logging.getLogger(__name__)

_NP_QDTYPE: dict[str, Any] = {
    "int4": ml_dtypes.int4,
    "uint4": ml_dtypes.uint4,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
}
_FLOAT_CAST = {16: ir.DataType.FLOAT16}

#: Quantized outputs of the MHA and SHA models may differ by this many LSBs (``--max-lsb``).
DEFAULT_MAX_LSB = 1.0


def _saturate(values: np.ndarray, lo: int, hi: int, dtype: type) -> np.ndarray:
    """Clip to ``[lo, hi]`` in float64 and cast: float32 cannot hold int32's 2**31 - 1 (it rounds to
    2**31, which would wrap to -2**31 -- a saturated bias turned negative)."""
    return np.clip(values.astype(np.float64), lo, hi).astype(dtype)


#: Weights are quantized this many elements at a time (float32 and float64 temporaries of a whole
#: 4096x4096 weight would be ~400 MB).
_CHUNK = 1 << 22


def _quantize_rows(
    x: np.ndarray, s32: np.ndarray, z32: np.ndarray, lo: int, hi: int, dtype: type
) -> np.ndarray:
    """``saturate(rint(x / s) + z)`` in float32 (as ORT), computed in chunks of rows of axis 0:
    the same values as one whole-array expression, with bounded temporaries."""
    x = np.asarray(x)
    if x.ndim == 0 or x.size <= _CHUNK:
        return _saturate(np.rint(x.astype(np.float32) / s32) + z32, lo, hi, dtype)
    out: np.ndarray = np.empty(x.shape, dtype)
    rows = max(1, _CHUNK // max(1, x.size // x.shape[0]))
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        s = s32[start:stop] if s32.ndim == x.ndim and s32.shape[0] == x.shape[0] > 1 else s32
        z = z32[start:stop] if z32.ndim == x.ndim and z32.shape[0] == x.shape[0] > 1 else z32
        out[start:stop] = _saturate(np.rint(x[start:stop].astype(np.float32) / s) + z, lo, hi, dtype)
    return out


def _qrange(dtype: str) -> tuple[int, int]:
    bits = dtype_bits(dtype)
    assert bits is not None
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if dtype_is_signed(dtype) else (0, 2**bits - 1)


def _layout(enc: Encoding, arr: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    """Encoding-layout array -> the shape ONNX wants (scalar, 1-D per channel, blocked = input rank)."""
    if enc.enc_type == "PER_TENSOR":
        return np.asarray(arr).reshape(())
    if enc.enc_type == "PER_CHANNEL":
        return np.asarray(arr).reshape(-1)
    assert shape is not None and enc.axis is not None and enc.block_axis is not None
    arr = np.asarray(arr)
    if arr.ndim == 1:
        arr = arr.reshape(shape[enc.axis], -1)
    rank = len(shape)
    moved = np.moveaxis(
        arr.reshape(arr.shape[0], arr.shape[1], *([1] * (rank - 2))), [0, 1], [enc.axis, enc.block_axis]
    )
    full = list(shape)
    full[enc.block_axis] = moved.shape[enc.block_axis]
    return np.ascontiguousarray(np.broadcast_to(moved, full))


def fake_quantize(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    dtype: str,
    axis: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """``DequantizeLinear(QuantizeLinear(x))`` in numpy with ORT's arithmetic (float32, half-to-even)."""
    x = np.asarray(x, np.float32)
    s = np.asarray(scale, np.float32)
    z = np.asarray(zero_point, np.float32)
    if block_size:
        assert axis is not None
        s = np.repeat(s, block_size, axis=axis).take(np.arange(x.shape[axis]), axis=axis)
        z = np.repeat(z, block_size, axis=axis).take(np.arange(x.shape[axis]), axis=axis)
    elif s.ndim == 1 and axis is not None:
        bshape = [1] * x.ndim
        bshape[axis] = -1
        s, z = s.reshape(bshape), z.reshape(bshape)
    lo, hi = _qrange(dtype)
    q = _saturate(np.rint(x / s) + z, lo, hi, np.int64).astype(np.float32)  # as ORT converts the int
    return ((q - z) * s).astype(np.float32)


class _Builder:
    """Inserts Q/DQ pairs into one graph."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.values: dict[str, ir.Value] = {}
        for v in self.graph.inputs:
            self.values[name_of(v)] = v
        for name, v in self.graph.initializers.items():
            self.values[name] = v
        for node in self.graph:
            for o in node.outputs:
                if o.name:
                    self.values[o.name] = o
        self.front: list[ir.Node] = []
        self.uses_ms = False
        self.plans: dict[str, QPlan] = {}  # encoded tensor -> what was inserted for it
        self.roles: dict[str, tuple[str, str]] = {}  # initializer made here -> (encoded tensor, number)

    def const(self, name: str, arr: np.ndarray, role: tuple[str, str]) -> ir.Value:
        tensor = ir.Tensor(arr, name=name)  # what ir.tensor makes of an array, typed with its Shape
        v = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(v)
        self.roles[name] = role
        return v

    def insert(self, value: ir.Value, nodes: list[ir.Node], out: ir.Value) -> None:
        """Make every reader of ``value`` (except ``nodes``) read ``out``; graph outputs keep the name."""
        own = set(map(id, nodes))
        for user, idx in list(value.uses()):
            if id(user) not in own:
                user.replace_input_with(idx, out)
        name = value.name
        for i, gout in enumerate(self.graph.outputs):
            if gout is value:
                self.graph.outputs[i] = out
                value.name = f"{name}__pre_qdq"
                out.name = name
        producer = value.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, nodes)
        else:
            self.front.extend(nodes)

    def finish(self) -> None:
        if self.front:
            first = next(iter(self.graph), None)
            if first is None:
                self.graph.extend(self.front)
            else:
                self.graph.insert_before(first, self.front)
        if self.uses_ms:
            self.graph.opset_imports.setdefault("com.microsoft", 1)
        self.graph.sort()


def _float_dtype(value: ir.Value) -> ir.DataType:
    dt = value.dtype
    if dt is None and value.const_value is not None:
        dt = value.const_value.dtype
    return dt or ir.DataType.FLOAT


def _activation_qdtype(enc: Encoding) -> str:
    """The dtype of a (non-constant) activation's Q/DQ: unsigned unless a 2.x file says otherwise.

    0.6.1/1.0.0 files only say "symmetric", which :meth:`Encoding.qdtype` maps to the signed dtype
    with zero point 0 (right for weights). For an activation the unsigned dtype with the shifted zero
    point is the same grid (int16 zp 0 == uint16 zp 32768: identical values, identical rounding and
    clipping) and is what AIMET's 2.x export and ORT/QNN's HTP node units use: every activation of a
    ``DQ -> op -> Q`` unit must have one dtype ("input and output types need to be same").
    """
    qdtype = enc.qdtype()
    unsigned = "u" + qdtype
    if enc.output_dtype is not None or enc.enc_type == "LPBQ" or unsigned not in _NP_QDTYPE:
        return qdtype  # 2.x dtype as written; int32 has no uint32 Q/DQ; uint stays uint
    bits = dtype_bits(unsigned)
    assert bits is not None  # a _NP_QDTYPE integer dtype
    hi = 2**bits - 1
    zp = np.asarray(enc.zero_point(unsigned), np.float64)
    if np.any(zp < 0) or np.any(zp > hi):
        return qdtype
    return unsigned


@dataclasses.dataclass(frozen=True)
class QPlan:
    """What one encoding inserts into a graph: everything but the numbers.

    ``kind``: ``cast`` (plain float encoding: Cast -> Cast), ``weight`` (a constant stored quantized,
    DequantizeLinear only), ``int32`` (a bias quantized offline to int32, DequantizeLinear only),
    ``fold`` (a blocked weight below opset 21, fake-quantized offline in place) or ``activation``
    (QuantizeLinear -> DequantizeLinear). Two tensors with equal plans get graphs of the same
    structure; :func:`plan_numbers` gives the arrays (``q``, ``scale``, ``zero_point``,
    ``folded``) that differ. Blockwise verification builds one QDQ graph per block structure and
    feeds each block its own numbers.
    """

    kind: str
    fdt: ir.DataType
    shape: tuple[int, ...] | None = None
    qdtype: str = ""
    domain: str | None = ""
    axis: int | None = None  # the Q/DQ ``axis`` attribute (the block axis when blocked)
    block_size: int | None = None
    channel_axis: int | None = None  # enc.axis: how per-channel numbers broadcast on the constant
    cast_to: ir.DataType | None = None
    bits: int = 0


def _domain_for(opset: int, qdtype: str, enc: Encoding) -> str | None:
    """``""`` (standard), ``"com.microsoft"``, or None when only offline folding works."""
    need = 10
    if enc.enc_type != "PER_TENSOR":
        need = 13
    if enc.enc_type in ("PER_BLOCK", "LPBQ") or qdtype not in ("int8", "uint8", "int32"):
        need = 21
    if opset >= need:
        return ""
    if enc.enc_type in ("PER_BLOCK", "LPBQ"):
        return None
    return "com.microsoft"


def _value_shape(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is not None and value.shape.is_static():
        return tuple(value.shape.numpy())
    if value.const_value is not None:
        return tuple(value.const_value.shape.numpy())  # a constant's shape is static
    return None


def plan_encoding(opset: int, name: str, enc: Encoding, value: ir.Value, is_param: bool) -> QPlan:
    """The structure ``enc`` gives tensor ``value`` (raises UserError for what QDQ cannot express)."""
    fdt = _float_dtype(value)
    shape = _value_shape(value)
    if enc.is_float:
        if enc.has_scale:
            raise UserError(f"encoding {name}: scaled float ({enc.output_dtype}) QDQ is not supported")
        to = _FLOAT_CAST.get(enc.bitwidth)
        if enc.output_dtype == "bfloat16":
            to = ir.DataType.BFLOAT16
        if to is None:
            raise UserError(f"encoding {name}: float{enc.bitwidth} cast is not supported")
        return QPlan("cast", fdt, shape, cast_to=to, bits=enc.bitwidth)

    is_const = value.const_value is not None and (is_param or value.is_initializer())
    qdtype = _activation_qdtype(enc) if not is_const else enc.qdtype()
    blocked = enc.enc_type in ("PER_BLOCK", "LPBQ")
    if enc.enc_type != "PER_TENSOR" and (enc.axis is None or (blocked and enc.block_axis is None)):
        raise UserError(f"encoding {name}: channel axis unknown; pass channel_axes")
    if blocked and shape is None:
        raise UserError(f"encoding {name}: blocked encoding on a tensor without a static shape")
    axis = None
    if enc.enc_type != "PER_TENSOR":
        axis = enc.block_axis if blocked else enc.axis
    domain = _domain_for(opset, qdtype, enc)
    if is_const and domain is not None and not blocked:
        kind = "weight"
    elif qdtype == "int32" or domain is None:
        if not is_const:
            raise UserError(
                f"encoding {name}: {qdtype} {enc.enc_type} activation cannot be expressed at opset {opset}"
            )
        kind = "fold" if domain is None else "int32"
    else:
        kind = "activation"
    plan = QPlan(
        kind,
        fdt,
        shape,
        qdtype,
        domain,
        axis,
        int(enc.block_size) if blocked and enc.block_size is not None else None,
        enc.axis,
    )
    _scale_and_zero_point(plan, name, enc)  # validates the numbers' grid and channel count
    return plan


def _scale_and_zero_point(plan: QPlan, name: str, enc: Encoding) -> tuple[np.ndarray, np.ndarray]:
    """Scale (in the model's float dtype) and zero point (int64) laid out as ONNX wants them."""
    zp = np.asarray(enc.zero_point(plan.qdtype), np.float64)
    if np.any(np.mod(zp, 1.0) != 0):
        raise UserError(f"encoding {name}: fractional zero point (int2 custom grid) has no ONNX QDQ form")
    lo, hi = _qrange(plan.qdtype)
    if np.any(zp < lo) or np.any(zp > hi):
        raise UserError(f"encoding {name}: zero point outside the {plan.qdtype} range")
    s_arr = _layout(enc, enc.effective_scale(), plan.shape).astype(plan.fdt.numpy())
    z_arr = _layout(enc, zp, plan.shape).astype(np.int64)
    if (
        enc.enc_type == "PER_CHANNEL"
        and plan.shape is not None
        and enc.axis is not None  # known: checked when planning
        and s_arr.size != plan.shape[enc.axis]
    ):
        raise UserError(f"encoding {name}: {s_arr.size} channels, axis {enc.axis} of {list(plan.shape)}")
    return s_arr, z_arr


def _broadcast(x: np.ndarray, arr: np.ndarray, axis: int | None) -> np.ndarray:
    if arr.ndim == 1 and axis is not None:
        bshape = [1] * x.ndim
        bshape[axis] = -1
        return arr.reshape(bshape)
    return arr


_QUANTIZE_CHUNK = 1 << 18  # elements per pass: the float32 temporary stays in the CPU cache


def _quantize(x: np.ndarray, s32: np.ndarray, z32: np.ndarray, qdtype: str, np_q: type) -> np.ndarray:
    """``saturate(rint(x / s) + z)`` in float32 (ORT's arithmetic), in cache-sized chunks of rows."""
    lo, hi = _qrange(qdtype)
    x = np.asarray(x)
    if x.ndim == 0 or np.dtype(np_q).itemsize >= 4:
        t = np.asarray(np.divide(np.asarray(x, np.float32), s32, dtype=np.float32))  # 0-d: a scalar
        np.rint(t, out=t)
        t += z32
        if np.dtype(np_q).itemsize >= 4:
            return _saturate(t, lo, hi, np_q)  # int32: float32 cannot hold 2**31 - 1, clip in float64
        np.clip(t, lo, hi, out=t)
        return t.astype(np_q)
    out: np.ndarray = np.empty(x.shape, np_q)
    rows = max(1, _QUANTIZE_CHUNK // max(1, x[0].size))
    per_row = s32.ndim == x.ndim and s32.shape[0] == x.shape[0] and x.shape[0] > 1
    per_row_z = z32.ndim == x.ndim and z32.shape[0] == x.shape[0] and x.shape[0] > 1
    buffer = np.empty((min(rows, x.shape[0]), *x.shape[1:]), np.float32)
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        t = buffer[: stop - start]
        np.divide(x[start:stop], s32[start:stop] if per_row else s32, out=t, dtype=np.float32)
        np.rint(t, out=t)
        t += z32[start:stop] if per_row_z else z32
        np.clip(t, lo, hi, out=t)
        out[start:stop] = t  # integral values within range: the cast is exact
    return out


def plan_numbers(plan: QPlan, name: str, enc: Encoding, const: np.ndarray | None) -> dict[str, np.ndarray]:
    """The arrays of :func:`plan_encoding`'s structure for ``enc`` (``const``: the tensor, for constants)."""
    if plan.kind == "cast":
        return {}
    s_arr, z_arr = _scale_and_zero_point(plan, name, enc)
    if plan.kind == "activation":
        return {"scale": s_arr, "zero_point": z_arr.astype(_NP_QDTYPE[plan.qdtype])}
    assert const is not None
    if plan.kind == "weight":
        # Weights and other constants are stored quantized with a DequantizeLinear only: the form
        # QNN's HTP takes (a QuantizeLinear on a float weight is a standalone op it refuses), and
        # numerically the same as Q -> DQ (round half to even, saturate).
        s32, z32 = s_arr.astype(np.float32), z_arr.astype(np.float32)
        if s32.size > 1:
            s32, z32 = _broadcast(const, s32, plan.channel_axis), _broadcast(const, z32, plan.channel_axis)
        np_q = _NP_QDTYPE.get(plan.qdtype, np.int32)
        q = _quantize(const, s32, z32, plan.qdtype, np_q)
        return {"q": q, "scale": s_arr, "zero_point": z_arr.astype(np_q)}
    x = np.asarray(const, np.float32)
    if plan.kind == "fold":  # blocked weight below opset 21: fake-quantized offline
        folded = fake_quantize(x, s_arr, z_arr, plan.qdtype, axis=plan.axis, block_size=plan.block_size)
        return {"folded": folded.astype(plan.fdt.numpy())}
    # int32 bias: quantized offline, DequantizeLinear only
    s32 = _broadcast(x, s_arr.astype(np.float32), plan.axis)
    z32 = _broadcast(x, z_arr.astype(np.float32), plan.axis)
    lo, hi = _qrange(plan.qdtype)
    q = _saturate(np.rint(x / s32) + z32, lo, hi, np.int32)
    return {"q": q, "scale": s_arr, "zero_point": z_arr.astype(np.int32)}


def _emit(b: _Builder, name: str, value: ir.Value, plan: QPlan, numbers: Mapping[str, np.ndarray]) -> None:
    """Insert ``plan``'s nodes for ``value``, its numbers as initializers (recorded in ``b.roles``)."""
    fdt = plan.fdt
    if plan.kind == "cast":
        assert plan.cast_to is not None
        c1 = ir.Node("", "Cast", [value], [ir.AttrInt64("to", plan.cast_to)], name=f"{name}_cast_q")
        c1.outputs[0].name = f"{name}_fp{plan.bits}"
        c2 = ir.Node("", "Cast", [c1.outputs[0]], [ir.AttrInt64("to", fdt)], name=f"{name}_cast_dq")
        c2.outputs[0].name = f"{name}_qdq"
        c2.outputs[0].dtype = fdt
        b.insert(value, [c1, c2], c2.outputs[0])
        return
    if plan.kind == "fold":
        value.const_value = ir.tensor(numbers["folded"], name=name)
        b.roles[name] = (name, "folded")
        logger.info("%s: blocked encoding folded offline (opset %d < 21)", name, b.opset)
        return
    attrs: list[ir.Attr] = []
    if plan.axis is not None:
        attrs.append(ir.AttrInt64("axis", plan.axis))
    if plan.block_size is not None:
        attrs.append(ir.AttrInt64("block_size", plan.block_size))
    sv = b.const(f"{name}_scale", numbers["scale"], (name, "scale"))
    zv = b.const(f"{name}_zero_point", numbers["zero_point"], (name, "zero_point"))
    if plan.kind in ("weight", "int32"):
        domain = (plan.domain or "") if plan.kind == "weight" else ""
        if domain == "com.microsoft":
            b.uses_ms = True
        qv = b.const(f"{name}_q", numbers["q"], (name, "q"))
        dq = ir.Node(domain, "DequantizeLinear", [qv, sv, zv], attrs, name=f"{name}_dq")
        dq.outputs[0].name = f"{name}_qdq"
        dq.outputs[0].dtype = fdt
        b.insert(value, [dq], dq.outputs[0])
        return
    assert plan.domain is not None  # activations always have a Q/DQ domain (checked when planning)
    if plan.domain == "com.microsoft":
        b.uses_ms = True
    qn = ir.Node(plan.domain, "QuantizeLinear", [value, sv, zv], attrs, name=f"{name}_q")
    qn.outputs[0].name = f"{name}_q"
    dqn = ir.Node(plan.domain, "DequantizeLinear", [qn.outputs[0], sv, zv], attrs, name=f"{name}_dq")
    dqn.outputs[0].name = f"{name}_qdq"
    dqn.outputs[0].dtype = fdt
    if value.shape is not None:
        dqn.outputs[0].shape = value.shape
    b.insert(value, [qn, dqn], dqn.outputs[0])


def _add_encoding(b: _Builder, name: str, enc: Encoding, is_param: bool) -> None:
    value = b.values.get(name)
    if value is None:  # reported by the coverage check; nothing to quantize here
        logger.warning("encoding %s names no tensor of the model; ignored", name)
        return
    plan = plan_encoding(b.opset, name, enc, value, is_param)
    const = value.const_value.numpy() if plan.kind in ("weight", "int32", "fold") else None  # type: ignore[union-attr]
    b.plans[name] = plan
    _emit(b, name, value, plan, plan_numbers(plan, name, enc, const))


#: Data movement ORT's QDQPropagationTransformer does not pass a DQ through (it does Reshape,
#: Transpose, (Un)Squeeze, Slice, MaxPool; Identity is removed): without an encoding of its own
#: the op runs in float.
_NOT_PROPAGATED = DATA_MOVEMENT_OPS - {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}


def _inherit_through_copies(model: ir.Model, es: EncodingSet) -> None:
    """Unencoded outputs of Expand/Tile/Flatten of an encoded activation get that activation's encoding.

    A 0.6.1/1.0.0 export leaves data movement unencoded (the values already are on the input's grid);
    on CPU that is exact either way, but on HTP an Expand without Q/DQ (e.g. GQA ``repeat_kv`` of a
    16-bit KV cache) runs in fp16 and rounds the key/value. Re-quantizing a copy on its source's grid
    is the identity, so this cannot change the CPU outputs; AIMET's 2.x export writes the same entries.
    """
    for node in model.graph:
        if not is_op(node, _NOT_PROPAGATED) or not node.inputs:
            continue
        out = node.outputs[0]
        if not out.name or out.name in es:
            continue
        source = copied_activation(node.inputs[0], es)
        if source is None:
            continue
        enc = es.activations[source]
        if enc.is_float or enc.enc_type != "PER_TENSOR":
            continue
        es.activations[out.name] = enc.renamed(out.name)
        if es.order is not None:
            es.order.append(out.name)
        logger.debug("%s: %s copies %s, same encoding", out.name, node.op_type, source)


def to_qdq_ir(
    model: ModelLike, encodings: EncodingSet, *, channel_axes: Mapping[str, int] | None = None, copy: bool = True
) -> ir.Model:
    """A copy of ``model`` (onnx_ir.Model, ModelProto or path) with ``encodings`` applied as QDQ
    (``copy=False``: an ``ir.Model`` is changed in place, its lazy weights are read one by one)."""
    # never mutate the caller's model: a clone shares its (immutable, maybe external) tensors
    if not isinstance(model, ir.Model):
        model = as_ir_model(model)
    elif copy:
        model = model.clone()
    es = encodings.copy()
    resolve_axes(es, model=model, channel_axes=channel_axes)
    _inherit_through_copies(model, es)
    b = _Builder(model)
    for name, enc in es.items():
        _add_encoding(b, name, enc, es.kind_of(name) == "param")
    b.finish()
    return model


def to_qdq(
    model: ModelLike, encodings: EncodingSet, *, channel_axes: Mapping[str, int] | None = None
) -> onnx.ModelProto:
    """:func:`to_qdq_ir` as an ``onnx.ModelProto``."""
    return ir.to_proto(to_qdq_ir(model, encodings, channel_axes=channel_axes))


def _session(model: ir.Model, workdir: str):  # -> ort.InferenceSession
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    path = os.path.join(workdir, f"qdq_{id(model)}.onnx")
    ir.save(model, path, external_data=os.path.basename(path) + ".data", size_threshold_bytes=1 << 20)
    try:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InternalError(
            f"onnxruntime cannot load the QDQ model: {' '.join(str(exc).split())[:300]}"
        ) from None


def run_qdq(
    model: ModelLike,
    encodings: EncodingSet,
    inputs: Mapping[str, np.ndarray],
    *,
    channel_axes: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Outputs of the QDQ version of ``model`` on ``inputs`` (ORT CPU, optimisations off)."""
    return run_qdq_model(to_qdq_ir(model, encodings, channel_axes=channel_axes), inputs)


def run_qdq_model(
    qdq: ir.Model, inputs: Mapping[str, np.ndarray], outputs: list[str] | None = None
) -> dict[str, np.ndarray]:
    """``outputs`` (default: the graph outputs) of an already built QDQ model, fed the ``inputs``
    it takes (ORT CPU, optimisations off)."""
    with tempfile.TemporaryDirectory(prefix="mha2sha-qdq-") as tmp:
        sess = _session(qdq, tmp)
        names = {i.name for i in sess.get_inputs()}
        outputs = outputs if outputs is not None else [o.name for o in sess.get_outputs()]
        result = sess.run(outputs, {k: v for k, v in inputs.items() if k in names})
        return dict(zip(outputs, result, strict=True))


def output_lsb(enc: Encoding | None, shape: Sequence[int | ir.SymbolicDim]) -> np.ndarray | None:
    """The output's quantization step, broadcastable to ``shape`` (only its rank is read)."""
    if enc is None or enc.is_float or not enc.has_scale:
        return None
    if enc.enc_type == "PER_TENSOR":
        return np.asarray(enc.scale, np.float64)
    if enc.enc_type == "PER_CHANNEL" and enc.axis is not None and enc.axis < len(shape):
        bshape = [1] * len(shape)
        bshape[enc.axis] = -1
        return np.asarray(enc.scale, np.float64).reshape(bshape)
    return None


def max_steps(a: np.ndarray, b: np.ndarray, lsb: np.ndarray | None) -> float:
    """Max |a - b| in quantization steps (both on the grid: whole steps), or absolute without ``lsb``.

    Equal values (the same infinity, e.g. a masked score, or NaN on both sides) are no difference;
    NaN on one side only is an infinite one, so a NaN never hides the rest of the tensor.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b)
    diff = np.where((a == b) | (np.isnan(a) & np.isnan(b)), 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)
    if not diff.size:
        return 0.0
    # float32 dequantization leaves ~1e-3 step of noise on a 16-bit grid: count whole steps
    return float(np.rint(diff / lsb).max() if lsb is not None else diff.max())


def run_qdq_compare(
    model_a: ModelLike,
    enc_a: EncodingSet,
    model_b: ModelLike,
    enc_b: EncodingSet,
    inputs: Mapping[str, np.ndarray],
    *,
    output_map: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """``{output: max |a - b|}`` between the QDQ versions of two models on the same inputs.

    The unit is LSBs of the output's encoding in ``enc_a`` (per-tensor, or per-channel with a
    known axis), so 0 is bit-identical and 1 is one quantization step; an output without an
    integer encoding is compared in absolute float difference. Outputs are matched by name
    (``output_map`` renames a's outputs to b's).
    """
    out_a = run_qdq(model_a, enc_a, inputs)
    out_b = run_qdq(model_b, enc_b, inputs)
    mapping = dict(output_map) if output_map else {n: n for n in out_a if n in out_b}
    if not mapping:
        raise UserError("the two models share no output name; pass output_map")
    result: dict[str, float] = {}
    for na, nb in mapping.items():
        if na not in out_a or nb not in out_b:
            raise UserError(f"output {na!r} / {nb!r} not produced by both models")
        a = np.asarray(out_a[na], np.float64)
        bb = np.asarray(out_b[nb], np.float64)
        if a.shape != bb.shape:
            raise UserError(f"output {na}: shapes differ {list(a.shape)} vs {list(bb.shape)}")
        result[na] = max_steps(a, bb, output_lsb(enc_a.get(na), a.shape))
    return result
