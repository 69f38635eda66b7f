"""What the layout passes did: the only output of the layout stage.

The layout passes move data (Transpose/Reshape) and re-express projections as Conv 1x1; they never
change a value that an encoding describes, except where stated (a MatMul output fused into a Conv
with its bias, a per-head partial sum of ``o_proj``). Everything the encodings layer needs is in
:class:`LayoutRecord` (:func:`mha2sha.encodings.remap.remap_encodings` applies it), and so is
everything the report shows (projections converted or skipped with the reason, nodes removed,
tensors of rank > 4).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mha2sha.layout.rank import HighRankTensor

__all__ = ["LayoutRecord", "Skipped", "WeightRemap"]


@dataclasses.dataclass(frozen=True)
class WeightRemap:
    """An original weight that now feeds a Conv 1x1 under ``new_name`` with another axis order.

    ``axis_map[i]`` is the axis of the new tensor that holds original axis ``i``: a MatMul weight
    ``[in, out]`` becomes ``[out, in, 1, 1]`` so ``axis_map == (1, 0)`` and the per-channel
    (output-channel) axis moves 1 -> 0. Gemm ``transB=1`` weights ``[out, in]`` keep ``(0, 1)``.
    A bias reshaped to 1-D has ``axis_map == (None, .., 0)`` (its only non-unit axis -> 0).
    """

    new_name: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    axis_map: tuple[int | None, ...]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """``array`` (of ``old_shape``) in the new layout: what the weight under ``new_name`` holds."""
        if tuple(array.shape) != self.old_shape:
            raise ValueError(f"expected shape {list(self.old_shape)}, got {list(array.shape)}")
        kept = [i for i, a in enumerate(self.axis_map) if a is not None]
        squeezed = array.reshape([self.old_shape[i] for i in kept])  # dropped axes are unit axes
        order = sorted(range(len(kept)), key=lambda j: self.axis_map[kept[j]])  # type: ignore[arg-type,return-value]
        return np.ascontiguousarray(squeezed.transpose(order).reshape(self.new_shape))

    @property
    def channel_axis(self) -> tuple[int, int]:
        """(old, new) output-channel axis: the axis that becomes Conv axis 0."""
        old = self.axis_map.index(0)
        return old, 0


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A node a pass looked at and left as it was, with the reason."""

    node: str
    op_type: str
    reason: str


@dataclasses.dataclass
class LayoutRecord:
    """Name bookkeeping shared by the layout passes (one record per conversion).

    - ``weights``: original weight name -> :class:`WeightRemap`.
    - ``aliases``: tensor created by a pass -> original tensor holding the same values in another
      layout (copy its per-tensor encoding; e.g. a Conv output ``[B,C,1,S]`` -> the MatMul output
      ``[B,S,C]`` it replaces).
    - ``moved``: original tensor that no longer exists -> tensor in the model holding the same values
      (a Transpose/Reshape chain that cancelled out): its encoding moves there if that one has none.
    - ``fused``: original tensor that no longer exists and whose values exist nowhere (e.g. a MatMul
      output before its bias Add, now inside a Conv) -> why.
    - ``new_activations``: tensors with values that existed in no original tensor (per-head partial
      sums of ``o_proj``): they need calibration, no encoding can be derived for them.

    What each pass did, for the report: ``conv`` (projections now Conv 1x1), ``o_proj``
    (projections split per head), ``skipped`` (left as they were, why), ``nodes_removed`` (by the
    layout cancellation), ``rank_lowered`` (unit axes taken out), ``high_rank`` (what is left of
    rank > 4).
    """

    weights: dict[str, WeightRemap] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    moved: dict[str, str] = dataclasses.field(default_factory=dict)
    fused: dict[str, str] = dataclasses.field(default_factory=dict)
    new_activations: list[str] = dataclasses.field(default_factory=list)
    conv: list[str] = dataclasses.field(default_factory=list)
    o_proj: list[str] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    nodes_removed: int = 0
    rank_lowered: list[str] = dataclasses.field(default_factory=list)
    high_rank: list[HighRankTensor] = dataclasses.field(default_factory=list)

    def origin(self, name: str) -> str:
        """The original tensor whose values ``name`` holds (itself when it is original)."""
        return self.aliases.get(name, name)

    def renamed(self, old: str, new: str) -> None:
        """A tensor created by a pass was renamed ``old`` -> ``new`` (took an original name)."""
        self.aliases.pop(old, None)
        for key, value in list(self.moved.items()):
            if value == old:
                self.moved[key] = new

    def names_dict(self) -> dict[str, Any]:
        return {
            "weights": {k: dataclasses.asdict(v) for k, v in self.weights.items()},
            "aliases": dict(self.aliases),
            "moved": dict(self.moved),
            "fused": dict(self.fused),
            "new_activations": list(self.new_activations),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "conv": list(self.conv),
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "o_proj_per_head": list(self.o_proj),
            "layout_nodes_removed": self.nodes_removed,
            "rank_lowered": list(self.rank_lowered),
            "rank_above_4": [dataclasses.asdict(t) for t in self.high_rank],
            "names": self.names_dict(),
        }
