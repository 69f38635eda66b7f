"""Build ONNX models with the onnxruntime-genai model builder (runs in the genai venv).

``python genai_build.py OUT``: for each family a tiny random-weight HF folder (config, safetensors,
a local word-level tokenizer: the builder loads one with ``AutoTokenizer``) is saved under
``OUT/<id>/hf`` and converted by the builder's own command line,
``python -m onnxruntime_genai.models.builder -i hf -o onnx -p fp32 -e cpu``, run in this process
(``runpy``) so torch is imported once. The result, ``OUT/<id>/onnx/model.onnx`` (+ ``.data``), uses
``com.microsoft.GroupQueryAttention`` with RoPE inside (cos/sin caches as initializers),
``SkipSimplifiedLayerNormalization`` and ``seqlens_k`` / ``total_sequence_length`` computed from the
2-D attention mask.
"""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

from _tiny import DECODER, reinit_, tokenizer
from _tiny import main as main_entry

PACKAGES = ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx", "onnx-ir")
HEAD_DIM = DECODER["hidden_size"] // DECODER["num_attention_heads"]


def _config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**DECODER)
    if family == "mistral":
        return tf.MistralConfig(**DECODER, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**DECODER, use_sliding_window=False, tie_word_embeddings=False)
    if family == "phi3":
        # equal max / original max positions: the builder's Phi3Mini (no LongRoPE) path
        return tf.Phi3Config(**DECODER, original_max_position_embeddings=DECODER["max_position_embeddings"])
    if family == "gemma":
        return tf.GemmaConfig(**{**DECODER, "num_key_value_heads": 1}, head_dim=HEAD_DIM)
    raise KeyError(family)


FAMILIES = {
    "llama": "Llama GQA 4/2",
    "mistral": "Mistral GQA 4/2, no sliding window",
    "qwen2": "Qwen2 GQA 4/2 with q/k/v biases",
    "phi3": "Phi-3 GQA 4/2, packed qkv_proj",
    "gemma": "Gemma MQA (1 KV head), GELU MLP",
}


def _build(family: str):
    def make(folder: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = reinit_(AutoModelForCausalLM.from_config(_config(family)))
        hf, onnx_dir, cache = folder / "hf", folder / "onnx", folder / "cache"
        model.save_pretrained(hf)
        tokenizer().save_pretrained(hf)
        argv = ["builder", "-i", str(hf), "-o", str(onnx_dir), "-p", "fp32", "-e", "cpu", "-c", str(cache)]
        saved = sys.argv
        sys.argv = argv
        try:
            runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=False)
        finally:
            sys.argv = saved
        shutil.rmtree(cache, ignore_errors=True)
        return {
            "graphs": {"": "onnx/model.onnx"},
            "command": "python -m onnxruntime_genai.models.builder " + " ".join(argv[1:]),
            "dims": {"kv_cache_dim": HEAD_DIM},
        }

    return make


def exports() -> list[tuple[str, object, dict]]:
    return [
        (f"genai_{family}", _build(family), {"family": family, "description": description, "parts": [""]})
        for family, description in FAMILIES.items()
    ]


if __name__ == "__main__":
    main_entry("onnxruntime-genai", PACKAGES, exports())
