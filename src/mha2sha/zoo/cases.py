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


def _collect_variants() -> dict[str, Case]:
    registry: dict[str, Case] = {}
    for case in [*decoders.variant_cases(), *encoders.variant_cases()]:
        if case.info.name in registry or case.info.name in REGISTRY:
            raise RuntimeError(f"duplicate zoo case {case.info.name!r}")
        registry[case.info.name] = case
    return registry


REGISTRY: dict[str, Case] = _collect()
CASES: dict[str, CaseInfo] = {name: case.info for name, case in REGISTRY.items()}
"""The eager cases: every converter test of the zoo runs on these with both default exporters."""

VARIANT_REGISTRY: dict[str, Case] = _collect_variants()
VARIANTS: dict[str, CaseInfo] = {name: case.info for name, case in VARIANT_REGISTRY.items()}
"""Variant cases (``*_sdpa``: transformers' default SDPA attention), each with its own exporters
(``EXTRA_EXPORTERS`` included). Kept apart from ``CASES`` so the family tests are unchanged; the
third-party corpus (``mha2sha.zoo.thirdparty``) lists and converts them."""
