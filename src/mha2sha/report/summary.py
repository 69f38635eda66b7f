"""The conversion report: ``<name>.report.json`` and what the terminal shows, from the stage records."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from mha2sha.adapters.record import AdaptersRecord
from mha2sha.encodings.propagate import CoverageReport
from mha2sha.layout.record import LayoutRecord
from mha2sha.lower import LowerRecord
from mha2sha.report.progress import PhaseRecord
from mha2sha.report.tables import (
    adapters_table,
    blocks_json,
    blocks_table,
    coverage_table,
    htp_summary,
    layout_summary,
    lowering_summary,
    verification_table,
)
from mha2sha.split.record import SplitRecord
from mha2sha.verify.plan import VerifyRecord

__all__ = ["print_conversion", "report_json"]

#: A blockwise verification with more rows than this is shown as one line when it passes.
_MAX_ROWS = 12


def report_json(
    *,
    lowering: LowerRecord | None,
    split: SplitRecord,
    layout: LayoutRecord | None,
    coverage: CoverageReport | None,
    verify: VerifyRecord | None,
    phases: Sequence[PhaseRecord],
    adapters: AdaptersRecord | None = None,
) -> dict[str, Any]:
    checks = verify.to_dict() if verify is not None else {}
    return {
        "lowered": lowering.to_dict() if lowering else None,
        "blocks": blocks_json(split.blocks),
        "non_attention_softmax": split.other_softmax,
        "phases": [dataclasses.asdict(r) for r in phases],
        "encodings_coverage": coverage.to_dict() if coverage else None,
        "quantized_max_lsb": checks.get("quantized_max_lsb"),
        "quantized_mode": checks.get("quantized_mode"),
        "quantized_tensor_by_tensor": checks.get("quantized_tensor_by_tensor"),
        "htp": checks.get("htp"),
        "layout": layout.to_dict() if layout else None,
        "verification": checks.get("verification"),
        "adapters": adapters.to_dict() if adapters else None,
        "adapters_verification": checks.get("adapters"),
    }


def print_conversion(
    console: Console,
    *,
    lowering: LowerRecord | None,
    split: SplitRecord,
    layout: LayoutRecord | None,
    coverage: CoverageReport | None,
    verify: VerifyRecord | None,
    adapters: AdaptersRecord | None = None,
) -> None:
    """Every record of a finished conversion, as tables and one-line findings."""
    if lowering is not None and (lowering.lowered or lowering.refused):
        console.print(lowering_summary(lowering))
    if split.blocks:
        console.print(blocks_table(split.blocks))
    if split.other_softmax:
        console.print(f"Softmax not in an attention core (left as is): {', '.join(split.other_softmax)}")
    if layout is not None:
        console.print(layout_summary(layout))
    if coverage is not None:
        console.print(coverage_table(coverage))
    if verify is None:
        if adapters is not None:
            console.print(adapters_table(adapters, []))
        return
    v, plan = verify.float, verify.plan
    if v is not None:
        if plan.mode == "blocks" and v.ok and len(v.rows) > _MAX_ROWS:
            console.print(
                f"Verification (blocks) [bold green]PASS[/]: {len(v.rows)} block outputs compared, "
                f"max rel err {v.max_rel_err:.3e} (rtol {v.rtol:.1e})"
            )
        else:
            console.print(verification_table(v, plan.mode))
    console.print(f"Verify mode: {plan.mode} ({plan.reason()})")
    console.print(f"Proven: {verify.proven()}")
    for note in plan.notes:
        console.print(f"[yellow]Note:[/] {note}")
    if verify.qdq_lsb is not None:
        worst = max(verify.qdq_lsb.values(), default=0.0)
        verdict = "bit-exact" if worst == 0 else f"max {worst:g} LSB"
        what = "block outputs" if verify.qdq_mode == "blocks" else "outputs"
        how = ", block by block" if verify.qdq_mode == "blocks" else ""
        console.print(
            f"Quantized (QDQ, onnxruntime CPU{how}) MHA vs SHA: [green]{verdict}[/] over {len(verify.qdq_lsb)} {what}"
        )
    if verify.qdq_local is not None:
        local = verify.qdq_local
        worst_t = local.worst
        console.print(
            f"Quantized tensor by tensor: {len(local.tensors)} tensors, "
            f"max {worst_t.lsb if worst_t else 0:g} LSB given the same quantized inputs"
        )
    if verify.htp is not None:
        console.print(htp_summary(verify.htp))
    if adapters is not None:
        console.print(adapters_table(adapters, verify.adapters))
