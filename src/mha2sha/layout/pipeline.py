"""The HTP layout stage of a conversion: which passes run, in which order, and what they report.

Order matters: the per-head ``o_proj`` (optional) works on the split's ``Concat -> MatMul`` and
must run before the MatMuls become Convs; unit axes leave tensors of rank > 4 before the layout
cancellation, which runs last, on everything the other passes created. The rank check reports
what is left.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from typing import Any

import onnx_ir as ir

from mha2sha.layout.cancel_layout import CancelLayoutPass
from mha2sha.layout.linear_to_conv import LinearToConvPass
from mha2sha.layout.lower_rank import LowerRankPass
from mha2sha.layout.o_proj import PerHeadOProjPass
from mha2sha.layout.rank import HighRankTensor, high_rank_tensors
from mha2sha.layout.record import LayoutRecord, Skipped
from mha2sha.split.record import SplitRecord

__all__ = ["LayoutResult", "apply_htp_layout"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayoutResult:
    """What the layout stage did (for the report and the encodings layer)."""

    record: LayoutRecord
    conv: list[str] = dataclasses.field(default_factory=list)  # projections now Conv 1x1
    skipped: list[Skipped] = dataclasses.field(default_factory=list)  # left as MatMul/Gemm, why
    o_proj: list[str] = dataclasses.field(default_factory=list)  # projections split per head
    nodes_removed: int = 0  # by the layout cancellation
    rank_lowered: list[str] = dataclasses.field(default_factory=list)  # unit axes taken out
    high_rank: list[HighRankTensor] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "conv": list(self.conv),
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "o_proj_per_head": list(self.o_proj),
            "layout_nodes_removed": self.nodes_removed,
            "rank_lowered": list(self.rank_lowered),
            "rank_above_4": [dataclasses.asdict(t) for t in self.high_rank],
            "names": self.record.to_dict(),
        }


def apply_htp_layout(
    model: ir.Model,
    *,
    linear_to_conv: bool = True,
    optimize_o_proj: bool = False,
    cancel: bool = True,
    split_record: SplitRecord | None = None,
    record: LayoutRecord | None = None,
    quantized: Collection[str] = (),
) -> LayoutResult:
    """Run the HTP layout passes on ``model`` in place (static shapes required; see module docstring).

    ``split_record`` receives the ``W_o`` row slices when ``optimize_o_proj`` is on, so the name
    map and encodings propagation see them like any other per-head weight. ``quantized`` names the
    tensors that carry an encoding (a quantized MatMul output keeps its separate bias Add).
    """
    result = LayoutResult(record if record is not None else LayoutRecord())
    passes: list[ir.passes.PassBase] = []
    o_proj = PerHeadOProjPass(result.record, split_record) if optimize_o_proj else None
    conv = LinearToConvPass(result.record, quantized=quantized) if linear_to_conv else None
    lower_rank = LowerRankPass()
    cancel_pass = CancelLayoutPass(result.record) if cancel else None
    passes = [p for p in (o_proj, conv, lower_rank, cancel_pass) if p is not None]
    if passes:
        ir.passes.PassManager(passes)(model)
    if o_proj is not None:
        result.o_proj = list(o_proj.rewritten)
        result.skipped += o_proj.skipped
    if conv is not None:
        result.conv = list(conv.converted)
        result.skipped += conv.skipped
    result.rank_lowered = list(lower_rank.lowered)
    if cancel_pass is not None:
        result.nodes_removed = cancel_pass.removed_nodes
    present = {v.name for n in model.graph for v in n.outputs}
    result.record.new_activations = [n for n in result.record.new_activations if n in present]
    result.high_rank = high_rank_tensors(model)
    return result
