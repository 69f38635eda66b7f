"""The case registry: every zoo model by name."""

from __future__ import annotations

from . import decoders, encoders, prepared
from .spec import Case, CaseInfo


def _collect() -> dict[str, Case]:
    registry: dict[str, Case] = {}
    for case in [*decoders.cases(), *encoders.cases(), *prepared.cases()]:
        if case.info.name in registry:
            raise RuntimeError(f"duplicate zoo case {case.info.name!r}")
        registry[case.info.name] = case
    return registry


REGISTRY: dict[str, Case] = _collect()
CASES: dict[str, CaseInfo] = {name: case.info for name, case in REGISTRY.items()}
