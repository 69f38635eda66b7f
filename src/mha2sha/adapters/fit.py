"""The adapters stage: every adapter cut exactly as the split and the layout cut the base graph.

No LoRA-specific rule: an adapter tensor follows its base-graph tensor through the same records
every other consumer reads.

1. :class:`~mha2sha.split.record.SplitRecord`: a tensor the split sliced (B of q/k/v per head, per
   KV head under GQA; o_proj's A by input rows with ``--optimize-o-proj``) is sliced by its pieces'
   ``ranges``; a tensor the split left whole (A, a graph input cut inside the graph) stays whole.
2. :class:`~mha2sha.layout.record.LayoutRecord`: a piece that became a Conv weight is renamed and
   transposed like the graph's (:meth:`~mha2sha.layout.record.WeightRemap.apply`).
3. Each result must be a tensor of the SHA graph with the same shape and dtype (else it is our bug).

:func:`plan_adapters` runs first (no converted graph needed): each adapter's base-graph tensors,
``lora_alpha`` value and encodings, with ``--lora-alpha-from-input``'s scale encoding moved to the
input. The job then propagates those encodings exactly as the base encodings (split, then layout),
and :func:`fit_adapters` cuts the tensors once the converted graph is final.
"""

from __future__ import annotations

from collections.abc import Container

import numpy as np
import onnx_ir as ir

from mha2sha.adapters.alpha import (
    AlphaRecord,
    adapter_scale,
    alpha_encoding,
    alpha_encodings,
)
from mha2sha.adapters.record import AdapterResult, AdaptersRecord
from mha2sha.adapters.weights import AdapterSet, overlay
from mha2sha.encodings import EncodingSet
from mha2sha.errors import InternalError
from mha2sha.graph import static_shape
from mha2sha.layout.record import LayoutRecord, WeightRemap
from mha2sha.split.record import SplitRecord

__all__ = ["fit_adapters", "plan_adapters", "sha_names"]


def _piece(array: np.ndarray, ranges: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    index = [slice(None)] * array.ndim
    for axis, start, stop in ranges:
        index[axis] = slice(start, stop)
    return array[tuple(index)]


def _updatable(model: ir.Model) -> dict[str, ir.Value]:
    graph = model.graph
    return {**{v.name: v for v in graph.inputs if v.name}, **graph.initializers}


Ranges = tuple[tuple[int, int, int], ...]


def sha_names(
    name: str, split: SplitRecord, layout: LayoutRecord | None, present: Container[str]
) -> list[tuple[str, Ranges, WeightRemap | None]]:
    """The SHA-graph tensors holding base-graph tensor ``name``: ``(name, ranges of the original,
    layout change)``; the tensor holds ``remap.apply(original[ranges])`` (or the slice itself)."""
    pieces: list[tuple[str, Ranges]] = [(name, ())]
    cut = split.tensors.get(name)
    if cut is not None and cut.kind == "param":
        pieces += [(p.name, p.ranges) for p in cut.pieces]
    out: list[tuple[str, Ranges, WeightRemap | None]] = []
    for piece, ranges in pieces:
        remap = layout.weights.get(piece) if layout is not None else None
        if remap is not None and remap.new_name in present:
            out.append((remap.new_name, ranges, remap))
        if piece in present and (remap is None or remap.new_name != piece):
            out.append((piece, ranges, None))
    return out


def _fit_one(
    mha: dict[str, np.ndarray],
    split: SplitRecord,
    layout: LayoutRecord | None,
    present: dict[str, ir.Value],
    skip: set[str],
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    tensors: dict[str, np.ndarray] = {}
    name_map: dict[str, list[str]] = {}
    for name, value in mha.items():
        if name in skip:
            continue
        targets = sha_names(name, split, layout, present)
        if not targets:
            raise InternalError(f"adapter tensor {name!r} has no counterpart in the converted graph")
        for target, ranges, remap in targets:
            piece = _piece(value, ranges)
            if remap is not None:
                piece = remap.apply(piece)
            want = static_shape(present[target])
            if tuple(piece.shape) != want:
                raise InternalError(
                    f"adapter tensor {name!r} -> {target!r}: shape {list(piece.shape)}, the graph's is {want}"
                )
            tensors[target] = np.ascontiguousarray(piece)
            name_map.setdefault(name, []).append(target)
    return tensors, name_map


def plan_adapters(
    adapters: AdapterSet, alpha: AlphaRecord | None = None, base: EncodingSet | None = None
) -> AdaptersRecord:
    """One result per adapter with what needs no converted graph: its base-graph tensors, its
    ``lora_alpha`` value, and its encodings of the base graph (``mha_encodings``: ``base`` with the
    adapter's own in place; ``scope``: those own ones), ready for the job to propagate."""
    results = []
    for adapter in adapters.adapters:
        result = AdapterResult(
            adapter.name, {}, {}, dict(adapters.values(adapter)), dict(adapter.ranks), adapters.zero_filled(adapter)
        )
        if alpha is not None:
            result.scale, result.scale_source = adapter_scale(adapter, adapters.lora)
        own = adapter.encodings
        if own is not None:
            merged = overlay(base, own)
            result.scope = set(own.names())
            if alpha is not None:
                assert result.scale is not None
                enc, result.alpha_encoding_source = alpha_encoding(merged, alpha, result.scale)
                merged = alpha_encodings(merged, alpha, enc)  # the base graph with the input
                result.scope = (result.scope - set(alpha.removed)) | {alpha.input}
            result.mha_encodings = merged
        results.append(result)
    return AdaptersRecord(results, adapters.names, [], alpha)


def fit_adapters(
    record: AdaptersRecord, split: SplitRecord, layout: LayoutRecord | None, model: ir.Model
) -> AdaptersRecord:
    """Fill every result's SHA-graph tensors: each base-graph tensor cut like the split and the layout
    cut it in the converted ``model`` (see the module docstring)."""
    present = _updatable(model)
    skip = set(record.alpha.constants) if record.alpha is not None else set()
    for result in record.adapters:
        result.tensors, result.name_map = _fit_one(result.mha_tensors, split, layout, present, skip)
    record.sha_tensors = sorted({n for r in record.adapters for names in r.name_map.values() for n in names})
    return record
