"""What the layout passes did to tensor names: the contract with the encodings layer.

The layout passes move data (Transpose/Reshape) and re-express projections as Conv 1x1; they never
change a value that an encoding describes, except where stated (a MatMul output fused into a Conv
with its bias, a per-head partial sum of ``o_proj``). Everything the encodings layer needs is in
:class:`LayoutRecord`; :func:`remap_encodings` applies it to an :class:`~mha2sha.encodings.EncodingSet`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import onnx_ir as ir

from mha2sha.io.names import tensor_names

if TYPE_CHECKING:
    from mha2sha.encodings.model import EncodingSet

__all__ = ["LayoutRecord", "Skipped", "WeightRemap", "remap_encodings"]

logger = logging.getLogger(__name__)


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
    """

    weights: dict[str, WeightRemap] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    moved: dict[str, str] = dataclasses.field(default_factory=dict)
    fused: dict[str, str] = dataclasses.field(default_factory=dict)
    new_activations: list[str] = dataclasses.field(default_factory=list)

    def origin(self, name: str) -> str:
        """The original tensor whose values ``name`` holds (itself when it is original)."""
        return self.aliases.get(name, name)

    def renamed(self, old: str, new: str) -> None:
        """A tensor created by a pass was renamed ``old`` -> ``new`` (took an original name)."""
        self.aliases.pop(old, None)
        for key, value in list(self.moved.items()):
            if value == old:
                self.moved[key] = new

    def to_dict(self) -> dict[str, object]:
        return {
            "weights": {k: dataclasses.asdict(v) for k, v in self.weights.items()},
            "aliases": dict(self.aliases),
            "moved": dict(self.moved),
            "fused": dict(self.fused),
            "new_activations": list(self.new_activations),
        }


def remap_encodings(encodings: EncodingSet, record: LayoutRecord, model: ir.Model) -> EncodingSet:
    """Encodings for ``model`` after the layout passes, from those of the model before them.

    Weights are renamed and their channel/block axes moved (``axis``/``block_axis``/``rank``);
    aliases receive a copy of their original's encoding; encodings of moved tensors follow their
    values; encodings of fused or vanished tensors are dropped (logged). Encodings of tensors the
    layout passes did not touch are kept as they are.
    """
    present = tensor_names(model)
    out = encodings.copy()
    for old, remap in record.weights.items():
        enc = out.params.pop(old, None)
        if enc is None:
            continue
        new = enc.renamed(remap.new_name)
        if new.axis is not None:
            new.axis = remap.axis_map[new.axis]
        if new.block_axis is not None:
            new.block_axis = remap.axis_map[new.block_axis]
        new.rank = len(remap.new_shape)
        out.params[remap.new_name] = new
        if (
            old in present and old != remap.new_name
        ):  # the original weight still feeds another op: keep its encoding too
            out.params[old] = enc
        if out.order is not None:
            out.order = [remap.new_name if n == old else n for n in out.order]
    for old, new_name in record.moved.items():
        enc = out.activations.pop(old, None)
        if enc is not None and new_name not in out:
            out.activations[new_name] = enc.renamed(new_name)
            if out.order is not None:
                out.order.append(new_name)
    for new_name, original in record.aliases.items():
        enc = encodings.get(original) or out.get(original)
        if enc is not None and new_name not in out and new_name in present:
            out.activations[new_name] = enc.renamed(new_name)
            if out.order is not None:
                out.order.append(new_name)
    for name in list(out.activations):
        if name not in present:
            logger.info("encoding of %s dropped: %s", name, record.fused.get(name, "tensor gone"))
            del out.activations[name]
    if out.order is not None:
        seen: set[str] = set()
        out.order = [n for n in out.order if n in out and not (n in seen or seen.add(n))]
    return out
