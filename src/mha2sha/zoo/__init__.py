"""Zoo of tiny, deterministic transformer models exported to ONNX, for testing the MHA->SHA rewrite.

``build(case, exporter)`` returns a cached static-shape ``.onnx`` file; ``example_inputs`` and
``torch_reference`` give the matching inputs and the PyTorch outputs, so a test can check the
exported (and later, the converted) graph numerically. Needs the ``export`` extra (torch);
transformers, peft and diffusers are imported only when a case is built.

``CASES`` are the eager-attention cases (exporters ``EXPORTERS``); ``VARIANTS`` are the same
builders with transformers' default SDPA attention (``<case>_sdpa``), exported with their own
exporters, including other opsets (``EXTRA_EXPORTERS``: TorchScript 20, dynamo 18 and 23).
``build``, ``example_inputs`` and ``torch_reference`` take either.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from .cache import cache_key, cache_root, cached_build
from .cases import CASES, REGISTRY, VARIANT_REGISTRY, VARIANTS
from .spec import ALL_EXPORTERS, EXPORTERS, EXTRA_EXPORTERS, Built, CaseInfo

__all__ = [
    "ALL_EXPORTERS",
    "CASES",
    "EXPORTERS",
    "EXTRA_EXPORTERS",
    "VARIANTS",
    "CaseInfo",
    "available_cases",
    "available_variants",
    "build",
    "cache_root",
    "case_info",
    "example_inputs",
    "torch_reference",
]


def available_cases(exporter: str | None = None) -> list[str]:
    """Case names, optionally only those known to export with ``exporter``."""
    return [n for n, info in CASES.items() if exporter is None or exporter in info.exporters]


def available_variants(exporter: str | None = None) -> list[str]:
    """Variant case names (``*_sdpa``), optionally only those exported with ``exporter``."""
    return [n for n, info in VARIANTS.items() if exporter is None or exporter in info.exporters]


def _case(case: str):
    entry = REGISTRY.get(case) or VARIANT_REGISTRY.get(case)
    if entry is None:
        raise KeyError(f"unknown zoo case {case!r}; see mha2sha.zoo.available_cases() / available_variants()")
    return entry


def case_info(case: str) -> CaseInfo:
    """Metadata of a case or a variant."""
    return _case(case).info


@lru_cache(maxsize=8)
def _built(case: str) -> Built:
    """One in-process build per case for references; exports always use a fresh build."""
    return _case(case).builder()


def build(case: str, exporter: str = "torchscript", *, ar: int | None = None, cl: int | None = None) -> Path:
    """Path of the exported ONNX model for ``case``, exporting it on first use.

    ``ar`` / ``cl`` export the same model with the same weights at another number of tokens per
    step and context length (step and prefill cases; a prefill graph has CL = AR), e.g. to compare
    an AR/CL rewrite of the default export with a re-export.
    """
    entry = _case(case)
    if exporter not in ALL_EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {ALL_EXPORTERS}")
    if exporter not in entry.info.exporters:
        raise NotImplementedError(f"{case} does not export with {exporter}: {entry.info.notes}")
    info, builder, label = entry.info, entry.builder, case
    if ar is not None or cl is not None:
        if entry.at is None:
            raise NotImplementedError(f"{case} cannot be exported at another AR/CL")
        ar = info.seq_len if ar is None else ar
        cl = (info.seq_len + info.past_len if info.past_len else ar) if cl is None else cl
        prefill = info.past_len == 0
        if ar < 1 or (prefill and cl != ar) or (not prefill and cl <= ar):
            raise ValueError(f"{case}: AR {ar} / CL {cl} out of range")
        info = replace(info, seq_len=ar, past_len=cl - ar)
        builder, label = (lambda: entry.at(ar, cl)), f"{case}_ar{ar}_cl{cl}"

    def produce(path: Path) -> dict:
        from .export import export

        built = builder()
        export(built, path, exporter)
        return {
            "info": asdict(info),
            "case": case,
            "exporter": exporter,
            "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in built.inputs.items()},
            "outputs": built.output_names,
        }

    return cached_build(cache_key(label, exporter), produce)


_KEEP = ("mask", "position", "cos", "sin")  # structural inputs: redrawing them would make nonsense


def example_inputs(case: str, seed: int | None = None) -> dict[str, np.ndarray]:
    """Inputs keyed by ONNX input name, in graph input order.

    ``seed=None`` gives exactly the tensors the model was traced with. An integer seed redraws the
    free inputs (token ids within the vocabulary, float activations / pixels / features / past KV
    from N(0, 1)) but keeps masks, position ids and RoPE tables, which must stay consistent; use
    it to catch values that the exporter wrongly baked into the graph.
    """
    base = {k: v.detach().cpu().numpy().copy() for k, v in _built(case).inputs.items()}
    if seed is None:
        return base
    info = case_info(case)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, value in base.items():
        if any(tag in name for tag in _KEEP):
            out[name] = value
        elif name.endswith("input_ids") and info.vocab_size:
            out[name] = rng.integers(0, info.vocab_size, value.shape).astype(value.dtype)
        elif np.issubdtype(value.dtype, np.floating):
            out[name] = rng.standard_normal(value.shape).astype(value.dtype)
        else:
            out[name] = value
    return out


def torch_reference(case: str, inputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run the PyTorch model on ``inputs`` (default: ``example_inputs``), keyed by ONNX output name."""
    import torch

    built = _built(case)
    feeds = inputs if inputs is not None else example_inputs(case)
    missing = set(built.inputs) - set(feeds)
    if missing:
        raise KeyError(f"{case}: missing inputs {sorted(missing)}")
    args = [torch.from_numpy(np.asarray(feeds[name])) for name in built.inputs]
    with torch.no_grad():
        out = built.module(*args)
    if isinstance(out, torch.Tensor):
        out = (out,)
    return {name: t.detach().cpu().numpy() for name, t in zip(built.output_names, out, strict=True)}
