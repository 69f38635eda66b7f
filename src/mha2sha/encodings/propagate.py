"""Carry AIMET encodings from the MHA model to its per-head (SHA) tensors.

Rules (DESIGN.md section 3), applied to every tensor in the :class:`SplitRecord`:

- per-tensor encodings (activations and params) are **copied** to every piece: a weight slice
  keeps the MHA scale, never a re-derived one (re-deriving moved HTP output by 387 LSB);
- per-channel / per-block / LPBQ encodings are **sliced**: a range on the channel axis takes those
  channels' scales/offsets; a range on the block axis takes whole blocks (an unaligned cut cannot be
  expressed and is reported); a range on any other axis (e.g. the input rows of ``W_o`` handed to
  each head) leaves every output channel in the piece, so the encoding is copied whole;
- encodings of tensors that survive unchanged are kept; encodings naming a tensor that no longer
  exists in the output model are dropped and listed, so every written encoding names a real tensor;
- a per-head tensor standing for several originals with different encodings (a packed-QKV Slice
  output and the projection output it cuts) has been given one requantisation node per extra
  encoding by :func:`mha2sha.encodings.requant.requantize` before this runs; the originals'
  encodings land on those nodes (``requantized`` in the report). Without that step the first
  encoding is kept and the conflict is reported;
- a head join (the ``Concat`` of all pieces of one split tensor, e.g. before ``o_proj``) without an
  encoding of its own takes the encoding its pieces are data-movement copies of, when all pieces
  agree: the MHA file may not encode the Transpose/Reshape the join replaces (ORT propagates the
  quantization through data movement there, not through a Concat), and joining identically
  quantized tensors is exact, so the numbers cannot change.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from mha2sha.encodings.axes import AxisPair, ModelLike, as_ir_model, channel_axes, tensor_shapes
from mha2sha.encodings.model import Encoding, EncodingSet, copied_activation
from mha2sha.errors import UserError
from mha2sha.graph import is_op
from mha2sha.io.names import tensor_names
from mha2sha.split.record import SplitRecord, TensorSplit

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = [
    "CoverageReport",
    "EncodingCoverageError",
    "OutputFacts",
    "output_facts",
    "pad_encoding",
    "propagate",
    "slice_encoding",
]

logger = logging.getLogger(__name__)


class EncodingCoverageError(UserError):
    """Strict propagation found quantized tensors whose per-head counterparts are not encoded."""


@dataclasses.dataclass
class CoverageReport:
    """What propagation did: the encodings stage's record (the report shows it as a table)."""

    mha_encoded: list[str] = dataclasses.field(default_factory=list)
    sha_encoded: list[str] = dataclasses.field(default_factory=list)
    missing: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    unknown: list[str] = dataclasses.field(default_factory=list)
    unencoded_splits: list[str] = dataclasses.field(default_factory=list)
    kept: list[str] = dataclasses.field(default_factory=list)
    folded: dict[str, str] = dataclasses.field(default_factory=dict)  # vanished data movement -> source
    joined: dict[str, str] = dataclasses.field(default_factory=dict)  # head-join Concat -> its pieces' source
    # per-head tensor of a requantisation node (encodings.requant) -> the original whose encoding it carries
    requantized: dict[str, str] = dataclasses.field(default_factory=dict)
    # per-head tensor standing for originals with different encodings, only one of which it carries
    # (requantisation not applied): the quantized SHA model then differs from the MHA one
    conflicts: dict[str, str] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No gap: every quantized MHA tensor has all its per-head tensors encoded, nothing dropped,
        no per-head tensor short of a requantisation its originals call for."""
        return not self.missing and not self.dropped and not self.conflicts

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "counts": {
                "mha_encoded": len(self.mha_encoded),
                "sha_encoded": len(self.sha_encoded),
                "missing": len(self.missing),
                "dropped": len(self.dropped),
                "unknown": len(self.unknown),
                "unencoded_splits": len(self.unencoded_splits),
                "kept": len(self.kept),
                "folded": len(self.folded),
                "joined": len(self.joined),
                "requantized": len(self.requantized),
                "conflicts": len(self.conflicts),
            },
            "mha_encoded": list(self.mha_encoded),
            "sha_encoded": list(self.sha_encoded),
            "missing": dict(self.missing),
            "dropped": dict(self.dropped),
            "unknown": list(self.unknown),
            "unencoded_splits": list(self.unencoded_splits),
            "kept": list(self.kept),
            "folded": dict(self.folded),
            "joined": dict(self.joined),
            "requantized": dict(self.requantized),
            "conflicts": dict(self.conflicts),
            "warnings": list(self.warnings),
        }


def _ranges_ok(shape: tuple[int, ...], ranges: tuple[tuple[int, int, int], ...]) -> str | None:
    for axis, start, stop in ranges:
        if not -len(shape) <= axis < len(shape):
            return f"range axis {axis} out of rank {len(shape)}"
        dim = shape[axis]
        if not 0 <= start < stop <= dim:
            return f"range {start}:{stop} outside axis {axis} of size {dim}"
    return None


def slice_encoding(
    enc: Encoding, shape: tuple[int, ...], ranges: tuple[tuple[int, int, int], ...], name: str
) -> Encoding | str:
    """The encoding of ``original[ranges]`` under ``name``, or the reason it cannot be expressed.

    ``enc.axis`` (and ``block_axis`` for blocked encodings) must already be resolved.
    """
    bad = _ranges_ok(shape, ranges)
    if bad:
        return bad
    if enc.enc_type == "PER_TENSOR" or not enc.has_scale:
        return enc.renamed(name)
    if enc.axis is None:
        return "channel axis unknown (no model / channel_axes for this weight)"
    rank = len(shape)
    new = enc.renamed(name)
    new.rank = rank
    blocked = enc.enc_type in ("PER_BLOCK", "LPBQ")
    if blocked and enc.block_axis is None:
        return "block axis unknown"
    if enc.enc_type == "PER_BLOCK" and enc.scale.ndim == 1:
        new.resolve_blocks(shape[enc.axis])
    for axis, start, stop in ranges:
        axis %= rank
        if axis == enc.axis:
            sl = slice(start, stop)
            new.scale = new.scale[sl]
            if new.offset is not None and new.offset.ndim > 0:
                new.offset = new.offset[sl]
            if new.per_block_int_scale is not None:
                new.per_block_int_scale = new.per_block_int_scale[sl]
            for attr in ("min", "max"):
                if getattr(new, attr) is not None and np.ndim(getattr(new, attr)) > 0:
                    setattr(new, attr, getattr(new, attr)[sl])
            extras = new.style.get("elem_extra")
            if extras is not None and len(extras) == shape[axis]:
                new.style["elem_extra"] = extras[sl]
        elif blocked and axis == enc.block_axis:
            bs = enc.block_size
            assert bs
            if start % bs or (stop % bs and stop != shape[axis]):
                return f"cut {start}:{stop} on the block axis is not aligned to block size {bs}"
            sl = slice(start // bs, -(-stop // bs))
            if enc.enc_type == "PER_BLOCK":
                new.scale = new.scale[:, sl]
                new.offset = new.offset[:, sl]
            else:
                assert new.per_block_int_scale is not None
                new.per_block_int_scale = new.per_block_int_scale[:, sl]
        # any other axis: every channel (and block) of the original is still whole in the piece
    return new


def pad_encoding(enc: Encoding, shape: tuple[int, ...], axis: int, size: int, full: int) -> Encoding | str:
    """The encoding of a tensor zero-padded along ``axis`` from ``size`` to ``full`` elements (a LoRA
    weight of lower rank in a graph of higher rank), or the reason it cannot be expressed.

    Per-tensor encodings are unchanged. Channels (or blocks) the padding adds repeat the last
    existing one: they hold only zeros, which every AIMET grid represents exactly. An encoding that
    already has ``full`` channels (made on the padded graph) is returned as it is.
    """
    if enc.enc_type == "PER_TENSOR" or not enc.has_scale:
        return enc
    rank = len(shape)
    if enc.axis is None:
        return "channel axis unknown"
    new = enc.renamed(enc.name)
    if enc.axis % rank == axis % rank:
        if enc.enc_type == "PER_BLOCK" and new.scale.ndim == 1:  # flat 1.0.0 blocks: C is ours to find
            new.resolve_blocks(full if new.scale.size % size else size)
        channels = new.num_channels
        if channels == full:
            return enc
        if channels != size:
            return f"{channels} channels on axis {axis}, neither the adapter's rank {size} nor the graph's {full}"
        extra = full - size

        def grow(arr: np.ndarray | None) -> np.ndarray | None:
            if arr is None or np.ndim(arr) == 0:
                return arr
            return np.concatenate([arr, np.repeat(arr[-1:], extra, axis=0)], axis=0)

        new.scale, new.offset = grow(new.scale), grow(new.offset)  # type: ignore[assignment]
        new.per_block_int_scale = grow(new.per_block_int_scale)
        new.zero_point_shift = grow(new.zero_point_shift)
        new.min, new.max = grow(new.min), grow(new.max)
        extras = new.style.get("elem_extra")
        if extras is not None and len(extras) == size:
            new.style["elem_extra"] = list(extras) + [extras[-1]] * extra
        return new
    if enc.enc_type in ("PER_BLOCK", "LPBQ") and enc.block_axis is not None and enc.block_axis % rank == axis % rank:
        bs = enc.block_size
        if not bs or size % bs or full % bs:
            return f"the rank {size} -> {full} padding is not a whole number of blocks of {bs}"
        if enc.enc_type == "PER_BLOCK" and new.scale.ndim == 1:
            new.resolve_blocks(shape[enc.axis])
        blocks = full // bs - size // bs

        def widen(arr: np.ndarray | None) -> np.ndarray | None:
            if arr is None or np.ndim(arr) < 2:
                return arr
            return np.concatenate([arr, np.repeat(arr[:, -1:], blocks, axis=1)], axis=1)

        if enc.enc_type == "PER_BLOCK":
            new.scale, new.offset = widen(new.scale), widen(new.offset)  # type: ignore[assignment]
        new.per_block_int_scale = widen(new.per_block_int_scale)
        return new
    return enc  # padded along an axis the encoding does not index: every channel is whole


def _expected_shape(shape: tuple[int, ...], ranges: tuple[tuple[int, int, int], ...]) -> tuple[int, ...]:
    out = list(shape)
    for axis, start, stop in ranges:
        out[axis] = stop - start
    return tuple(out)


def _folded_source(name: str, record: SplitRecord, encodings: EncodingSet) -> str | None:
    """The encoded tensor a removed data-movement tensor copied (following chains), if any."""
    seen = {name}
    while name in record.folded:
        name = record.folded[name]
        if name in seen:
            return None
        seen.add(name)
        if encodings.get(name) is not None:
            return name
    return None


def _encode_joins(
    out_model: ir.Model,
    record: SplitRecord,
    result: EncodingSet,
    new_order: list[str],
    report: CoverageReport,
) -> None:
    """Give each unencoded head join (Concat of all pieces of one split) its pieces' common encoding."""
    owner = {p.name: split.original for split in record.tensors.values() for p in split.pieces}
    for node in out_model.graph:
        if not is_op(node, "Concat") or not node.inputs:
            continue
        out = node.outputs[0]
        if not out.name or out.name in result:
            continue
        originals = {owner.get(v.name) if v is not None and v.name is not None else None for v in node.inputs}
        if len(originals) != 1:
            continue
        (original,) = originals
        if original is None:
            continue
        if len(node.inputs) != len(record.tensors[original].pieces):
            continue
        sources = [s for v in node.inputs if (s := copied_activation(v, result)) is not None]
        if len(sources) != len(node.inputs):
            continue
        encs = [result.activations[s] for s in sources]
        if not all(e.same_numbers(encs[0]) for e in encs[1:]):
            report.warnings.append(f"{out.name}: the joined heads carry different encodings; left unencoded")
            continue
        result.activations[out.name] = encs[0].renamed(out.name)
        new_order.append(out.name)
        report.joined[out.name] = sources[0]


@dataclasses.dataclass(frozen=True)
class OutputFacts:
    """What propagation reads of the output model: tensor names, static shapes, weights' axes."""

    names: set[str]
    shapes: dict[str, tuple[int, ...]]
    axes: dict[str, AxisPair]


def output_facts(model: Any) -> OutputFacts:
    model = as_ir_model(model)
    return OutputFacts(tensor_names(model), tensor_shapes(model), channel_axes(model))


def propagate(
    encodings: EncodingSet,
    record: SplitRecord,
    model: ModelLike,
    *,
    original: ModelLike | None = None,
    channel_axes_map: Mapping[str, int | AxisPair] | None = None,
    strict: bool = False,
    original_names: set[str] | None = None,
    only: Collection[str] | None = None,
    facts: OutputFacts | None = None,
) -> tuple[EncodingSet, CoverageReport]:
    """Encodings for the split ``model`` from the MHA ``encodings`` and the split's ``record``.

    ``only`` propagates just those encodings (and the head joins that take theirs), the others
    serving as context (what a removed data-movement tensor copied): a LoRA adapter's own encodings
    over the base graph's. ``facts`` (:func:`output_facts` of ``model``) saves walking the output
    model again when it is unchanged since the last call.

    ``model`` is the output (per-head) model. Channel axes of 0.6.1/1.0.0 per-channel weights
    come from ``channel_axes_map`` (computed by the caller on the original model, e.g. with
    :func:`mha2sha.encodings.axes.channel_axes` before an in-place split), else from ``original``,
    else from how the first piece is consumed in ``model``, else from the unique dimension of
    the recorded shape that matches the channel count. ``original`` also enables the check
    that every encoding names a tensor of the original model. With ``strict``, any missing or
    dropped encoding raises :class:`EncodingCoverageError` (a UserError).
    """
    out_model = as_ir_model(model)
    facts = facts or output_facts(out_model)
    out_names, out_shapes, piece_axes = facts.names, facts.shapes, facts.axes
    orig_model = as_ir_model(original) if original is not None else None
    orig_names = tensor_names(orig_model) if orig_model is not None else original_names

    axes: dict[str, AxisPair] = {}
    if orig_model is not None:
        axes.update(channel_axes(orig_model))
    for n, a in (channel_axes_map or {}).items():
        axes[n] = a if isinstance(a, tuple) else (a, None)

    # the entries are copied as they are changed (resolve), not up front: ``only`` touches a few
    src = encodings.shallow()
    report = CoverageReport()
    result = EncodingSet(version=src.version, extra=src.extra, style=src.style)
    new_order: list[str] = []

    def encoded(name: str) -> Encoding:
        """The encoding ``src`` has for ``name`` (folded sources and copies are checked to have one)."""
        enc = src.get(name)
        assert enc is not None
        return enc

    def resolve(enc: Encoding, split: TensorSplit) -> None:
        """Fill the axes of a per-channel/blocked encoding of a split weight."""
        rank = len(split.shape)
        if enc.enc_type == "PER_TENSOR" or not enc.has_scale:
            return
        pair = axes.get(split.original)
        if pair is None:
            for p in split.pieces:
                if p.name in piece_axes and len(out_shapes.get(p.name, split.shape)) == rank:
                    pair = piece_axes[p.name]
                    break
        if enc.axis is None and pair is not None:
            enc.axis = pair[0] % rank
        if enc.block_axis is None and enc.enc_type in ("PER_BLOCK", "LPBQ"):
            if pair is not None and pair[1] is not None:
                enc.block_axis = pair[1] % rank
            elif enc.axis is not None and rank == 2:
                enc.block_axis = 1 - enc.axis
        if enc.axis is None:
            n = enc.num_channels
            matches = [i for i, d in enumerate(split.shape) if n is not None and d == n]
            if len(matches) == 1:
                enc.axis = matches[0]
                report.warnings.append(
                    f"{split.original}: channel axis {enc.axis} guessed from shape {split.shape}"
                )
        if enc.axis is not None and enc.enc_type == "PER_BLOCK" and enc.scale.ndim == 1:
            enc.resolve_blocks(split.shape[enc.axis])
        if enc.axis is not None and enc.num_channels not in (None, split.shape[enc.axis]):
            report.warnings.append(
                f"{split.original}: {enc.num_channels} channels do not match axis {enc.axis} of {split.shape}"
            )
            enc.axis = None

    wanted = set(only) if only is not None else None
    for name in src.names() if wanted is None else [n for n in src.names() if n in wanted]:
        enc = src.get(name)
        assert enc is not None
        enc = enc.renamed(name)  # a copy: resolve() below fills its axes
        kind = src.kind_of(name)
        target = result.params if kind == "param" else result.activations
        if orig_names is not None and name not in orig_names:
            report.unknown.append(name)
            report.warnings.append(f"encoding {name} names no tensor of the original model")
        split = record.tensors.get(name)
        requantized = [n for n in record.requantized.get(name, []) if n in out_names]
        if kind == "activation" and requantized:
            # per-head requantisation nodes of this original (encodings.requant): its encoding is theirs
            for new_name in requantized:
                report.requantized[new_name] = name
                if split is None and new_name not in result:
                    target[new_name] = enc.renamed(new_name)
                    new_order.append(new_name)
                    report.sha_encoded.append(new_name)
            if split is None:
                report.mha_encoded.append(name)
                continue
        if split is None:
            if name in out_names:
                target[name] = enc
                new_order.append(name)
                report.kept.append(name)
            else:
                source = _folded_source(name, record, src)
                copies = [c for c in record.copied_by.get(name, []) if src.get(c) is not None]
                if source is not None and enc.same_numbers(encoded(source)):
                    report.folded[name] = source
                elif source is None and copies and all(enc.same_numbers(encoded(c)) for c in copies):
                    report.folded[name] = copies[0]  # e.g. a packed-QKV Split output, read by a Reshape
                elif source is not None:
                    report.dropped[name] = f"removed data movement of {source} had a different encoding"
                else:
                    report.dropped[name] = "tensor not in output model"
            continue
        report.mha_encoded.append(name)
        if name in out_names:  # e.g. a graph input that is sliced inside the graph: keep both
            target[name] = enc
            new_order.append(name)
        resolve(enc, split)
        for piece in split.pieces:
            if piece.name not in out_names:
                report.missing[piece.name] = f"per-head tensor of {name} not in output model"
                continue
            sliced = slice_encoding(enc, tuple(split.shape), piece.ranges, piece.name)
            if isinstance(sliced, str):
                report.missing[piece.name] = f"{name}: {sliced}"
                continue
            got = out_shapes.get(piece.name)
            want = _expected_shape(tuple(split.shape), piece.ranges)
            if got is not None and got != want and sliced.enc_type != "PER_TENSOR":
                report.missing[piece.name] = f"{name}: piece shape {list(got)} is not the slice {list(want)}"
                continue
            if piece.name in target or piece.name in result:
                # One per-head tensor can stand for several originals (a reshape that is the identity
                # per head); equal encodings agree, different ones are a real conflict.
                if not sliced.same_numbers(result.get(piece.name) or target[piece.name]):
                    report.conflicts[piece.name] = f"also stands for {name}, whose encoding differs"
                    report.warnings.append(
                        f"{piece.name} receives different encodings from two originals; first kept"
                    )
                continue
            target[piece.name] = sliced
            new_order.append(piece.name)
            report.sha_encoded.append(piece.name)

    _encode_joins(out_model, record, result, new_order, report)
    for name in record.tensors:
        if name not in src and only is None:
            report.unencoded_splits.append(name)
    if src.order is not None:
        result.order = new_order
    for w in report.warnings:
        logger.warning("%s", w)
    if strict and not report.ok:
        first = [*report.missing.items(), *report.dropped.items(), *report.conflicts.items()][:3]
        detail = "; ".join(f"{n}: {r}" for n, r in first)
        raise EncodingCoverageError(
            f"encodings coverage: {len(report.missing)} per-head tensors missing an encoding, "
            f"{len(report.dropped)} encodings dropped, {len(report.conflicts)} per-head tensors "
            f"with conflicting encodings ({detail})"
        )
    return result, report
