"""HTP layout passes: projections as Conv 1x1 in BD1L, cancelled layout ops, per-head o_proj, rank checks.

Each transformation is one ``onnx_ir`` pass in its own module; :func:`apply_htp_layout` runs them
in the order a conversion needs.
"""

from __future__ import annotations

from mha2sha.layout.cancel_layout import CancelLayoutPass
from mha2sha.layout.linear_to_conv import LinearToConvPass
from mha2sha.layout.o_proj import PerHeadOProjPass
from mha2sha.layout.pipeline import apply_htp_layout, split_o_proj_per_head
from mha2sha.layout.rank import HighRankTensor, high_rank_tensors
from mha2sha.layout.record import LayoutRecord, Skipped, WeightRemap

__all__ = [
    "CancelLayoutPass",
    "HighRankTensor",
    "LayoutRecord",
    "LinearToConvPass",
    "PerHeadOProjPass",
    "Skipped",
    "WeightRemap",
    "apply_htp_layout",
    "high_rank_tensors",
    "split_o_proj_per_head",
]
