"""Summaries a person reads: one table per stage record, one line per finding.

Every stage returns a record; this module is the only place that turns records into terminal
output, so a new stage adds its table here and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mha2sha.adapters.record import AdaptersRecord
from mha2sha.encodings.propagate import CoverageReport
from mha2sha.layout.record import LayoutRecord
from mha2sha.lower import LowerRecord
from mha2sha.split.record import BlockReport
from mha2sha.verify.adapters import AdapterCheck
from mha2sha.verify.htp import HtpCheck
from mha2sha.verify.runner import Verification

__all__ = [
    "adapters_table",
    "blocks_json",
    "blocks_table",
    "coverage_table",
    "htp_summary",
    "layout_summary",
    "lowering_summary",
    "verification_table",
]


def _what_was_split(block: BlockReport) -> str:
    parts = []
    if block.weights:
        parts.append(f"{len(block.weights)} weights")
    if block.inputs:
        parts.append(f"{len(block.inputs)} inputs")
    if block.kv_cache:
        parts.append(f"{len(block.kv_cache)} KV caches")
    if block.activations:
        parts.append(f"{len(block.activations)} activations")
    return ", ".join(parts) or "-"


def blocks_table(blocks: Sequence[BlockReport]) -> Table:
    table = Table(title="Attention blocks", title_justify="left")
    table.add_column("block", overflow="fold")
    for column in ("status", "heads", "kv heads", "head dim", "split at"):
        table.add_column(column)
    for block in blocks:
        status = {"split": "[green]split[/]", "unsupported": "[red]left as MHA[/]"}.get(
            block.status, block.status
        )
        detail = _what_was_split(block) if block.status == "split" else block.reason
        table.add_row(
            block.name,
            status,
            str(block.heads or "-"),
            str(block.kv_heads or "-"),
            str(block.head_dim or "-"),
            detail,
        )
    return table


def blocks_json(blocks: Sequence[BlockReport]) -> list[dict]:
    return [
        {
            "block": b.name,
            "status": b.status,
            "heads": b.heads,
            "kv_heads": b.kv_heads,
            "head_dim": b.head_dim,
            "weights_sliced": b.weights,
            "inputs_cut": b.inputs,
            "kv_cache_cut_after_concat": b.kv_cache,
            "activations_cut": b.activations,
            "reason": b.reason,
        }
        for b in blocks
    ]


def _fmt(x: float) -> str:
    return "-" if math.isinf(x) else f"{x:.3e}"


def verification_table(v: Verification, mode: str | None = None) -> Table:
    """One row per output (``mode``: "full" / "blocks")."""
    verdict = "[bold green]PASS[/]" if v.ok else "[bold red]FAIL[/]"
    what = f"Verification ({mode})" if mode else "Verification"
    table = Table(title=f"{what} {verdict} (rtol {v.rtol:.1e}, max rel err {_fmt(v.max_rel_err)})")
    table.add_column("output")
    table.add_column("shape")
    table.add_column("max abs err", justify="right")
    table.add_column("max rel err", justify="right")
    table.add_column("status")
    for r in v.rows:
        status = Text("ok", style="green") if r.ok else Text("FAIL", style="bold red")
        if r.note:
            status.append(f" ({r.note})", style="dim" if r.ok else "red")
        table.add_row(
            r.name, "x".join(map(str, r.shape)) or "scalar", _fmt(r.max_abs_err), _fmt(r.max_rel_err), status
        )
    return table


def coverage_table(report: CoverageReport, examples: int = 3) -> Table:
    """Encodings propagation: one row per category with its count and the first few names."""
    t = Table(title="Encodings coverage" + ("" if report.ok else " (GAPS)"))
    t.add_column("category")
    t.add_column("count", justify="right")
    t.add_column("examples")

    def names(items: list[str] | dict[str, str]) -> str:
        if isinstance(items, dict):
            shown = [f"{k} ({v})" for k, v in list(items.items())[:examples]]
        else:
            shown = list(items)[:examples]
        more = f" +{len(items) - examples}" if len(items) > examples else ""
        return ", ".join(shown) + more

    rows: list[tuple[str, list[str] | dict[str, str], str]] = [
        ("MHA tensors with encodings (split)", report.mha_encoded, ""),
        ("per-head tensors encoded", report.sha_encoded, ""),
        ("per-head tensors missing an encoding", report.missing, "red"),
        ("encodings dropped (tensor gone)", report.dropped, "red"),
        ("encodings naming no original tensor", report.unknown, "yellow"),
        ("split tensors without encoding", report.unencoded_splits, "dim"),
        ("encodings kept unchanged", report.kept, ""),
        ("removed, same encoding as its data-movement input or copy", report.folded, "dim"),
        ("heads joined (Concat), encoding of the pieces' source", report.joined, "dim"),
        ("requantised per head (a copy with its own encoding)", report.requantized, ""),
        ("per-head tensors with conflicting encodings", report.conflicts, "red"),
    ]
    for label, items, style in rows:
        t.add_row(label, str(len(items)), names(items) if items else "", style=style if items else None)
    return t


def htp_summary(check: HtpCheck) -> str:
    """Does SHA run on HTP alone, how far MHA and SHA are apart there, and (when they differ) the
    first tensor where they part and whose that is."""

    def support(runs: bool, unsupported: list[tuple[str, str]]) -> str:
        if runs:
            return "[green]runs on HTP with CPU fallback disabled[/]"
        ops = sorted({op for _, op in unsupported})
        return f"[yellow]needs CPU fallback[/] ({len(unsupported)} unsupported nodes: {', '.join(ops) or 'see log'})"

    name, worst = check.worst
    agreement = "bit-exact" if worst == 0 else f"max {worst:g} LSB ('{name}')"
    mode = " (informational: unsupported nodes ran on the CPU)" if check.cpu_fallback_used else ""
    lines = [
        f"HTP emulator {check.soc}: SHA {support(check.sha_on_htp_only, check.sha_unsupported)}; "
        f"MHA {support(check.mha_on_htp_only, check.mha_unsupported)}",
        f"HTP emulator {check.soc}: MHA vs SHA {agreement}{mode}",
    ]
    d = check.divergence
    if d is not None and d.tensor:
        lines.append(f"HTP emulator {check.soc}: {escape(d.explain())}")
    elif d is not None:
        lines.append(f"HTP emulator {check.soc}: where MHA and SHA part is unknown ({escape(d.note)})")
    return "\n".join(lines)


def lowering_summary(record: LowerRecord) -> str:
    """Fused ops rewritten into primitives (by op), and those left as they were with the reason."""
    counts: dict[str, int] = {}
    for _, op, _ in record.lowered:
        counts[op] = counts.get(op, 0) + 1
    lines = []
    if counts:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(counts.items()))
        lines.append(f"Lowered to ONNX primitives: {ops}")
    for node, op, reason in record.refused:
        lines.append(f"[yellow]{op} '{node}' kept as it is[/]: {reason}")
    return "\n".join(lines)


def layout_summary(record: LayoutRecord) -> str:
    """One line per layout fact: projections converted or kept (why), layout ops removed, rank."""
    lines = []
    if record.o_proj:
        lines.append(f"per-head o_proj: {len(record.o_proj)} projection(s) split over the heads")
    lines.append(
        f"HTP layout: {len(record.conv)} projection(s) now Conv 1x1, {record.nodes_removed} layout op(s) removed"
        + (f", {len(record.rank_lowered)} tensor(s) lowered to rank <= 4" if record.rank_lowered else "")
    )
    if record.skipped:
        reasons = sorted({s.reason for s in record.skipped})
        lines.append(f"[yellow]kept as they were[/]: {len(record.skipped)} node(s) ({'; '.join(reasons[:3])})")
    if record.high_rank:
        names = ", ".join(t.name for t in record.high_rank[:3])
        lines.append(f"[yellow]{len(record.high_rank)} tensor(s) of rank > 4 remain[/]: {names}")
    return "\n".join(lines)


def _padding(padded: dict[str, tuple[int, int]]) -> str:
    pairs = sorted(set(padded.values()))
    return ", ".join(f"{a} -> {b}" for a, b in pairs) + f" ({len(padded)} tensors)" if pairs else "-"


def adapters_table(record: AdaptersRecord, checks: Sequence[AdapterCheck]) -> Table:
    """One row per LoRA adapter: what was fitted (rank padding, zero-filled branches, lora_alpha) and
    what verification proved for it (float, quantized)."""
    by_name = {c.name: c for c in checks}
    alpha = record.alpha
    title = f"LoRA adapters: {len(record.lora_tensors)} graph tensors -> {len(record.sha_tensors)} SHA tensors"
    if alpha is not None:
        title += f"; scale is input '{alpha.input}' ({len(alpha.sites)} branches)"
    t = Table(title=title, title_justify="left")
    for column in ("adapter", "rank padded (zeros)", "zero-filled", "lora_alpha", "float", "quantized"):
        t.add_column(column)
    for r in record.adapters:
        check = by_name.get(r.name)
        if check is None:
            float_cell, quant = "not verified", "-"
        else:
            float_cell = (
                f"[green]ok[/] {check.float.max_rel_err:.1e}" if check.float.ok else f"[red]FAIL[/] {check.float.max_rel_err:.1e}"
            )
            if check.max_lsb is None:
                quant = check.note or "-"
            elif check.qdq_local is not None:
                worst = check.qdq_local.worst
                quant = f"[green]ok[/] {check.max_lsb:g} LSB at outputs, {worst.lsb if worst else 0:g} per tensor"
            else:
                quant = "[green]ok[/] " + ("bit-exact" if check.max_lsb == 0 else f"{check.max_lsb:g} LSB")
        scale = "-" if r.scale is None else f"{r.scale:g} ({r.scale_source})"
        zero = str(len(r.zero_filled)) if r.zero_filled else "-"
        t.add_row(r.name, _padding(r.padded), zero, scale, float_cell, quant)
    return t
