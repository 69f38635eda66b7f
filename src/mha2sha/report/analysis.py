"""The analysis report on the terminal and as files: ``<name>.report.json``, ``attention.csv``,
``ops.csv`` (the HTML is :mod:`mha2sha.report.html`)."""

from __future__ import annotations

import csv
import io

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mha2sha.analyze.record import AnalysisRecord
from mha2sha.report.html import ATTENTION_COLUMNS, attention_rows

__all__ = ["attention_csv", "ops_csv", "print_analysis"]

_MAX_ROWS = 16


def _csv(headers: list[str], rows: list[list[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return out.getvalue()


def attention_csv(record: AnalysisRecord) -> str:
    """One row per attention block (columns: :data:`~mha2sha.report.html.ATTENTION_COLUMNS`)."""
    rows = attention_rows(record.structure.blocks)
    for row, block in zip(rows, record.structure.blocks, strict=True):
        row[-1] = block.reason  # the "reason" column holds why a block is not split, nothing else
    return _csv([*ATTENTION_COLUMNS, "features"], [[*r, "; ".join(b.features)] for r, b in zip(rows, record.structure.blocks, strict=True)])


def ops_csv(record: AnalysisRecord) -> str:
    """One row per op type: count in the model, HTP support (yes / no / unknown) and why."""
    rows: list[list[object]] = [
        [o.op, o.domain or "ai.onnx", o.count, o.htp, o.reason, o.probed, o.rejected, o.note] for o in record.ops
    ]
    return _csv(["op_type", "domain", "count", "htp", "reason", "probed_nodes", "rejected_nodes", "note"], rows)


def print_analysis(console: Console, record: AnalysisRecord) -> None:
    """The findings that matter first; the HTML has everything."""
    structure = record.structure
    blocks = structure.blocks
    splits = sum(1 for b in blocks if b.would_split)
    console.print(
        f"[bold]{escape(record.name)}[/]: {len(blocks)} attention block(s), {splits} would split, "
        f"{len(structure.kinds)} kind(s); {record.facts.nodes} nodes, opset {record.opset}"
    )
    for kind in structure.kinds:
        console.print(f"  kind {kind.label} ({len(kind.blocks)}): {escape(kind.summary)}")
    shown = [b for b in blocks if not b.would_split]  # the kinds above describe the others
    if shown:
        table = Table(title="Attention blocks that would not split", title_justify="left")
        for column in ("block", "kind", "heads", "kv", "dim", "RoPE", "mask", "KV cache", "split", "reason"):
            table.add_column(column, overflow="fold")
        for b in shown[:_MAX_ROWS]:
            table.add_row(
                escape(b.name), b.kind, str(b.heads or "-"), str(b.kv_heads or "-"), str(b.head_dim or "-"),
                escape(b.rope), escape(b.mask), escape(b.kv_cache), "[green]yes[/]" if b.would_split else "[red]no[/]",
                escape(b.reason),
            )  # fmt: skip
        if len(shown) > _MAX_ROWS:
            table.add_row(f"... {len(shown) - _MAX_ROWS} more (see attention.csv)", *[""] * 9)
        console.print(table)
    if record.probe is not None:
        probe = record.probe
        if probe.status == "ran":
            rejected = [o for o in record.ops if o.htp == "no"]
            console.print(
                f"HTP ({probe.soc}, QNN EP, CPU fallback off): {sum(1 for o in record.ops if o.htp == 'yes')} op type(s) taken, "
                + (f"[red]{len(rejected)} rejected[/]: " + escape(", ".join(f"{o.op} ({o.reason.split(': ', 1)[-1]})" for o in rejected)) if rejected else "none rejected")
                + f"; {sum(1 for o in record.ops if o.htp == 'unknown' and o.converted)} unknown"
            )  # fmt: skip
        else:
            console.print(f"[yellow]HTP support unknown[/]: {escape(probe.message)}")
    high = record.facts.high_rank
    if high:
        after = record.high_rank_after_split
        inside = len(set(record.rank_in_split_blocks) & {t for t, _, _ in high})
        tail = f" ({len(after)} after the split)" if after is not None else f" ({inside} inside blocks the split recomputes)"
        console.print(f"{len(high)} tensor(s) of rank > 4{tail}: {escape(', '.join(t for t, _, _ in high[:3]))}")
    if record.encodings is not None:
        e = record.encodings
        console.print(
            f"Encodings: {e.encoded_activations}/{e.float_activations} activations, {e.encoded_weights}/{e.weights} weights, "
            f"{len(e.unknown)} naming no tensor"
            + (f"; propagation {'has gaps' if not record.coverage.ok else 'complete'}" if record.coverage is not None else "")
        )
    if record.shape_suggestion:
        console.print(f"Static shapes: {escape(record.shape_suggestion)}")
    for note in record.notes:
        console.print(f"[yellow]Note:[/] {escape(note)}")
    for problem in record.problems:
        console.print(f"[red]Would stop convert:[/] {escape(problem)}")
