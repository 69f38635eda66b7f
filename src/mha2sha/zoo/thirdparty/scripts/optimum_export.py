"""Export tiny random-weight HF models with Hugging Face optimum-onnx (runs in the optimum venv).

``python optimum_export.py OUT`` writes ``OUT/<export_id>/*.onnx`` and ``OUT/manifest.json``.
The models are built here from config objects (transformers < 4.58, which optimum-onnx needs) and
exported with ``optimum.exporters.onnx.onnx_export_from_model``, the function behind
``optimum-cli export onnx`` once the model is loaded: same ONNX configs, dummy inputs, dynamic axes
and post-processing (the seq2seq decoders are merged into ``decoder_model_merged.onnx`` with an
``If`` on ``use_cache_branch``). Attention is transformers' default (SDPA) unless ``eager``.
"""

from __future__ import annotations

from pathlib import Path

from _tiny import DECODER, VOCAB, reinit_
from _tiny import main as main_entry

PACKAGES = ("optimum-onnx", "optimum", "transformers", "torch", "onnx", "onnxruntime")


def _config(family: str):
    import transformers as tf

    if family == "llama_gqa":
        return tf.LlamaConfig(**DECODER)
    if family == "qwen2":
        return tf.Qwen2Config(**DECODER, use_sliding_window=False, tie_word_embeddings=False)
    if family == "phi3":
        return tf.Phi3Config(**DECODER, original_max_position_embeddings=DECODER["max_position_embeddings"])
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=128)
    if family == "bert":
        return tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
        )
    if family == "vit":
        return tf.ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
        )
    if family == "clip":
        return tf.CLIPConfig(
            text_config={
                "vocab_size": VOCAB,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 32,
                "pad_token_id": 0,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
            vision_config={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 8,
            },
            projection_dim=32,
        )
    if family == "whisper":
        return tf.WhisperConfig(
            vocab_size=VOCAB,
            num_mel_bins=16,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_source_positions=WHISPER_FRAMES,
            max_target_positions=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            suppress_tokens=None,
            begin_suppress_tokens=None,
        )
    if family == "t5":
        return tf.T5Config(
            vocab_size=VOCAB,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    raise KeyError(family)


WHISPER_FRAMES = 12  # encoder positions; input_features has 2x this many frames

_MODEL_CLASS = {
    "llama_gqa": "AutoModelForCausalLM",
    "qwen2": "AutoModelForCausalLM",
    "phi3": "AutoModelForCausalLM",
    "gpt2": "AutoModelForCausalLM",
    "bert": "BertModel",
    "vit": "ViTModel",
    "clip": "CLIPModel",
    "whisper": "WhisperForConditionalGeneration",
    "t5": "T5ForConditionalGeneration",
}

_DECODER_TASK = {False: "text-generation", True: "text-generation-with-past"}
TASKS = {
    "bert": "feature-extraction",
    "vit": "feature-extraction",
    "clip": "zero-shot-image-classification",
    "whisper": "automatic-speech-recognition-with-past",
    "t5": "text2text-generation-with-past",
}

# Dim values the exported graphs cannot tell (the corpus derives the rest from dim names).
DIMS = {
    "whisper": {"encoder_sequence_length": 2 * WHISPER_FRAMES, "encoder_sequence_length / 2": WHISPER_FRAMES},
    "vit": {"num_channels": 3, "height": 32, "width": 32},
    "clip": {"num_channels": 3, "height": 32, "width": 32},
}


def build_model(family: str, attn: str):
    import torch
    import transformers

    torch.manual_seed(0)
    config = _config(family)
    cls = getattr(transformers, _MODEL_CLASS[family])
    if cls.__name__.startswith("Auto"):
        model = cls.from_config(config, attn_implementation=attn)
    else:
        model = cls._from_config(config, attn_implementation=attn)
    return reinit_(model)


def export(family: str, attn: str, folder: Path, past: bool = True) -> list[Path]:
    """Export one model with optimum into ``folder``; the ONNX files it wrote, sorted."""
    from optimum.exporters.onnx import onnx_export_from_model

    task = TASKS.get(family) or _DECODER_TASK[past]
    model = build_model(family, attn)
    shapes = {"nb_max_frames": 2 * WHISPER_FRAMES} if family == "whisper" else {}
    onnx_export_from_model(model, str(folder), task=task, do_validation=False, **shapes)
    return sorted(folder.glob("*.onnx"))


def _decoder(family: str, attn: str, past: bool):
    def make(folder: Path) -> dict:
        files = export(family, attn, folder, past)
        return {"graphs": {"": files[0].name}}

    return make


def _seq2seq(family: str, attn: str):
    def make(folder: Path) -> dict:
        names = {f.name for f in export(family, attn, folder)}
        graphs = dict(SEQ2SEQ_GRAPHS)
        missing = set(graphs.values()) - names
        if missing:
            raise RuntimeError(f"optimum wrote {sorted(names)}, not {sorted(missing)}")
        return {"graphs": graphs, "other_files": sorted(names - set(graphs.values()))}

    return make


SEQ2SEQ_GRAPHS = {"encoder": "encoder_model.onnx", "decoder_merged": "decoder_model_merged.onnx"}


def _single(family: str, attn: str):
    def make(folder: Path) -> dict:
        files = export(family, attn, folder)
        return {"graphs": {"": files[0].name}}

    return make


def exports() -> list[tuple[str, object, dict]]:
    """``(export_id, make(folder) -> {"graphs": {suffix: file}}, meta)`` for every optimum export."""
    out: list[tuple[str, object, dict]] = []
    for family in ("llama_gqa", "qwen2", "phi3", "gpt2"):
        for attn, pasts in (("sdpa", (False, True)), ("eager", (True,))):
            for past in pasts:
                kind = "past" if past else "nopast"
                meta = {"family": family, "attn": attn, "task": _DECODER_TASK[past], "parts": [""]}
                out.append((f"optimum_{family}_{attn}_{kind}", _decoder(family, attn, past), meta))
    for family in ("bert", "vit", "clip"):
        for attn in ("sdpa", "eager"):
            meta = {"family": family, "attn": attn, "task": TASKS[family], "dims": DIMS.get(family, {})}
            out.append((f"optimum_{family}_{attn}", _single(family, attn), {**meta, "parts": [""]}))
    # T5 has no SDPA path in transformers 4.57 (relative position bias): eager only.
    for family, attns in (("whisper", ("sdpa", "eager")), ("t5", ("eager",))):
        for attn in attns:
            meta = {"family": family, "attn": attn, "task": TASKS[family], "dims": DIMS.get(family, {})}
            parts = list(SEQ2SEQ_GRAPHS)
            out.append((f"optimum_{family}_{attn}", _seq2seq(family, attn), {**meta, "parts": parts}))
    return out


if __name__ == "__main__":
    main_entry("optimum-onnx", PACKAGES, exports())
