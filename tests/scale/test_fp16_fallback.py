"""fp16 models: whole-model verification can fail by CPU kernel rounding alone; blocks decide.

onnxruntime's CPU kernels round a 64-column fp16 matmul (one head) differently from a 256-column one
(all heads), so the whole-model comparison of an exact split of a small Llama-shaped fp16 model
(hidden 256, 4 heads x 64, 2 layers, from ``benchmarks/generate.py``) differs by ~5e-4 at the logits,
above the default rtol 1e-5. ``convert`` then verifies block by block, where a block that differs in
fp16 is re-run in fp32 (exactly equal), and reports both. The same model in fp32 passes whole; a
real error (two heads swapped) still fails block by block.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mha2sha.api import ConvertOptions, convert
from mha2sha.io.load import load_model
from mha2sha.verify.blocks import verify_blocks

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.generate import SHAPES, LLMShape, generate  # noqa: E402

TINY = LLMShape("LlamaConfig", 256, 128, 2, 4, 2, 500, head_dim=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fp16")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SHAPES, "tiny-llama-d64", TINY)
        return {
            dtype: generate("tiny-llama-d64", folder, dtype=dtype, ar=8, context=32)
            for dtype in ("fp16", "fp32")
        }


def test_fp16_full_rounding_is_decided_blockwise(models: dict[str, Path], tmp_path: Path):
    result = convert(models["fp16"], tmp_path / "out", options=ConvertOptions(verify="full"))
    plan = result.verify_plan
    assert plan is not None and plan.full is not None
    assert not plan.full.ok and plan.full.rtol == 1e-5  # the whole-model run really differs
    assert 1e-5 < plan.full.max_rel_err < 8 * 2**-10
    assert result.verify_mode == "blocks" and result.verification.ok and result.verification.rtol == 1e-5
    assert any("float16 kernel rounding" in r.note for r in result.verification.rows)

    report = json.loads((tmp_path / "out" / "model.report.json").read_text())["verification"]
    assert report["requested"] == "full" and report["mode"] == "blocks" and report["ok"]
    assert len(report["notes"]) == 1 and "decided block by block" in report["notes"][0]
    assert not all(r["ok"] for r in report["full_outputs"])


def test_fp32_passes_whole(models: dict[str, Path], tmp_path: Path):
    result = convert(models["fp32"], tmp_path / "out", options=ConvertOptions(verify="auto"))
    assert result.verify_mode == "full" and result.verification.ok
    assert result.verify_plan is not None and result.verify_plan.full is None


def test_fp16_swapped_heads_still_fail(models: dict[str, Path], tmp_path: Path):
    convert(models["fp16"], tmp_path / "out", options=ConvertOptions(verify="none"))
    original, converted = load_model(models["fp16"]), load_model(tmp_path / "out" / "model.onnx")
    inits = converted.graph.initializers
    h0 = [n for n in inits if n.endswith(".h0")][
        -1
    ]  # small weights get exporter names: the last q is layer 1's
    h1 = h0[:-1] + "1"
    inits[h0].const_value, inits[h1].const_value = inits[h1].const_value, inits[h0].const_value
    check = verify_blocks(original, converted)
    assert not check.ok
    assert all("kernel rounding" not in r.note for r in check.rows if not r.ok)
