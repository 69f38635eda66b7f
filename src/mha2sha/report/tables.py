"""Summaries a person reads: one row per attention block, one line per finding."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from mha2sha.split.split_heads import BlockReport
from mha2sha.verify.htp import HtpCheck

__all__ = ["blocks_table", "blocks_json", "htp_summary"]


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


def htp_summary(check: HtpCheck) -> str:
    """Two lines: does SHA run on HTP alone, and how far MHA and SHA are apart there."""

    def support(runs: bool, unsupported: list[tuple[str, str]]) -> str:
        if runs:
            return "[green]runs on HTP with CPU fallback disabled[/]"
        ops = sorted({op for _, op in unsupported})
        return f"[yellow]needs CPU fallback[/] ({len(unsupported)} unsupported nodes: {', '.join(ops) or 'see log'})"

    worst = max(check.max_lsb.values(), default=0.0)
    agreement = "bit-exact" if worst == 0 else f"max {worst:g} LSB"
    mode = " (informational: unsupported nodes ran on the CPU)" if check.cpu_fallback_used else ""
    return (
        f"HTP emulator {check.soc}: SHA {support(check.sha_on_htp_only, check.sha_unsupported)}; "
        f"MHA {support(check.mha_on_htp_only, check.mha_unsupported)}\n"
        f"HTP emulator {check.soc}: MHA vs SHA {agreement}{mode}"
    )
