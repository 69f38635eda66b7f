"""Blockwise verification on small zoo models: every layout the split and the HTP layout produce.

The block boundaries come from dataflow (values present in both graphs with the same name and
shape), so they must hold for packed QKV (the converted graph reaches back past the original's
Split), per-head KV I/O (graph inputs replaced by per-head inputs), the HTP layout (tensors that keep
their name in another layout) and multi-output nodes cut through. A swapped head must fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mha2sha.api import ConvertOptions, convert
from mha2sha.io.load import load_model
from mha2sha.verify.blocks import find_blocks, verify_blocks
from mha2sha.zoo import build

CASES = [
    ("llama_gqa_step", "torchscript", {}),
    ("llama_gqa_step", "dynamo", {"per_head_kv_io": True}),
    ("gpt2_step", "torchscript", {}),  # packed c_attn: per-head q from the hidden state
    ("gemma2_step", "torchscript", {"per_head_kv_io": True}),
    ("llama_lora_step", "torchscript", {"htp_layout": True}),  # LoRA A output renamed in BD1L
    ("gpt_neox_step", "dynamo", {}),  # Split computed for one output, fed for another
    ("prepared_llama_gqa_step", "torchscript", {"htp_layout": True}),
]


def _converted(tmp_path: Path, case: str, exporter: str, flags: dict) -> tuple[Path, Path]:
    source = build(case, exporter)
    result = convert(source, tmp_path / "out", options=ConvertOptions(verify=False, **flags))
    assert result.split_blocks
    return source, next(p for p in result.files if p.suffix == ".onnx")


@pytest.mark.parametrize(("case", "exporter", "flags"), CASES, ids=lambda x: str(x) if x else "default")
def test_blocks_pass(tmp_path: Path, case: str, exporter: str, flags: dict):
    source, converted = _converted(tmp_path, case, exporter, flags)
    original, sha = load_model(source), load_model(converted)
    blocks = find_blocks(original, sha)
    assert blocks
    check = verify_blocks(original, sha, blocks)
    assert check.ok and check.max_rel_err <= 1e-5, [r for r in check.rows if not r.ok]


@pytest.mark.parametrize("case", ["gpt2_step", "llama_gqa_step"])
def test_blocks_catch_swapped_heads(tmp_path: Path, case: str):
    source, converted = _converted(tmp_path, case, "torchscript", {})
    original, sha = load_model(source), load_model(converted)
    inits = sha.graph.initializers
    h0 = next(n for n in inits if n.endswith(".h0") and n[:-1] + "1" in inits and "layers.1" not in n)
    h1 = h0[:-1] + "1"
    assert inits[h0].shape == inits[h1].shape
    inits[h0].const_value, inits[h1].const_value = inits[h1].const_value, inits[h0].const_value
    check = verify_blocks(original, sha)
    assert not check.ok
