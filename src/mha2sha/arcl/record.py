"""What ``build-ar`` did: the only output of the stage (the report, the CLI table and the tests read it)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from rich.table import Table

from mha2sha.arcl.rewrite import ConstantRewrite
from mha2sha.errors import ConversionFailed

__all__ = ["ArRecord", "VariantRecord", "LoopRow", "VerificationFailed"]


class VerificationFailed(ConversionFailed):
    """A variant's token loop disagrees with the original's (or does not run). Exit code 1, nothing written."""


@dataclasses.dataclass
class VariantRecord:
    """One graph written: its AR / CL, I/O shapes and the constants rewritten for it."""

    ar: int
    cl: int
    path: Path
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    constants: list[ConstantRewrite]
    encodings: Path | None = None

    @property
    def past(self) -> int:
        return self.cl - self.ar

    def to_dict(self) -> dict:
        return {
            "ar": self.ar,
            "cl": self.cl,
            "path": str(self.path),
            "encodings": str(self.encodings) if self.encodings else None,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "constants_rewritten": [c.to_dict() for c in self.constants],
        }


@dataclasses.dataclass
class LoopRow:
    """One variant's token loop against the original's: worst per-token logits and cache error."""

    variant: str
    mode: str  # "float" | "qdq"
    tokens: int
    steps: int  # calls of the variant (the original took ``reference_steps``)
    reference_steps: int
    logits_err: float
    kv_err: float
    limit: float
    unit: str  # "rel" | "lsb"
    worst_token: int | None
    ok: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ArRecord:
    """Everything one ``build-ar`` run produced."""

    source: Path
    ar: int  # of the source graph
    cl: int
    style: str  # prepared (new entries) / present (HF) / prefill
    inputs: dict[str, dict]  # input roles of the source
    variants: list[VariantRecord] = dataclasses.field(default_factory=list)
    data_file: Path | None = None
    shared_tensors: int = 0
    shared_bytes: int = 0
    verification: list[LoopRow] = dataclasses.field(default_factory=list)
    verify_mode: str = "none"
    notes: list[str] = dataclasses.field(default_factory=list)
    files: list[Path] = dataclasses.field(default_factory=list)
    phases: list[dict] = dataclasses.field(default_factory=list)  # name, seconds, peak_rss_mb

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.verification)

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "ar": self.ar,
            "cl": self.cl,
            "style": self.style,
            "input_roles": self.inputs,
            "data_file": str(self.data_file) if self.data_file else None,
            "shared_tensors": self.shared_tensors,
            "shared_bytes": self.shared_bytes,
            "variants": [v.to_dict() for v in self.variants],
            "verification": {"mode": self.verify_mode, "rows": [r.to_dict() for r in self.verification]},
            "notes": list(self.notes),
            "phases": list(self.phases),
        }

    def table(self) -> Table:
        table = Table(title=f"AR/CL variants of {self.source.name} (AR {self.ar}, CL {self.cl}, {self.style})",
                      title_justify="left")  # fmt: skip
        for col in ("graph", "AR", "CL", "constants", "token loop", "logits err", "cache err", "result"):
            table.add_column(col, justify="right" if col in ("AR", "CL", "constants") else "left")
        rows: dict[str, list[LoopRow]] = {r.variant: [] for r in self.verification}
        for r in self.verification:
            rows[r.variant].append(r)
        for v in self.variants:
            checks = rows.get(v.path.name, [])
            if not checks:
                table.add_row(
                    v.path.name, str(v.ar), str(v.cl), str(len(v.constants)), "-", "-", "-", "not verified"
                )
            for r in checks:
                table.add_row(
                    v.path.name if r is checks[0] else "",
                    str(v.ar),
                    str(v.cl),
                    str(len(v.constants)),
                    f"{r.mode}: {r.tokens} tokens, {r.steps} vs {r.reference_steps} steps",
                    _fmt(r.logits_err, r.unit),
                    _fmt(r.kv_err, r.unit),
                    "[green]PASS[/]" if r.ok else "[red]FAIL[/]",
                )
        return table


def _fmt(x: float, unit: str) -> str:
    if math.isinf(x):
        return "inf"
    return f"{x:g} LSB" if unit == "lsb" else f"{x:.2e}"
