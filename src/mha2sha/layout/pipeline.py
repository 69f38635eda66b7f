"""The HTP layout stage of a conversion: which passes run, in which order, into one record.

Order matters: unit axes leave tensors of rank > 4 before the layout cancellation, which runs last,
on everything the other passes created; the rank check reports what is left. The per-head
``o_proj`` (optional) works on the split's ``Concat -> MatMul`` and runs right after the split
(:func:`split_o_proj_per_head`), before the encodings are propagated, because the ``W_o`` row
slices it makes are per-head weights like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import onnx_ir as ir

from mha2sha.layout.cancel_layout import CancelLayoutPass
from mha2sha.layout.linear_to_conv import LinearToConvPass
from mha2sha.layout.lower_rank import LowerRankPass
from mha2sha.layout.o_proj import PerHeadOProjPass
from mha2sha.layout.rank import high_rank_tensors
from mha2sha.layout.record import LayoutRecord
from mha2sha.split.record import SplitRecord

__all__ = ["apply_htp_layout", "split_o_proj_per_head"]

logger = logging.getLogger(__name__)


def split_o_proj_per_head(
    model: ir.Model, record: LayoutRecord | None = None, split_record: SplitRecord | None = None
) -> LayoutRecord:
    """Each head's rows of ``W_o`` and an Add tree instead of concat + one projection (in place).

    ``split_record`` receives the ``W_o`` row slices, so the name map and encodings propagation see
    them like any other per-head weight; ``record`` the projections rewritten or skipped and the
    partial sums (new activations).
    """
    record = record if record is not None else LayoutRecord()
    PerHeadOProjPass(record, split_record)(model)
    return record


def apply_htp_layout(
    model: ir.Model,
    record: LayoutRecord | None = None,
    *,
    linear_to_conv: bool = True,
    cancel: bool = True,
    quantized: Collection[str] = (),
    keep: Collection[str] = (),
) -> LayoutRecord:
    """Run the HTP layout passes on ``model`` in place (static shapes required; see module docstring).

    ``quantized`` names the tensors that carry an encoding (a quantized MatMul output keeps its
    separate bias Add). ``keep`` names tensors whose producing layout op must stay although it is
    the identity (per-head requantisation nodes, :mod:`mha2sha.encodings.requant`). Everything the
    passes did is in the returned record.
    """
    record = record if record is not None else LayoutRecord()
    passes: list[ir.passes.PassBase] = []
    if linear_to_conv:
        passes.append(LinearToConvPass(record, quantized=quantized))
    passes.append(LowerRankPass(record))
    if cancel:
        passes.append(CancelLayoutPass(record, keep=keep))
    ir.passes.PassManager(passes)(model)
    present = {v.name for n in model.graph for v in n.outputs}
    record.new_activations = [n for n in record.new_activations if n in present]
    record.high_rank = high_rank_tensors(model)
    return record
