"""Read and write AIMET encodings files: versions 0.6.1, 1.0.0, 2.0.0 and 2.1.0.

Formats (AIMET's ``Docs/techniques/encoding_spec.rst`` and ``aimet_onnx/_encoding.py``):

- 0.6.1: ``{"version", "activation_encodings": {name: [enc, ...]}, "param_encodings": {...},
  "quantizer_args"}``, ``enc = {bitwidth, dtype: "int", is_symmetric: "True"|"False", min, max,
  offset, scale}`` (one per channel), float tensors ``[{bitwidth: 16, dtype: "float"}]``.
- 1.0.0: both sections are lists of ``{name, enc_type, dtype: INT|FLOAT, bw, is_sym, scale[],
  offset[], block_size?, compressed_bw?, per_block_int_scale?, zero_point_shift?}``; per-block
  arrays are flattened channel-major ``(out, in/block)``; the channel axis is not recorded.
- 2.0.0: ``{"version", "encodings": [{name, output_dtype, y_scale, y_zero_point?, axis?,
  block_size?}]}`` mirroring ``onnx::QuantizeLinear`` (``zero_point = -offset``, shifted by
  ``2**(bw-1)`` for signed dtypes); LPBQ as ``per_channel_float_scale`` + ``per_block_int_scale``.
- 2.1.0: 2.0.0 where LPBQ is a meta encoding ``y_scale = {x, x_scale, axis}``.

A file read and written back in the same version gives the same JSON (``json.load`` equal);
writing another version converts, which needs the channel axes (a model) for 1.0.0 -> 2.x.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from mha2sha.encodings.model import VERSIONS, Encoding, EncodingSet, dtype_bits, dtype_is_signed
from mha2sha.errors import UserError

if TYPE_CHECKING:
    from mha2sha.encodings.axes import ModelLike

__all__ = [
    "load_encodings",
    "save_encodings",
    "parse_encodings",
    "dump_encodings",
    "convert_encodings",
]

logger = logging.getLogger(__name__)

_KNOWN_061 = {"bitwidth", "dtype", "is_symmetric", "min", "max", "offset", "scale"}
_KNOWN_100 = {
    "name",
    "dtype",
    "enc_type",
    "bw",
    "is_sym",
    "scale",
    "offset",
    "block_size",
    "compressed_bw",
    "per_block_int_scale",
    "zero_point_shift",
}
_KNOWN_2X = {
    "name",
    "output_dtype",
    "y_scale",
    "y_zero_point",
    "axis",
    "block_size",
    "per_block_int_scale",
    "per_channel_float_scale",
}
_FLOAT_BITS = {
    "float16": 16,
    "bfloat16": 16,
    "float8e4m3fn": 8,
    "float8e4m3fnuz": 8,
    "float8e5m2": 8,
    "float8e5m2fnuz": 8,
    "float4e2m1": 4,
}


class _Ctx:
    """Where we are in the file, so every error is one self-explaining line."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, msg: str) -> UserError:
        return UserError(f"encodings {self.source}: {where}: {msg}")


# ------------------------------------------------------------------------------------------
# small validators
# ------------------------------------------------------------------------------------------


_NUMBER_TYPES = frozenset({int, float})  # exactly: a bool is not a number here


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(ctx: _Ctx, where: str, d: Mapping[str, Any], key: str, *, required: bool = True) -> int | None:
    if key not in d:
        if required:
            raise ctx.fail(where, f"missing {key!r}")
        return None
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ctx.fail(where, f"{key!r} must be an integer, got {v!r}")
    return v


def _nums(ctx: _Ctx, where: str, v: Any, key: str) -> np.ndarray:
    """A number or (nested) list of numbers as float64, validating every leaf."""

    def ok(x: Any) -> bool:
        if isinstance(x, list):
            if set(map(type, x)) <= _NUMBER_TYPES:  # the common flat list, checked at C speed
                return True
            return all(ok(y) for y in x)
        return _is_num(x)

    if not ok(v):
        raise ctx.fail(where, f"{key!r} must be a number or a list of numbers")
    try:
        arr = np.asarray(v, dtype=np.float64)
    except ValueError:
        raise ctx.fail(where, f"{key!r} is a ragged nested list") from None
    return arr


def _all_ints(v: Any) -> bool:
    if isinstance(v, list):
        kinds = set(map(type, v))  # exactly int: a bool is not an int here
        if kinds <= {int}:
            return True
        return kinds <= {int, list} and all(_all_ints(x) for x in v)
    return isinstance(v, int) and not isinstance(v, bool)


def _pyval(x: float, as_int: bool) -> int | float:
    return int(x) if as_int and float(x).is_integer() else float(x)


def _tolist(arr: np.ndarray, as_int: bool = False) -> Any:
    if as_int and np.all(np.mod(arr, 1.0) == 0):
        return np.asarray(arr).astype(np.int64).tolist()
    return np.asarray(arr, dtype=np.float64).tolist()


def _json_pairs(ctx: _Ctx) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    raise ctx.fail("JSON", f"duplicate key {k!r}")
                seen.add(k)
        return out

    return hook


# ------------------------------------------------------------------------------------------
# 0.6.1
# ------------------------------------------------------------------------------------------


def _parse_061(ctx: _Ctx, name: str, entries: Any) -> Encoding:
    where = name
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ctx.fail(where, "a 0.6.1 encoding must be a non-empty list of objects")
    first = entries[0]
    dtype = first.get("dtype", "int")
    if dtype not in ("int", "float"):
        raise ctx.fail(where, f"'dtype' must be 'int' or 'float', got {dtype!r}")
    bw = _int(ctx, where, first, "bitwidth")
    assert bw is not None
    extras = [{k: v for k, v in e.items() if k not in _KNOWN_061} for e in entries]
    style: dict[str, Any] = {"dtype_explicit": "dtype" in first}
    if any(extras):
        style["elem_extra"] = extras
    if dtype == "float":
        return Encoding(
            name=name, dtype="float", bitwidth=bw, scale=np.zeros(0), offset=np.zeros(0), style=style
        )
    for i, e in enumerate(entries):
        if e.get("dtype", "int") != dtype or e.get("bitwidth") != bw:
            raise ctx.fail(where, f"channel {i} has another dtype/bitwidth than channel 0")
        for key in ("scale", "offset"):
            if key not in e:
                raise ctx.fail(where, f"channel {i} is missing {key!r}")
            if not _is_num(e[key]):
                raise ctx.fail(where, f"{key!r} must be a number, got {e[key]!r}")
        for key in ("min", "max"):
            if key in e and not _is_num(e[key]):
                raise ctx.fail(where, f"{key!r} must be a number, got {e[key]!r}")
    sym = first.get("is_symmetric", "False")
    if isinstance(sym, bool):
        style["sym_bool"] = True
    elif sym in ("True", "False"):
        sym = sym == "True"
    else:
        raise ctx.fail(where, f"'is_symmetric' must be 'True' or 'False', got {sym!r}")
    if any(e.get("is_symmetric", first.get("is_symmetric")) != first.get("is_symmetric") for e in entries):
        raise ctx.fail(where, "channels disagree on 'is_symmetric'")
    style["int_offset"] = all(isinstance(e["offset"], int) for e in entries)
    has_minmax = all("min" in e and "max" in e for e in entries)
    style["no_minmax"] = not any("min" in e or "max" in e for e in entries)
    squeeze: Callable[[list[float]], np.ndarray] = (
        (lambda v: np.asarray(v[0], np.float64))
        if len(entries) == 1
        else (lambda v: np.asarray(v, np.float64))
    )
    return Encoding(
        name=name,
        dtype="int",
        bitwidth=bw,
        is_symmetric=bool(sym),
        scale=squeeze([e["scale"] for e in entries]),
        offset=squeeze([e["offset"] for e in entries]),
        enc_type="PER_TENSOR" if len(entries) == 1 else "PER_CHANNEL",
        min=squeeze([e["min"] for e in entries]) if has_minmax else None,
        max=squeeze([e["max"] for e in entries]) if has_minmax else None,
        style=style,
    )


def _write_061(ctx: _Ctx, enc: Encoding) -> list[dict[str, Any]]:
    where = enc.name
    st = enc.style
    extras = st.get("elem_extra")
    if enc.is_float:
        if enc.has_scale:
            raise ctx.fail(where, "a scaled float encoding cannot be written as 0.6.1")
        out: dict[str, Any] = {"bitwidth": enc.bitwidth, "dtype": "float"}
        return [{**out, **(extras[0] if extras else {})}]
    if enc.enc_type not in ("PER_TENSOR", "PER_CHANNEL"):
        raise ctx.fail(where, f"{enc.enc_type} encodings cannot be written as 0.6.1")
    scale = np.atleast_1d(enc.scale)
    offset = np.atleast_1d(enc.offset)
    if np.any(np.mod(offset, 1.0) != 0):
        raise ctx.fail(where, "a fractional zero point cannot be written as 0.6.1")
    qmax = 2**enc.bitwidth - 1
    if enc.min is not None and enc.max is not None and np.size(enc.min) == scale.size:
        mins, maxs = np.atleast_1d(enc.min), np.atleast_1d(enc.max)
    else:
        mins, maxs = offset * scale, (offset + qmax) * scale
    as_int = bool(st.get("int_offset", False))
    sym: Any = enc.is_symmetric if st.get("sym_bool") else str(bool(enc.is_symmetric))
    if extras is not None and len(extras) != scale.size:
        extras = None
    out_list = []
    for i in range(scale.size):
        e: dict[str, Any] = {"bitwidth": enc.bitwidth}
        if st.get("dtype_explicit", True):
            e["dtype"] = "int"
        e["is_symmetric"] = sym
        if not st.get("no_minmax"):
            e["max"] = float(maxs[i])
            e["min"] = float(mins[i])
        e["offset"] = _pyval(offset[i], as_int)
        e["scale"] = float(scale[i])
        if extras:
            e.update(extras[i])
        out_list.append(e)
    return out_list


# ------------------------------------------------------------------------------------------
# 1.0.0
# ------------------------------------------------------------------------------------------


def _parse_100(ctx: _Ctx, entry: Any, section: str) -> Encoding:
    if not isinstance(entry, dict):
        raise ctx.fail(section, f"entries must be objects, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str):
        raise ctx.fail(section, f"entry without a string 'name': {json.dumps(entry)[:80]}")
    where = name
    dtype = entry.get("dtype")
    if dtype not in ("INT", "FLOAT"):
        raise ctx.fail(where, f"'dtype' must be 'INT' or 'FLOAT', got {dtype!r}")
    bw = _int(ctx, where, entry, "bw")
    assert bw is not None
    enc_type = entry.get("enc_type", "PER_TENSOR")
    if enc_type not in ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK", "LPBQ"):
        raise ctx.fail(where, f"unknown 'enc_type' {enc_type!r}")
    extra = {k: v for k, v in entry.items() if k not in _KNOWN_100}
    style: dict[str, Any] = {"enc_type_explicit": "enc_type" in entry}
    if dtype == "FLOAT":
        if "scale" in entry:
            raise ctx.fail(where, "a FLOAT 1.0.0 encoding carries no scale")
        return Encoding(
            name=name,
            dtype="float",
            bitwidth=bw,
            scale=np.zeros(0),
            offset=np.zeros(0),
            extra=extra,
            style=style,
        )
    sym = entry.get("is_sym")
    if not isinstance(sym, bool):
        raise ctx.fail(where, f"'is_sym' must be true or false, got {sym!r}")
    for key in ("scale", "offset"):
        if key not in entry:
            raise ctx.fail(where, f"missing {key!r}")
    style["scale_scalar"] = not isinstance(entry["scale"], list)
    scale: np.ndarray = _nums(ctx, where, entry["scale"], "scale").ravel()
    offset: np.ndarray = _nums(ctx, where, entry["offset"], "offset").ravel()
    style["int_offset"] = _all_ints(entry["offset"])
    if "zero_point_shift" in entry:
        shift = _nums(ctx, where, entry["zero_point_shift"], "zero_point_shift").ravel()
        if shift.size not in (1, offset.size):
            raise ctx.fail(where, "'zero_point_shift' length does not match 'offset'")
        offset = offset + shift
        style["zps_explicit"] = True
    block_size = _int(ctx, where, entry, "block_size", required=enc_type in ("PER_BLOCK", "LPBQ"))
    if block_size is not None and block_size <= 0:
        raise ctx.fail(where, f"'block_size' must be positive, got {block_size}")
    if enc_type == "LPBQ":
        cbw = _int(ctx, where, entry, "compressed_bw")
        if "per_block_int_scale" not in entry:
            raise ctx.fail(where, "LPBQ encoding without 'per_block_int_scale'")
        pbis = _nums(ctx, where, entry["per_block_int_scale"], "per_block_int_scale").ravel()
        if scale.size == 0 or pbis.size % scale.size:
            raise ctx.fail(where, f"{pbis.size} per-block scales do not split into {scale.size} channels")
        if offset.size != scale.size:
            raise ctx.fail(where, f"'offset' has {offset.size} entries, 'scale' {scale.size}")
        return Encoding(
            name=name,
            bitwidth=bw,
            is_symmetric=sym,
            scale=scale,
            offset=offset,
            enc_type="LPBQ",
            block_size=block_size,
            compressed_bw=cbw,
            per_block_int_scale=pbis.reshape(scale.size, -1),
            extra=extra,
            style=style,
        )
    if scale.size != offset.size or scale.size == 0:
        raise ctx.fail(where, f"'scale' has {scale.size} entries, 'offset' {offset.size}")
    if enc_type == "PER_TENSOR":
        if scale.size != 1:
            raise ctx.fail(where, f"PER_TENSOR encoding with {scale.size} scales")
        scale, offset = scale.reshape(()), offset.reshape(())
    return Encoding(
        name=name,
        bitwidth=bw,
        is_symmetric=sym,
        scale=scale,
        offset=offset,
        enc_type=enc_type,
        block_size=block_size if enc_type == "PER_BLOCK" else None,
        extra=extra,
        style=style,
    )


def _write_100(ctx: _Ctx, enc: Encoding) -> dict[str, Any]:
    where = enc.name
    st = enc.style
    out: dict[str, Any] = {"name": enc.name}
    if enc.is_float:
        if enc.has_scale:
            raise ctx.fail(where, f"a scaled float encoding ({enc.output_dtype}) cannot be written as 1.0.0")
        out.update({"dtype": "FLOAT", "bw": enc.bitwidth})
        if st.get("enc_type_explicit", True):
            out["enc_type"] = "PER_TENSOR"
        out.update(enc.extra)
        return out
    offset = np.atleast_1d(enc.offset).ravel()
    floor = np.floor(offset)
    shift = offset - floor
    as_int = bool(st.get("int_offset", False))
    scale_list: Any = np.atleast_1d(enc.scale).ravel().tolist()
    if st.get("scale_scalar") and len(scale_list) == 1:
        scale_list = scale_list[0]
    out.update(
        {"dtype": "INT", "enc_type": enc.enc_type, "bw": enc.bitwidth, "is_sym": bool(enc.is_symmetric)}
    )
    if enc.enc_type == "LPBQ":
        assert enc.per_block_int_scale is not None
        out.update(
            {
                "compressed_bw": enc.compressed_bw,
                "scale": scale_list,
                "offset": _tolist(floor, as_int),
                "per_block_int_scale": enc.per_block_int_scale.astype(np.int64).ravel().tolist(),
                "block_size": enc.block_size,
            }
        )
    else:
        out["scale"] = scale_list
        out["offset"] = _tolist(floor, as_int)
        if enc.enc_type == "PER_BLOCK":
            out["block_size"] = enc.block_size
    if np.any(shift != 0) or st.get("zps_explicit"):
        out["zero_point_shift"] = shift.tolist()
    out.update(enc.extra)
    return out


# ------------------------------------------------------------------------------------------
# 2.0.0 / 2.1.0
# ------------------------------------------------------------------------------------------


def _channel_axis_of(shape: tuple[int, ...], block_axis: int) -> int:
    """The channel axis of a blocked 2.x scale: the non-singleton axis that is not the block axis."""
    others = [i for i, d in enumerate(shape) if i != block_axis and d != 1]
    if others:
        return others[0]
    return 1 - block_axis if len(shape) == 2 else (0 if block_axis != 0 else 1)


def _to_channel_major(arr: np.ndarray, axis: int, block_axis: int) -> np.ndarray:
    """Tensor-shaped blocked array -> ``(C, nb)``."""
    moved = np.moveaxis(arr, [axis, block_axis], [0, 1])
    return moved.reshape(moved.shape[0], moved.shape[1])


def _from_channel_major(arr: np.ndarray, rank: int, axis: int, block_axis: int) -> np.ndarray:
    """``(C, nb)`` -> tensor-shaped blocked array of ``rank`` dims."""
    return np.moveaxis(
        arr.reshape(arr.shape[0], arr.shape[1], *([1] * (rank - 2))), [0, 1], [axis, block_axis]
    )


def _parse_2x(ctx: _Ctx, entry: Any, version: str) -> Encoding:
    if not isinstance(entry, dict):
        raise ctx.fail("encodings", f"entries must be objects, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str):
        raise ctx.fail("encodings", f"entry without a string 'name': {json.dumps(entry)[:80]}")
    where = name
    if "bw" in entry:
        raise ctx.fail(where, "has a 1.0.0 'bw' field in a 2.x file")
    od = entry.get("output_dtype")
    if not isinstance(od, str):
        raise ctx.fail(where, f"'output_dtype' must be a string, got {od!r}")
    extra = {k: v for k, v in entry.items() if k not in _KNOWN_2X}
    axis = _int(ctx, where, entry, "axis", required=False)
    block_size = _int(ctx, where, entry, "block_size", required=False)
    style: dict[str, Any] = {}
    bits = dtype_bits(od)
    if bits is None:
        if od not in _FLOAT_BITS:
            raise ctx.fail(where, f"unknown 'output_dtype' {od!r}")
        if "y_scale" not in entry:
            return Encoding(
                name=name,
                dtype="float",
                bitwidth=_FLOAT_BITS[od],
                scale=np.zeros(0),
                offset=np.zeros(0),
                output_dtype=od,
                extra=extra,
            )
        y = _nums(ctx, where, entry["y_scale"], "y_scale")
        style["scale_shape"] = y.shape
        enc_type = "PER_TENSOR" if axis is None else ("PER_BLOCK" if block_size else "PER_CHANNEL")
        return Encoding(
            name=name,
            dtype="float",
            bitwidth=_FLOAT_BITS[od],
            scale=y.reshape(()) if axis is None else y,
            offset=np.zeros(y.shape if axis is not None else ()),
            enc_type=enc_type,
            axis=axis,
            block_size=block_size,
            output_dtype=od,
            extra=extra,
            style=style,
        )
    signed = dtype_is_signed(od)
    half = 2 ** (bits - 1) if signed else 0

    def offset_of(zp_raw: Any, shape: tuple[int, ...]) -> np.ndarray:
        if zp_raw is None:
            return np.full(shape, -float(half))
        zp = _nums(ctx, where, zp_raw, "y_zero_point")
        if zp.size == 1 and int(np.prod(shape)) != 1:
            zp = np.full(shape, float(zp.ravel()[0]))
        if zp.size != int(np.prod(shape)):
            raise ctx.fail(where, f"'y_zero_point' has {zp.size} entries, the scale {int(np.prod(shape))}")
        style["zp_shape"] = np.shape(zp_raw) if isinstance(zp_raw, list) else ()
        style["zp_int"] = _all_ints(zp_raw)
        return -zp.reshape(shape) - half

    zp_raw = entry.get("y_zero_point")
    style["zp_explicit"] = "y_zero_point" in entry
    y_raw = entry.get("y_scale")
    # LPBQ, 2.0.0 spelling
    if "per_block_int_scale" in entry or "per_channel_float_scale" in entry or isinstance(y_raw, dict):
        if block_size is None or axis is None:
            raise ctx.fail(where, "LPBQ encoding needs 'axis' and 'block_size'")
        if isinstance(y_raw, dict):
            meta = y_raw
            if "x" not in meta or "x_scale" not in meta:
                raise ctx.fail(where, "meta encoding 'y_scale' needs 'x' and 'x_scale'")
            pbis = _nums(ctx, where, meta["x"], "y_scale.x")
            pcfs = _nums(ctx, where, meta["x_scale"], "y_scale.x_scale")
            ch_axis = meta.get("axis")
            if ch_axis is not None and (isinstance(ch_axis, bool) or not isinstance(ch_axis, int)):
                raise ctx.fail(where, "'y_scale.axis' must be an integer")
            style["lpbq_form"] = "meta"
            style["meta_extra"] = {k: v for k, v in meta.items() if k not in ("x", "x_scale", "axis")}
            style["pcfs_shape"] = pcfs.shape
        else:
            if "per_block_int_scale" not in entry or "per_channel_float_scale" not in entry:
                raise ctx.fail(where, "LPBQ needs both 'per_block_int_scale' and 'per_channel_float_scale'")
            pbis = _nums(ctx, where, entry["per_block_int_scale"], "per_block_int_scale")
            pcfs = _nums(ctx, where, entry["per_channel_float_scale"], "per_channel_float_scale")
            ch_axis = None
            style["pcfs_shape"] = pcfs.shape
        if pbis.ndim < 2:
            raise ctx.fail(
                where, "LPBQ 'per_block_int_scale' must be a nested list (one axis per tensor axis)"
            )
        rank = pbis.ndim
        b_axis = axis % rank
        c_axis = _channel_axis_of(pbis.shape, b_axis) if ch_axis is None else ch_axis % rank
        pbis_cm = _to_channel_major(pbis, c_axis, b_axis)
        if pcfs.size != pbis_cm.shape[0]:
            raise ctx.fail(where, f"{pcfs.size} per-channel scales for {pbis_cm.shape[0]} channels")
        if zp_raw is not None:
            raise ctx.fail(where, "LPBQ with a zero point is not supported")
        return Encoding(
            name=name,
            bitwidth=2 * bits,
            is_symmetric=True,
            scale=pcfs.ravel(),
            offset=np.full(pcfs.size, -(2.0 ** (2 * bits - 1))),
            enc_type="LPBQ",
            axis=c_axis,
            block_axis=b_axis,
            block_size=block_size,
            rank=rank,
            compressed_bw=bits,
            per_block_int_scale=pbis_cm,
            output_dtype=od,
            extra=extra,
            style=style,
        )
    if y_raw is None:
        raise ctx.fail(where, "missing 'y_scale'")
    y = _nums(ctx, where, y_raw, "y_scale")
    style["scale_shape"] = y.shape
    if axis is None:
        if y.size != 1:
            raise ctx.fail(where, f"{y.size} scales but no 'axis'")
        if block_size is not None:
            raise ctx.fail(where, "'block_size' without 'axis'")
        return Encoding(
            name=name,
            bitwidth=bits,
            is_symmetric=signed,
            scale=y.reshape(()),
            offset=offset_of(zp_raw, ()).reshape(()),
            output_dtype=od,
            extra=extra,
            style=style,
        )
    if block_size is None:
        if y.ndim != 1:
            raise ctx.fail(where, "a per-channel 'y_scale' must be a flat list")
        return Encoding(
            name=name,
            bitwidth=bits,
            is_symmetric=signed,
            scale=y,
            offset=offset_of(zp_raw, y.shape),
            enc_type="PER_CHANNEL",
            axis=axis if axis >= 0 else None,
            output_dtype=od,
            extra=extra,
            style={**style, "neg_axis": axis} if axis < 0 else style,
        )
    if y.ndim < 2:
        raise ctx.fail(where, "a per-block 'y_scale' must be a nested list (one axis per tensor axis)")
    rank = y.ndim
    b_axis = axis % rank
    c_axis = _channel_axis_of(y.shape, b_axis)
    offs = offset_of(zp_raw, y.shape)
    return Encoding(
        name=name,
        bitwidth=bits,
        is_symmetric=signed,
        scale=_to_channel_major(y, c_axis, b_axis),
        offset=_to_channel_major(offs, c_axis, b_axis),
        enc_type="PER_BLOCK",
        axis=c_axis,
        block_axis=b_axis,
        block_size=block_size,
        rank=rank,
        output_dtype=od,
        extra=extra,
        style=style,
    )


def _write_2x(ctx: _Ctx, enc: Encoding, version: str, kind: str | None) -> dict[str, Any] | None:
    """One 2.x entry, or None for a plain-cast float that 2.x does not list (AIMET omits fp16)."""
    where = enc.name
    st = enc.style
    out: dict[str, Any] = {"name": enc.name}
    if enc.is_float:
        od = enc.output_dtype or {16: "float16"}.get(enc.bitwidth)
        if not enc.has_scale:
            if enc.output_dtype is None:
                return None
            out["output_dtype"] = od
            out.update(enc.extra)
            return out
        out["output_dtype"] = od
        y = enc.scale
        out["y_scale"] = float(y) if y.ndim == 0 else y.tolist()
        if enc.axis is not None:
            out["axis"] = enc.axis
        if enc.block_size is not None:
            out["block_size"] = enc.block_size
        out.update(enc.extra)
        return out

    if enc.enc_type == "LPBQ":
        assert enc.per_block_int_scale is not None
        if enc.axis is None or enc.block_axis is None or enc.rank is None:
            raise ctx.fail(where, "LPBQ needs its channel/block axes (pass the model) to be written as 2.x")
        od = enc.output_dtype or f"int{enc.compressed_bw}"
        pbis = _from_channel_major(enc.per_block_int_scale, enc.rank, enc.axis, enc.block_axis)
        pcfs = _from_channel_major(enc.scale.reshape(-1, 1), enc.rank, enc.axis, enc.block_axis)
        pcfs_shape = st.get("pcfs_shape")
        out["output_dtype"] = od
        if version == "2.1.0" or (st.get("lpbq_form") == "meta" and version != "2.0.0"):
            xs = (
                enc.scale.reshape(pcfs_shape)
                if pcfs_shape and np.prod(pcfs_shape) == enc.scale.size
                else enc.scale
            )
            out["y_scale"] = {
                "x": pbis.astype(np.int64).tolist(),
                "x_scale": xs.tolist(),
                "axis": enc.axis,
                **st.get("meta_extra", {}),
            }
        else:
            if pcfs_shape and int(np.prod(pcfs_shape)) == enc.scale.size:
                pcfs = enc.scale.reshape(pcfs_shape)
            out["per_channel_float_scale"] = pcfs.tolist()
            out["per_block_int_scale"] = pbis.astype(np.int64).tolist()
        out["axis"] = enc.block_axis
        out["block_size"] = enc.block_size
        out.update(enc.extra)
        return out

    od = enc.output_dtype
    if od is None:
        # AIMET's 2.x export: params keep their signedness, activations are forced unsigned.
        signed = enc.is_symmetric and kind != "activation"
        od = f"int{enc.bitwidth}" if signed else f"uint{enc.bitwidth}"
    zp = enc.zero_point(od)
    if enc.enc_type == "PER_TENSOR":
        shape = st.get("scale_shape", ())
        y_scale: Any = float(enc.scale) if shape == () else np.reshape(enc.scale, shape).tolist()
        zshape = st.get("zp_shape", shape)
        zp_val: Any = np.reshape(zp, zshape) if int(np.prod(zshape)) == 1 else zp
    elif enc.enc_type == "PER_CHANNEL":
        if enc.axis is None and "neg_axis" not in st:
            raise ctx.fail(
                where, "per-channel encoding needs its channel axis (pass the model) to be written as 2.x"
            )
        y_scale = enc.scale.tolist()
        zp_val = zp
    else:  # PER_BLOCK
        if enc.axis is None or enc.block_axis is None or enc.rank is None or enc.scale.ndim != 2:
            raise ctx.fail(
                where, "per-block encoding needs its axes and shape (pass the model) to be written as 2.x"
            )
        y_scale = _from_channel_major(enc.scale, enc.rank, enc.axis, enc.block_axis).tolist()
        zp_val = _from_channel_major(np.asarray(zp), enc.rank, enc.axis, enc.block_axis)
    out["output_dtype"] = od
    out["y_scale"] = y_scale
    zp_arr = np.asarray(zp_val, dtype=np.float64)
    if st.get("zp_explicit") or np.any(zp_arr != 0):
        as_int = st.get("zp_int", True)
        out["y_zero_point"] = _pyval(float(zp_arr), as_int) if zp_arr.ndim == 0 else _tolist(zp_arr, as_int)
    if enc.enc_type == "PER_CHANNEL":
        out["axis"] = st.get("neg_axis", enc.axis) if enc.axis is None else enc.axis
    elif enc.enc_type == "PER_BLOCK":
        out["axis"] = enc.block_axis
        out["block_size"] = enc.block_size
    out.update(enc.extra)
    return out


# ------------------------------------------------------------------------------------------
# whole files
# ------------------------------------------------------------------------------------------


def _infer_version(ctx: _Ctx, data: dict[str, Any]) -> str:
    if "encodings" in data:
        return "2.0.0"
    sections = [data.get("activation_encodings"), data.get("param_encodings")]
    if any(isinstance(s, dict) for s in sections):
        return "0.6.1"
    if any(isinstance(s, list) for s in sections):
        return "1.0.0"
    raise ctx.fail("top level", "no 'version' and no encodings sections")


def _heuristic_params(enc: Encoding) -> bool:
    """Without a model, a 2.x entry is a param if its granularity or dtype says so."""
    if enc.is_float:
        return False
    return enc.enc_type != "PER_TENSOR" or enc.qdtype() == "int32"


#: Integer widths the formats use (AIMET writes 2-bit in its 1.0.0 examples; QNN takes 4, 8, 16, 32).
INT_BITWIDTHS = (2, 4, 8, 16, 32)
FLOAT_BITWIDTHS = (8, 16, 32)


def _check_values(ctx: _Ctx, enc: Encoding) -> None:
    """Values a quantizer can use: a known width, finite positive scales, zero points on the grid.

    A NaN or zero scale would silently turn every value of the tensor into NaN or its zero point."""
    if enc.is_float:
        if enc.bitwidth not in FLOAT_BITWIDTHS:
            raise ctx.fail(enc.name, f"float bitwidth {enc.bitwidth} (expected one of {FLOAT_BITWIDTHS})")
        if not enc.has_scale:
            return
    if not enc.is_float and enc.bitwidth not in INT_BITWIDTHS:
        raise ctx.fail(enc.name, f"bitwidth {enc.bitwidth} (expected one of {INT_BITWIDTHS})")
    if enc.enc_type == "LPBQ" and enc.compressed_bw not in INT_BITWIDTHS:
        raise ctx.fail(enc.name, f"compressed bitwidth {enc.compressed_bw} (expected one of {INT_BITWIDTHS})")
    scale = np.asarray(enc.effective_scale(), np.float64)
    if scale.size and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        bad = scale[~(np.isfinite(scale) & (scale > 0))].reshape(-1)[0]
        raise ctx.fail(enc.name, f"scale {bad} (scales must be finite and > 0)")
    for key in ("offset", "min", "max"):
        values = getattr(enc, key)
        if values is not None and not np.all(np.isfinite(np.asarray(values, np.float64))):
            raise ctx.fail(enc.name, f"{key} is not finite")
    if enc.is_float:
        return
    qdtype = enc.qdtype()
    bits = dtype_bits(qdtype)
    if bits is None:
        raise ctx.fail(enc.name, f"unknown quantized dtype {qdtype!r}")
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if dtype_is_signed(qdtype) else (0, 2**bits - 1)
    zp = np.asarray(enc.zero_point(qdtype), np.float64)
    if zp.size and (zp.min() < lo or zp.max() > hi):
        raise ctx.fail(
            enc.name, f"offset / zero point {zp.reshape(-1)[0]:g} outside the {qdtype} grid [{lo}, {hi}]"
        )


def _is_quantizer_map(data: dict[str, Any]) -> bool:
    """aimet-onnx's per-adapter LoRA file (``export_for_deployment``): ``{name: 1.0.0 entry}``, no sections."""
    return (
        bool(data)
        and "version" not in data
        and all(isinstance(v, dict) and "enc_type" in v for v in data.values())
    )


def _parse_quantizer_map(ctx: _Ctx, data: dict[str, Any], param_names: set[str] | None) -> EncodingSet:
    """A quantizer map read as a 1.0.0 file: params are the model's initializers (or, without a
    model, the per-channel / per-block / int32 entries, as for 2.x)."""
    es = EncodingSet(version="1.0.0", style={"keys": ["version", "activation_encodings", "param_encodings"]})
    for name, entry in data.items():
        enc = _parse_100(ctx, {"name": name, **entry}, "encodings")
        _check_values(ctx, enc)
        is_param = name in param_names if param_names is not None else _heuristic_params(enc)
        (es.params if is_param else es.activations)[name] = enc
    return es


def parse_encodings(data: Any, *, source: str = "<dict>", param_names: set[str] | None = None) -> EncodingSet:
    """Build an :class:`EncodingSet` from a loaded JSON document.

    ``param_names`` (the model's initializers) classifies 2.x entries into params/activations;
    without it, per-channel/per-block/LPBQ and int32 entries count as params.
    """
    ctx = _Ctx(source)
    if not isinstance(data, dict):
        raise ctx.fail("top level", f"must be a JSON object, got {type(data).__name__}")
    if _is_quantizer_map(data):
        return _parse_quantizer_map(ctx, data, param_names)
    version = data.get("version")
    style: dict[str, Any] = {"keys": list(data)}
    if version is None:
        version = _infer_version(ctx, data)
        style["no_version"] = True
    if not isinstance(version, str) or version not in VERSIONS:
        raise ctx.fail("version", f"unsupported version {version!r}; expected one of {', '.join(VERSIONS)}")
    sections = ("encodings",) if version.startswith("2.") else ("activation_encodings", "param_encodings")
    extra = {k: v for k, v in data.items() if k not in (*sections, "version")}
    es = EncodingSet(version=version, extra=extra, style=style)
    seen: set[str] = set()

    def add(target: dict[str, Encoding], enc: Encoding) -> None:
        if enc.name in seen:
            raise ctx.fail(enc.name, "duplicate encoding name")
        _check_values(ctx, enc)
        seen.add(enc.name)
        target[enc.name] = enc

    if version == "0.6.1":
        for section, target in (("activation_encodings", es.activations), ("param_encodings", es.params)):
            body = data.get(section, {})
            if not isinstance(body, dict):
                raise ctx.fail(section, f"must be an object in 0.6.1, got {type(body).__name__}")
            for name, entries in body.items():
                add(target, _parse_061(ctx, name, entries))
    elif version == "1.0.0":
        for section, target in (("activation_encodings", es.activations), ("param_encodings", es.params)):
            body = data.get(section, [])
            if not isinstance(body, list):
                raise ctx.fail(section, f"must be a list in 1.0.0, got {type(body).__name__}")
            for entry in body:
                add(target, _parse_100(ctx, entry, section))
    else:
        body = data.get("encodings", [])
        if not isinstance(body, list):
            raise ctx.fail("encodings", f"must be a list, got {type(body).__name__}")
        es.order = []
        for entry in body:
            enc = _parse_2x(ctx, entry, version)
            is_param = enc.name in param_names if param_names is not None else _heuristic_params(enc)
            add(es.params if is_param else es.activations, enc)
            es.order.append(enc.name)
    for section in sections:
        if section not in data:
            style.setdefault("missing_sections", []).append(section)
    return es


def dump_encodings(
    es: EncodingSet, version: str | None = None, *, source: str = "<memory>"
) -> dict[str, Any]:
    """The JSON document for ``es`` in ``version`` (default: the version it was read as).

    Writing another version converts; 1.0.0/0.6.1 -> 2.x needs the channel axes resolved first
    (:func:`convert_encodings` with a model).
    """
    ctx = _Ctx(source)
    version = version or es.version
    if version not in VERSIONS:
        raise ctx.fail("version", f"unsupported version {version!r}; expected one of {', '.join(VERSIONS)}")
    same_family = version.split(".")[0] == es.version.split(".")[0] and (
        version.startswith("2.") or version == es.version
    )
    body: dict[str, Any] = {}
    if version.startswith("2."):
        entries = []
        for name, enc in es.items():
            item = _write_2x(ctx, enc, version, es.kind_of(name))
            if item is None:
                logger.info("plain-cast float encoding %s has no 2.x form; omitted", name)
                continue
            entries.append(item)
        body["encodings"] = entries
    elif version == "1.0.0":
        body["activation_encodings"] = [_write_100(ctx, e) for e in es.activations.values()]
        body["param_encodings"] = [_write_100(ctx, e) for e in es.params.values()]
    else:
        body["activation_encodings"] = {n: _write_061(ctx, e) for n, e in es.activations.items()}
        body["param_encodings"] = {n: _write_061(ctx, e) for n, e in es.params.items()}
    if same_family:
        for section in es.style.get("missing_sections", []):
            if section in body and not body[section]:
                del body[section]
    parts: dict[str, Any] = {**es.extra, **body}
    if not (same_family and es.style.get("no_version")):
        parts["version"] = version
    order = [k for k in es.style.get("keys", []) if k in parts] if same_family else []
    if not order:
        order = [k for k in ("producer", "version") if k in parts]
    for k in parts:
        if k not in order:
            order.append(k)
    return {k: parts[k] for k in order}


def convert_encodings(
    es: EncodingSet,
    version: str,
    *,
    model: ModelLike | None = None,
    channel_axes: Mapping[str, int] | None = None,
) -> EncodingSet:
    """A copy of ``es`` as ``version``, with axes resolved from ``model`` / ``channel_axes``.

    Raises UserError when the target cannot express an encoding (per-block/LPBQ in 0.6.1, a
    scaled float in 1.0.0) or an axis is unknown for 2.x. Conversion changes spelling only: the
    quantization grid of every tensor stays identical.
    """
    from mha2sha.encodings.axes import resolve_axes

    out = es.copy()
    if model is not None or channel_axes is not None:
        resolve_axes(out, model=model, channel_axes=channel_axes)
    doc = dump_encodings(out, version)  # validates that every entry is expressible
    new = parse_encodings(doc, source=f"<{version}>", param_names=set(out.params))
    # Keep what the target spelling cannot carry but the model knows (axes, rank).
    for name, enc in new.items():
        old = out.get(name)
        if old is not None:
            for attr in ("axis", "block_axis", "rank"):
                if getattr(enc, attr) is None:
                    setattr(enc, attr, getattr(old, attr))
            if enc.enc_type == "PER_BLOCK" and enc.scale.ndim == 1 and old.scale.ndim == 2:
                enc.resolve_blocks(old.scale.shape[0])
    new.version = version
    return new


def load_encodings(
    path: str | os.PathLike[str],
    *,
    model: ModelLike | None = None,
    resolve: bool = True,
    param_names: set[str] | None = None,
) -> EncodingSet:
    """Read an AIMET encodings file. With ``model`` (onnx_ir.Model), 2.x entries are classified
    by the model's initializers and channel axes are resolved for 0.6.1/1.0.0 (unless not
    ``resolve``: the caller resolves them, e.g. against other shapes). ``param_names`` (the
    model's initializer names, when the caller has them) classifies without a model.

    Besides the versioned files, aimet-onnx's per-adapter LoRA export is read: a bare
    ``{name: 1.0.0 entry}`` mapping (``export_for_deployment``), as a 1.0.0 file."""
    path = os.fspath(path)
    ctx = _Ctx(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise UserError(f"encodings {path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text, object_pairs_hook=_json_pairs(ctx))
    except json.JSONDecodeError as exc:
        raise UserError(
            f"encodings {path}: malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    version = data.get("version", "") if isinstance(data, dict) else ""
    flat = str(version).startswith("2.") or (isinstance(data, dict) and _is_quantizer_map(data))
    if not flat:
        param_names = None
    elif param_names is None and model is not None:
        from mha2sha.encodings.axes import initializer_names

        param_names = initializer_names(model)
    es = parse_encodings(data, source=path, param_names=param_names)
    if model is not None:
        from mha2sha.encodings.axes import resolve_axes

        _require_same_model(ctx, es, model)
        if resolve:
            resolve_axes(es, model=model)
    return es


def _require_same_model(ctx: _Ctx, es: EncodingSet, model: Any) -> None:
    """Encodings whose names mostly miss the model were made for another model: refuse them
    (propagating the few that match would write a near-empty, useless encodings file)."""
    from mha2sha.encodings.axes import as_ir_model
    from mha2sha.io.names import tensor_names

    names = [name for name, _ in es.items()]
    present = tensor_names(as_ir_model(model))
    missing = [n for n in names if n not in present]
    if names and len(missing) * 2 > len(names):
        raise ctx.fail(
            "names",
            f"{len(missing)} of {len(names)} encodings name no tensor of the model "
            f"(e.g. {', '.join(repr(n) for n in missing[:3])}): they were made for another model",
        )


def _write_json(doc: Any, f: Any, depth: int = 0) -> None:
    """``doc`` as indented JSON down to its sections' entries, each entry on one line.

    The same document as ``json.dump(doc, f, indent=4)``, several times faster: Python's JSON encoder
    only uses its C implementation without ``indent``, and an encodings file of a 1B model holds
    millions of numbers. One entry per line also reads (and diffs) well.
    """
    pad = " " * 4 * (depth + 1)
    if depth < 2 and isinstance(doc, dict) and doc:
        f.write("{\n")
        for i, (key, value) in enumerate(doc.items()):
            f.write(f"{pad}{json.dumps(key)}: ")
            _write_json(value, f, depth + 1)
            f.write(",\n" if i < len(doc) - 1 else "\n")
        f.write(" " * 4 * depth + "}")
    elif depth < 2 and isinstance(doc, list) and doc:
        f.write("[\n")
        for i, value in enumerate(doc):
            f.write(pad)
            _write_json(value, f, depth + 1)
            f.write(",\n" if i < len(doc) - 1 else "\n")
        f.write(" " * 4 * depth + "]")
    else:
        f.write(json.dumps(doc, allow_nan=False))  # values are validated when read


def save_encodings(
    es: EncodingSet,
    path: str | os.PathLike[str],
    version: str | None = None,
    *,
    model: ModelLike | None = None,
    channel_axes: Mapping[str, int] | None = None,
) -> None:
    """Write ``es`` to ``path`` atomically (temp file + ``os.replace``), as ``version`` or its own."""
    path = os.fspath(path)
    target = es
    if version is not None and version != es.version and (model is not None or channel_axes is not None):
        target = convert_encodings(es, version, model=model, channel_axes=channel_axes)
    doc = dump_encodings(target, version, source=path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # like any file this tool writes (mkstemp makes it 0600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            _write_json(doc, f)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
