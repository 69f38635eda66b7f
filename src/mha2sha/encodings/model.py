"""One in-memory model for AIMET quantization encodings of every file version.

Conventions (the same for every version, so propagation and QDQ never branch on the format):

- ``offset`` is AIMET's *unsigned-grid* offset, the number 0.6.1 and 1.0.0 files store:
  ``q = clamp(round(x / scale) - offset, 0, 2**bw - 1)`` and ``x' = (q + offset) * scale``.
  So the ONNX zero point is ``-offset`` for an unsigned dtype and ``-offset - 2**(bw-1)`` for a
  signed one (symmetric int8: offset -128 <-> int8 zero point 0).
- ``scale``/``offset`` shapes: per-tensor ``()``, per-channel ``(C,)``, per-block ``(C, nb)``
  channel-major (the 1.0.0 order), or flat ``(C*nb,)`` while ``C`` is unknown (a 1.0.0 file
  read without the model). LPBQ: ``scale`` is the per-channel float scale ``(C,)`` and
  ``per_block_int_scale`` is ``(C, nb)``.
- ``axis``/``block_axis`` are real tensor axes (non-negative) when known: 2.x files store them,
  for 0.6.1/1.0.0 they come from how the weight is consumed (see :mod:`.axes`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mha2sha.graph import DATA_MOVEMENT_OPS, is_op

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = [
    "copied_activation",
    "VERSIONS",
    "Encoding",
    "EncodingSet",
    "dtype_bits",
    "dtype_is_signed",
]

#: Versions read and written. 2.1.0 differs from 2.0.0 only in how LPBQ is spelled.
VERSIONS = ("0.6.1", "1.0.0", "2.0.0", "2.1.0")

_INT_DTYPE = re.compile(r"(u?)int(\d+)")


def dtype_is_signed(dtype: str) -> bool:
    """``"int8"`` -> True, ``"uint16"`` -> False (integer dtype names only)."""
    m = _INT_DTYPE.fullmatch(dtype)
    if not m:
        raise ValueError(f"not an integer dtype: {dtype!r}")
    return m.group(1) == ""


def dtype_bits(dtype: str) -> int | None:
    """Bit width of an integer dtype name, None for anything else."""
    m = _INT_DTYPE.fullmatch(dtype)
    return int(m.group(2)) if m else None


_ARRAY_FIELDS = ("scale", "offset", "per_block_int_scale", "zero_point_shift", "min", "max")


@dataclasses.dataclass(eq=False)
class Encoding:
    """One tensor's quantization encoding (see the module docstring for the conventions).

    ``style`` and ``extra`` exist only so a file read and written back is identical: ``extra``
    holds per-encoding keys this model does not interpret, ``style`` spelling details (scalar vs
    one-element list, int vs float offsets, an explicit all-zero zero point, ...).
    """

    name: str
    dtype: Literal["int", "float"] = "int"
    bitwidth: int = 8
    is_symmetric: bool = False
    scale: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((), np.float64))
    offset: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((), np.float64))
    enc_type: str = "PER_TENSOR"
    axis: int | None = None
    block_axis: int | None = None
    block_size: int | None = None
    rank: int | None = None
    compressed_bw: int | None = None
    per_block_int_scale: np.ndarray | None = None
    zero_point_shift: np.ndarray | None = None
    output_dtype: str | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    style: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- shape helpers ---------------------------------------------------------------------

    @property
    def is_float(self) -> bool:
        return self.dtype == "float"

    @property
    def has_scale(self) -> bool:
        """False for plain-cast float encodings (fp16), which carry no scale."""
        return self.scale is not None and np.size(self.scale) > 0

    @property
    def num_channels(self) -> int | None:
        """Channels along ``axis`` (None for per-tensor, or a flat 1.0.0 per-block not yet resolved)."""
        if self.enc_type == "PER_TENSOR":
            return None
        if self.enc_type == "PER_BLOCK" and self.scale.ndim != 2:
            return None
        return int(self.scale.shape[0])

    @property
    def num_blocks(self) -> int | None:
        """Blocks per channel for per-block / LPBQ encodings."""
        if self.enc_type == "LPBQ" and self.per_block_int_scale is not None:
            return int(self.per_block_int_scale.shape[-1]) if self.per_block_int_scale.ndim == 2 else None
        if self.enc_type == "PER_BLOCK" and self.scale.ndim == 2:
            return int(self.scale.shape[1])
        return None

    def resolve_blocks(self, num_channels: int) -> None:
        """Give a flat per-block layout its ``(C, nb)`` shape once ``C`` is known."""
        if self.enc_type == "PER_BLOCK" and self.scale.ndim == 1:
            if self.scale.size % num_channels:
                raise ValueError(
                    f"{self.name}: {self.scale.size} block scales do not split into {num_channels} channels"
                )
            self.scale = self.scale.reshape(num_channels, -1)
            self.offset = self.offset.reshape(num_channels, -1)
            if self.zero_point_shift is not None:
                self.zero_point_shift = self.zero_point_shift.reshape(num_channels, -1)

    # -- quantization parameters -------------------------------------------------------------

    def qdtype(self) -> str:
        """The integer dtype of the quantized tensor: 2.x ``output_dtype`` if read, else by symmetry."""
        if self.output_dtype is not None and self.output_dtype.startswith(("int", "uint")):
            return self.output_dtype
        if self.enc_type == "LPBQ":
            return f"int{self.compressed_bw}"
        return f"int{self.bitwidth}" if self.is_symmetric else f"uint{self.bitwidth}"

    def effective_scale(self) -> np.ndarray:
        """Scale per element group (LPBQ: per_block_int_scale * per-channel scale, in float32 like ORT)."""
        if self.enc_type == "LPBQ":
            assert self.per_block_int_scale is not None
            return self.per_block_int_scale.astype(np.float32) * self.scale.astype(np.float32)[:, None]
        return self.scale

    def zero_point(self, dtype: str | None = None) -> np.ndarray:
        """ONNX zero point for ``dtype`` (default :meth:`qdtype`), from the unsigned-grid offset."""
        dtype = dtype or self.qdtype()
        if self.enc_type == "LPBQ":
            assert self.per_block_int_scale is not None
            return np.zeros(self.per_block_int_scale.shape, np.int64)
        bits = dtype_bits(dtype)
        assert bits is not None
        zp = -self.offset
        if dtype_is_signed(dtype):
            zp = zp - 2 ** (bits - 1)
        if self.zero_point_shift is not None:
            zp = zp - self.zero_point_shift
        return zp

    def renamed(self, name: str) -> Encoding:
        """A copy under another tensor name (how per-head copies are made): its own arrays and
        ``extra`` / ``style`` dicts (their values are replaced, never changed in place, so shared)."""
        new = copy.copy(self)
        new.name = name
        for field in _ARRAY_FIELDS:
            value = getattr(self, field)
            if isinstance(value, np.ndarray):
                setattr(new, field, value.copy())
        new.extra = dict(self.extra)
        new.style = dict(self.style)
        return new

    def with_axes(self, axis_map: dict[int, int], rank: int) -> Encoding:
        """A copy for the same numbers laid out in another tensor shape (2.x states the axes).

        For a layout change that keeps the channel order, e.g. a MatMul weight ``[in, out]``
        becoming a Conv weight ``[out, in, 1, 1]``: ``with_axes({1: 0, 0: 1}, rank=4)``.
        """
        new = copy.deepcopy(self)
        if new.axis is not None:
            new.axis = axis_map.get(new.axis, new.axis)
        if new.block_axis is not None:
            new.block_axis = axis_map.get(new.block_axis, new.block_axis)
        new.rank = rank
        if new.enc_type == "PER_BLOCK":
            new.style.pop("scale_shape", None)  # the nested shape follows the new layout
        new.style.pop("pcfs_shape", None)
        return new

    def same_numbers(self, other: Encoding) -> bool:
        """True if both encodings quantize identically (names and spelling ignored)."""

        def eq(a: np.ndarray | None, b: np.ndarray | None) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return bool(np.array_equal(np.asarray(a).ravel(), np.asarray(b).ravel()))

        return (
            self.dtype == other.dtype
            and self.bitwidth == other.bitwidth
            and self.enc_type == other.enc_type
            and self.block_size == other.block_size
            and self.compressed_bw == other.compressed_bw
            and eq(self.scale, other.scale)
            and (self.enc_type == "LPBQ" or self.is_float or eq(self.offset, other.offset))
            and eq(self.per_block_int_scale, other.per_block_int_scale)
        )


@dataclasses.dataclass
class EncodingSet:
    """A whole encodings file: both sections plus every other top-level field verbatim.

    2.x files have one flat list and no param/activation split: their entries are classified by
    the model when one is given (initializers -> params), else by a heuristic (see
    :func:`mha2sha.encodings.formats.parse_encodings`). ``order`` keeps the flat list's order so
    a 2.x file round-trips; ``extra`` keeps ``quantizer_args``, ``excluded_layers``,
    ``producer``... in their original order.
    """

    version: str
    activations: dict[str, Encoding] = dataclasses.field(default_factory=dict)
    params: dict[str, Encoding] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    order: list[str] | None = None
    style: dict[str, Any] = dataclasses.field(default_factory=dict)

    def get(self, name: str) -> Encoding | None:
        return self.params.get(name) or self.activations.get(name)

    def kind_of(self, name: str) -> Literal["param", "activation"] | None:
        if name in self.params:
            return "param"
        if name in self.activations:
            return "activation"
        return None

    def __contains__(self, name: object) -> bool:
        return name in self.params or name in self.activations

    def __len__(self) -> int:
        return len(self.params) + len(self.activations)

    def items(self) -> Iterator[tuple[str, Encoding]]:
        """All encodings: in file order for 2.x, else params then activations."""
        for name in self.names():
            enc = self.get(name)
            assert enc is not None
            yield name, enc

    def names(self) -> list[str]:
        seen: set[str] = set()
        out: list[str] = []
        for name in [*(self.order or []), *self.params, *self.activations]:
            if name in seen or name not in self:
                continue
            seen.add(name)
            out.append(name)
        return out

    def copy(self) -> EncodingSet:
        return copy.deepcopy(self)

    def shallow(self) -> EncodingSet:
        """A set of its own (sections, order) holding the same :class:`Encoding` objects."""
        order = list(self.order) if self.order is not None else None
        return EncodingSet(self.version, dict(self.activations), dict(self.params), self.extra, order, self.style)


def copied_activation(value: ir.Value | None, encodings: EncodingSet) -> str | None:
    """The encoded activation ``value`` is (``value`` itself, or what a chain of data movement
    copied into it), following producers back; None when a computing op comes first."""
    seen: set[int] = set()
    while value is not None and id(value) not in seen:
        seen.add(id(value))
        if value.name in encodings.activations:
            return value.name
        node = value.producer()
        if node is None or not is_op(node, DATA_MOVEMENT_OPS):
            return None
        value = node.inputs[0] if node.inputs else None
    return None
