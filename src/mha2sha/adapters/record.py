"""What the adapters stage made of each adapter: the only output of the stage.

Saving, verification and the report read these records, never the stage's internals.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mha2sha.adapters.alpha import AlphaRecord
from mha2sha.encodings import CoverageReport, EncodingSet

__all__ = ["AdapterResult", "AdaptersRecord"]


@dataclasses.dataclass
class AdapterResult:
    """One adapter fitted to the SHA graph.

    ``tensors`` are the SHA graph's tensors with this adapter in (what the runtime writes), keyed by
    the SHA graph's names; ``name_map`` maps each base-graph tensor the adapters update to them.
    ``mha_tensors`` are the base graph's tensors with this adapter in (the reference verification
    runs against). ``mha_encodings`` are the base graph's encodings with this adapter's in their
    place (with ``--lora-alpha-from-input``: of the base graph with that input); ``scope`` names the
    adapter's own among them, and ``encodings`` are those propagated to the SHA graph (what is
    written: as much as the adapter's file held, e.g. only its LoRA tensors' encodings).
    """

    name: str
    tensors: dict[str, np.ndarray]
    name_map: dict[str, list[str]]
    mha_tensors: dict[str, np.ndarray]
    padded: dict[str, tuple[int, int]]  # base-graph tensor -> (adapter's rank, graph's rank)
    zero_filled: list[str]  # LoRA weights of the graph the adapter does not name (zero for it)
    scale: float | None = None  # the lora_alpha value with --lora-alpha-from-input
    scale_source: str = ""
    mha_encodings: EncodingSet | None = None
    scope: set[str] = dataclasses.field(default_factory=set)
    encodings: EncodingSet | None = None
    coverage: CoverageReport | None = None
    alpha_encoding_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tensors": len(self.tensors),
            "padded": {k: list(v) for k, v in self.padded.items()},
            "zero_filled": list(self.zero_filled),
            "lora_alpha": self.scale,
            "lora_alpha_source": self.scale_source or None,
            "lora_alpha_encoding": self.alpha_encoding_source or None,
            "encodings": self.encodings is not None,
            "encodings_coverage_ok": self.coverage.ok if self.coverage is not None else None,
        }


@dataclasses.dataclass
class AdaptersRecord:
    """Every adapter of the list, fitted to the SHA graph."""

    adapters: list[AdapterResult]
    lora_tensors: list[str]  # base-graph tensors the adapters update
    sha_tensors: list[str]  # SHA-graph tensors they become (the runtime's updatable tensors)
    alpha: AlphaRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lora_tensors": len(self.lora_tensors),
            "sha_tensors": len(self.sha_tensors),
            "lora_alpha_input": self.alpha.to_dict() if self.alpha else None,
            "adapters": [a.to_dict() for a in self.adapters],
        }
