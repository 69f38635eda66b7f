"""Case metadata and the in-memory form of a built test model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
"""The default pair: every eager case is exported (and tested) with both."""

EXTRA_EXPORTERS: tuple[str, ...] = ("torchscript20", "dynamo18", "dynamo23")
"""Other opsets, opted into per case (``CaseInfo.exporters``) by the variant cases.

``torchscript`` is opset 17 and ``dynamo`` torch's default opset (20 with torch 2.13); a trailing
number pins the opset. TorchScript at 20 writes ``Gelu`` and reduction axes as inputs; dynamo at 23
may write the ONNX ``Attention`` op for ``F.scaled_dot_product_attention``.
"""

ALL_EXPORTERS: tuple[str, ...] = EXPORTERS + EXTRA_EXPORTERS
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa")


def exporter_opset(exporter: str) -> tuple[str, int | None]:
    """``"dynamo23"`` -> ``("dynamo", 23)``; ``"torchscript"`` -> ``("torchscript", 17)``; ``"dynamo"`` -> ``("dynamo", None)``."""
    if exporter not in ALL_EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {ALL_EXPORTERS}")
    for kind in ("torchscript", "dynamo"):
        if exporter.startswith(kind):
            rest = exporter[len(kind) :]
            if rest:
                return kind, int(rest)
            return kind, (17 if kind == "torchscript" else None)
    raise AssertionError(exporter)


@dataclass(frozen=True)
class CaseInfo:
    """What a zoo case is, so a test can pick cases by property instead of by name.

    ``heads``/``kv_heads``/``head_dim`` describe the (self-)attention the converter must split.
    ``exporters`` lists the exporters known to work; ``notes`` says why one is missing, and any
    graph-structure quirk worth knowing. ``attn_implementation`` is the transformers attention the
    model was built with: ``"eager"`` (explicit MatMul/Softmax, every case in ``CASES``) or
    ``"sdpa"`` (``F.scaled_dot_product_attention``, the ``*_sdpa`` variants in ``VARIANTS``).
    """

    name: str
    family: str
    description: str
    kind: str  # "prefill" | "step" | "encoder" | "decoder" | "seq2seq" | "block" | "prepared_step"
    heads: int
    kv_heads: int
    head_dim: int
    layers: int = 2
    seq_len: int = 0  # tokens processed per call (AR for step graphs)
    past_len: int = 0  # KV entries supplied as input (step graphs)
    vocab_size: int = 0  # token-id inputs are drawn from [0, vocab_size); 0 if none
    notes: str = ""
    exporters: tuple[str, ...] = EXPORTERS
    attn_implementation: str = "eager"


@dataclass
class Built:
    """A ready-to-export module: ``module(*inputs.values())`` returns tensors named ``output_names``."""

    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    output_names: list[str]


@dataclass(frozen=True)
class Case:
    """A registry entry: metadata plus the zero-argument function that builds the model."""

    info: CaseInfo
    builder: Callable[[], Built] = field(repr=False)
    #: the same model and weights built for ``(ar, cl)`` tokens per step / context length (step and
    #: prefill graphs; a prefill graph has CL = AR), for re-export comparisons of AR/CL rewrites
    at: Callable[[int, int], Built] | None = field(default=None, repr=False)
