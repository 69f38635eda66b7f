"""Fuse tiny optimum exports with onnxruntime's transformers optimizer (runs in the optimum venv).

``python ort_optimize.py OUT`` exports each input model with optimum-onnx (eager attention, which
the optimizer's attention patterns are written for, and SDPA for BERT), then runs
``onnxruntime.transformers.optimizer.optimize_model`` with the model type and default options a user
would pick (``python -m onnxruntime.transformers.optimizer --model_type ...``), writing
``OUT/<id>/model.onnx`` and ``OUT/manifest.json``. The manifest records the fused ops that actually
appeared (``optimizer.get_fused_operator_statistics()``), since a pattern that does not match
leaves the graph unfused without an error.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from _tiny import main as main_entry
from optimum_export import DIMS, export

PACKAGES = ("onnxruntime", "optimum-onnx", "transformers", "torch", "onnx")
HEADS, HIDDEN = 4, 64

# (id, family, attn, source file, optimizer model_type, FusionOptions overrides)
JOBS: list[tuple[str, str, str, str, str, dict]] = [
    ("ortopt_bert_eager", "bert", "eager", "model.onnx", "bert", {}),
    ("ortopt_bert_sdpa", "bert", "sdpa", "model.onnx", "bert", {}),
    ("ortopt_bert_mha", "bert", "eager", "model.onnx", "bert", {"use_multi_head_attention": True}),
    ("ortopt_bert_fastgelu", "bert", "eager", "model.onnx", "bert", {"enable_gelu_approximation": True}),
    ("ortopt_gpt2", "gpt2", "eager", "model.onnx", "gpt2", {}),
    ("ortopt_vit", "vit", "eager", "model.onnx", "vit", {}),
    ("ortopt_clip", "clip", "eager", "model.onnx", "clip", {}),
    ("ortopt_t5_encoder", "t5", "eager", "encoder_model.onnx", "bart", {}),
    ("ortopt_whisper_encoder", "whisper", "eager", "encoder_model.onnx", "bart", {}),
]


def _job(family: str, attn: str, source: str, model_type: str, overrides: dict):
    def make(folder: Path) -> dict:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        src = folder / "source"
        export(family, attn, src, past=False)
        options = FusionOptions(model_type)
        for key, value in overrides.items():
            setattr(options, key, value)
        optimized = optimize_model(
            str(src / source),
            model_type=model_type,
            num_heads=HEADS,
            hidden_size=HIDDEN,
            optimization_options=options,
        )
        optimized.save_model_to_file(str(folder / "model.onnx"))
        fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
        shutil.rmtree(src)
        return {"graphs": {"": "model.onnx"}, "fused_by_optimizer": fused}

    return make


def exports() -> list[tuple[str, object, dict]]:
    out = []
    for graph_id, family, attn, source, model_type, overrides in JOBS:
        meta = {
            "family": family,
            "attn": attn,
            "model_type": model_type,
            "fusion_options": overrides,
            "dims": DIMS.get(family, {}),
            "parts": [""],
        }
        out.append((graph_id, _job(family, attn, source, model_type, overrides), meta))
    return out


if __name__ == "__main__":
    main_entry("onnxruntime-transformers-optimizer", PACKAGES, exports())
