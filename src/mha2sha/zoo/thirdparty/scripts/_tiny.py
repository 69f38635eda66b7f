"""Shared by the export scripts that run inside the tools' own venvs (not imported by mha2sha).

Tiny random-weight models built from transformers config objects, a seeded re-initialisation (the
same rules as ``mha2sha.zoo.weights``: fan-in scaled normal weights, non-zero biases, norm weights
around 1, so no tool can drop an all-zero bias and attention logits stay O(1)), a local word-level
tokenizer for tools that insist on one, and the manifest every script writes.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

VOCAB = 256
SEED = 1234

# Decoder sizes: 4 query heads of 16, 2 KV heads (GQA), 2 layers.
DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def reinit_(model, seed: int = SEED):
    """Re-draw every parameter in place from a private seeded generator (see module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for _, module in model.named_modules():
            kind = type(module).__name__
            for pname, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                if param.dim() == 0:  # scalars (CLIP's logit_scale) keep their value
                    continue
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                if pname.endswith("bias"):
                    value = 0.02 * noise
                elif "norm" in kind.lower() and param.dim() == 1:
                    offset = 0.0 if "Gemma" in kind and "RMSNorm" in kind else 1.0
                    value = offset + 0.1 * noise
                elif param.dim() >= 2 and not isinstance(module, torch.nn.Embedding):
                    fan = int(param.shape[0]) if kind == "Conv1D" else int(param[0].numel())
                    value = noise / fan**0.5
                else:
                    value = noise / int(param.shape[-1]) ** 0.5
                param.copy_(value.to(param.dtype))
    return model.eval()


def tokenizer():
    """A word-level fast tokenizer over ``t0 .. t{VOCAB-1}`` (pad t0, bos t1, eos t2, unk t3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t3", bos_token="t1", eos_token="t2", pad_token="t0"
    )


def versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


class Manifest:
    """``<out>/manifest.json``: per graph, its ONNX file(s) or the error that stopped its export.

    Each graph is exported on its own; a failure is recorded (last traceback lines) and the next
    graph goes on, so one broken export does not hide the others.
    """

    def __init__(self, out: Path, tool: str, packages: tuple[str, ...]) -> None:
        self.out = out
        self.data: dict = {"tool": tool, "versions": versions(*packages), "graphs": {}}

    def run(self, graph_id: str, make: Callable[[Path], dict], **meta: object) -> None:
        """Export one entry into ``<out>/<graph_id>``; ``make(folder)`` returns ``{"graphs": {part: file}}``."""
        folder = self.out / graph_id
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        entry: dict = dict(meta)
        try:
            entry.update(make(folder))
        except Exception as exc:  # recorded, reported by the corpus test
            lines = traceback.format_exc().strip().splitlines()
            entry["error"] = (
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            )
            entry["traceback"] = lines[-12:]
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.data["graphs"][graph_id] = entry
        status = entry.get("error") or "ok"
        print(
            f"[{self.data['tool']}] {graph_id}: {status} ({entry['seconds']} s)", file=sys.stderr, flush=True
        )

    def save(self) -> None:
        (self.out / "manifest.json").write_text(json.dumps(self.data, indent=2, sort_keys=True))


def main(
    tool: str, packages: tuple[str, ...], exports: list[tuple[str, Callable[[Path], dict], dict]]
) -> None:
    """``script.py OUT`` exports everything into OUT; ``script.py --list`` prints the exports as JSON.

    Each export's meta names its ``parts``: ``""`` for a single graph, else the suffixes of the
    graphs it writes (``encoder``, ``decoder_merged``); the listing needs none of the tool's packages.
    """
    if sys.argv[1:] == ["--list"]:
        print(json.dumps([{"id": export_id, **meta} for export_id, _, meta in exports]))
        return
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    manifest = Manifest(Path(sys.argv[1]), tool, packages)
    for export_id, make, meta in exports:
        manifest.run(export_id, make, **meta)
    manifest.save()
