"""Deterministic re-initialisation of test-model weights.

HF/diffusers default inits (std 0.02, norms = 1, zero biases) give near-uniform softmax and many equal
tensors, which hides bugs in a head-splitting rewrite (a wrong head permutation can still "match").
Re-drawing every parameter with a fan-in scaled normal keeps attention logits O(1) and makes every
tensor distinct, so numerical equivalence checks are meaningful.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

SEED = 1234

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _fan_in(module: nn.Module, weight: torch.Tensor) -> int:
    """Input features of a weight; GPT-2's Conv1D stores its weight as [in, out]."""
    if type(module).__name__ == "Conv1D":
        return int(weight.shape[0])
    if weight.dim() < 2:
        return int(weight.shape[0])
    fan = 1
    for d in weight.shape[1:]:
        fan *= int(d)
    return fan


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _norm_offset(module: nn.Module) -> float:
    """Gemma-style RMSNorms compute ``x * (1 + w)``; their ``w`` should sit around 0, not 1."""
    name = type(module).__name__
    return 0.0 if "Gemma" in name and "RMSNorm" in name else 1.0


@torch.no_grad()
def reinit_(model: ModuleT, seed: int = SEED) -> ModuleT:
    """Re-draw every parameter of ``model`` in place from a private seeded generator.

    Linear/Conv/Embedding (and any other >=2-D) weights ~ N(0, 1/fan_in); biases ~ N(0, 0.02^2);
    norm weights ~ 1 + 0.1 N(0, 1). Parameters are visited in ``named_modules`` order so the result
    depends only on the architecture and the seed.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for _, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights: draw once
                continue
            seen.add(id(param))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if pname.endswith("bias"):
                value = 0.02 * noise
            elif _is_norm(module) and param.dim() == 1:
                value = _norm_offset(module) + 0.1 * noise
            elif param.dim() >= 2 and not isinstance(module, nn.Embedding):
                value = noise / _fan_in(module, param) ** 0.5
            else:
                # Embeddings, class tokens, position tables: rows of norm ~1.
                value = noise / int(param.shape[-1]) ** 0.5
            param.copy_(value.to(param.dtype))
    return model
