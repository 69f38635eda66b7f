"""Decoder-only HF language models as prefill and KV-cache step graphs.

Each family exists as a prefill graph (no cache) and as a step graph (past KV in, present KV out),
because the converter must handle the attention pattern both with and without a Concat(past, new)
feeding K and V. Sizes are chosen so that heads, kv_heads, head_dim, seq_len, past_len and
past_len + seq_len are pairwise distinct in the default cases (a shape-based pattern matcher cannot
confuse them); the ``adv_*`` cases then make some of them collide on purpose.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import nn

from .spec import ALL_EXPORTERS, EXPORTERS, Built, Case, CaseInfo
from .weights import reinit_

VOCAB = 256
PREFILL_LEN = 10
STEP_AR = 3
PAST_LEN = 14
INPUT_SEED = 7


@dataclass(frozen=True)
class DecoderSpec:
    """How to make one tiny causal LM and describe its attention."""

    family: str
    description: str
    make_config: Callable[[], Any]  # a transformers PreTrainedConfig
    heads: int
    kv_heads: int
    head_dim: int
    position_ids: bool = True  # False for ALiBi models (Bloom) that take no position ids
    notes: str = ""
    lora: bool = False
    attn: str = "eager"  # transformers attn_implementation: "eager" or "sdpa"


def _cfg(cls_name: str, **kw: object) -> Callable[[], object]:
    """Defer the transformers import and config construction until a case is actually built."""

    def make() -> object:
        import transformers

        base: dict[str, object] = {
            "vocab_size": VOCAB,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        base.update(kw)
        config = getattr(transformers, cls_name)(**base)
        config._attn_implementation = "eager"
        return config

    return make


_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}
_LLAMA_GQA = {
    **_LLAMA,
    "hidden_size": 96,
    "intermediate_size": 160,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}

SPECS: dict[str, DecoderSpec] = {
    "llama": DecoderSpec("llama", "Llama MHA, RoPE (halves layout)", _cfg("LlamaConfig", **_LLAMA), 4, 4, 16),
    "llama_gqa": DecoderSpec(
        "llama",
        "Llama GQA 8 q heads / 2 kv heads (repeat_kv = Unsqueeze/Expand/Reshape)",
        _cfg("LlamaConfig", **_LLAMA_GQA),
        8,
        2,
        12,
    ),
    "mistral": DecoderSpec(
        "mistral",
        "Mistral GQA 4/2, no sliding window",
        _cfg("MistralConfig", **{**_LLAMA, "num_key_value_heads": 2, "sliding_window": None}),
        4,
        2,
        16,
    ),
    "qwen2": DecoderSpec(
        "qwen2",
        "Qwen2 GQA 4/2 with q/k/v biases",
        _cfg(
            "Qwen2Config",
            **{**_LLAMA, "num_key_value_heads": 2, "use_sliding_window": False, "tie_word_embeddings": False},
        ),
        4,
        2,
        16,
    ),
    "qwen3": DecoderSpec(
        "qwen3",
        "Qwen3 GQA 4/2 with per-head RMSNorm on q and k (q_norm/k_norm) before RoPE",
        _cfg(
            "Qwen3Config",
            **{**_LLAMA, "num_key_value_heads": 2, "head_dim": 16, "use_sliding_window": False},
        ),
        4,
        2,
        16,
    ),
    "gemma": DecoderSpec(
        "gemma",
        "Gemma MQA (one KV head), embeddings scaled by sqrt(hidden), (1+w) RMSNorm",
        _cfg("GemmaConfig", **{**_LLAMA, "num_key_value_heads": 1, "head_dim": 16}),
        4,
        1,
        16,
    ),
    "gemma2": DecoderSpec(
        "gemma2",
        "Gemma2 GQA 4/2 with attention logit soft-capping (tanh(x/c)*c before mask+softmax)",
        _cfg(
            "Gemma2Config",
            **{
                **_LLAMA,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "attn_logit_softcapping": 5.0,
                "final_logit_softcapping": 30.0,
                "sliding_window": 32,
            },
        ),
        4,
        2,
        16,
        notes="attn_logit_softcapping=5 (small so it changes the numbers); sliding_window=32 > context, "
        "so the sliding layers see the same mask as the full ones",
    ),
    "phi3": DecoderSpec(
        "phi3",
        "Phi-3 with packed qkv_proj (one MatMul, uneven Slice split q|k|v since GQA 4/2)",
        _cfg("Phi3Config", **{**_LLAMA, "num_key_value_heads": 2}),
        4,
        2,
        16,
    ),
    "gpt2": DecoderSpec(
        "gpt2",
        "GPT-2: packed c_attn Conv1D (MatMul+Add) then Split into q|k|v, learned positions",
        _cfg("GPT2Config", n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=112),
        4,
        4,
        16,
    ),
    "opt": DecoderSpec(
        "opt",
        "OPT: q is pre-scaled (q_proj(x) * head_dim**-0.5) so the attention itself uses scaling 1",
        _cfg(
            "OPTConfig",
            hidden_size=64,
            ffn_dim=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
        ),
        4,
        4,
        16,
    ),
    "gpt_neox": DecoderSpec(
        "gpt_neox",
        "GPT-NeoX: packed per-head-interleaved query_key_value, partial rotary (rotary_pct=0.25)",
        _cfg(
            "GPTNeoXConfig",
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            rotary_pct=0.25,
        ),
        4,
        4,
        16,
    ),
    "falcon": DecoderSpec(
        "falcon",
        "Falcon-7B style: fused query_key_value, multi_query (1 kv head), parallel attn, RoPE",
        _cfg(
            "FalconConfig",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=True,
            new_decoder_architecture=False,
            alibi=False,
            parallel_attn=True,
            bias=False,
            max_position_embeddings=64,
        ),
        4,
        1,
        16,
    ),
    "bloom": DecoderSpec(
        "bloom",
        "Bloom: fused query_key_value, ALiBi bias via baddbmm on [B*H, S, D], no position ids",
        _cfg("BloomConfig", hidden_size=64, n_layer=2, n_head=4),
        4,
        4,
        16,
        position_ids=False,
    ),
    "llama_lora": DecoderSpec(
        "llama",
        "Llama MHA with unmerged peft LoRA (r=4) on q/k/v: each projection is base MatMul + B(A(x))",
        _cfg("LlamaConfig", **_LLAMA),
        4,
        4,
        16,
        lora=True,
    ),
}


def make_causal_lm(spec: DecoderSpec) -> nn.Module:
    """Instantiate the HF model with ``spec.attn`` attention and deterministic, distinct weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = spec.make_config()
    config._attn_implementation = spec.attn
    model = AutoModelForCausalLM.from_config(config, attn_implementation=spec.attn)
    if spec.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=4, lora_alpha=4, lora_dropout=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers deprecation noise inside peft
            model = get_peft_model(model, lora).base_model.model  # LoRA injected in place, unmerged
    reinit_(model)  # also makes lora_B non-zero, so the adapters change the output
    return model.eval()


class CausalLMPrefill(nn.Module):
    """Flat-tensor prefill: ``(input_ids, attention_mask[, position_ids]) -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *position_ids: torch.Tensor):
        kw = {"position_ids": position_ids[0]} if position_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
        return out.logits


class CausalLMStep(nn.Module):
    """Flat-tensor KV step: past_key_{l}/past_value_{l} in, logits + present (= concat) out.

    transformers 5 models only accept a ``Cache`` object, so the flat inputs are loaded into a fresh
    ``DynamicCache`` inside the traced forward. The layers are pre-filled directly rather than via
    ``update``: ``update`` on an empty layer concatenates onto a 0-length tensor, which TorchScript
    exports as a stray single-input Concat. The exporter then sees exactly the Concat(past, new)
    that the model's own ``update`` performs.
    """

    def __init__(self, model: nn.Module, layers: int, position_ids: bool) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self.has_position_ids = position_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor):
        from transformers import DynamicCache

        kw = {}
        if self.has_position_ids:
            kw["position_ids"], rest = rest[0], rest[1:]
        cache = DynamicCache(config=cast(Any, self.model).config)
        for layer in range(self.layers):
            _preload(cache.layers[layer], rest[2 * layer], rest[2 * layer + 1])
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, **kw
        )
        flat = [out.logits]
        for layer in out.past_key_values.layers[: self.layers]:
            flat += [layer.keys, layer.values]
        return tuple(flat)


def _preload(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put past KV into a transformers 5.x ``DynamicLayer``/``DynamicSlidingWindowLayer`` as-is."""
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    if hasattr(layer, "cumulative_length"):  # sliding-window layers track the tokens seen
        layer.cumulative_length = int(keys.shape[-2])


def _prefill(spec: DecoderSpec, seq_len: int) -> Built:
    model = make_causal_lm(spec)
    gen = torch.Generator().manual_seed(INPUT_SEED)
    inputs = {
        "input_ids": torch.randint(0, VOCAB, (1, seq_len), generator=gen),
        "attention_mask": torch.ones(1, seq_len, dtype=torch.int64),
    }
    if spec.position_ids:
        inputs["position_ids"] = torch.arange(seq_len, dtype=torch.int64)[None]
    return Built(CausalLMPrefill(model).eval(), inputs, ["logits"])


def _step(spec: DecoderSpec, ar: int, past: int) -> Built:
    model = make_causal_lm(spec)
    layers = int(cast(Any, model).config.num_hidden_layers)
    gen = torch.Generator().manual_seed(INPUT_SEED)
    mask = torch.ones(1, past + ar, dtype=torch.int64)
    mask[:, :2] = 0  # two left-padded past slots, so the padding mask changes the numbers
    inputs = {"input_ids": torch.randint(0, VOCAB, (1, ar), generator=gen), "attention_mask": mask}
    if spec.position_ids:
        inputs["position_ids"] = torch.arange(past, past + ar, dtype=torch.int64)[None]
    outputs = ["logits"]
    for layer in range(layers):
        inputs[f"past_key_{layer}"] = torch.randn(1, spec.kv_heads, past, spec.head_dim, generator=gen)
        inputs[f"past_value_{layer}"] = torch.randn(1, spec.kv_heads, past, spec.head_dim, generator=gen)
        outputs += [f"present_key_{layer}", f"present_value_{layer}"]
    return Built(CausalLMStep(model, layers, spec.position_ids).eval(), inputs, outputs)


def _step_at(spec: DecoderSpec, ar: int, cl: int) -> Built:
    """The step case of ``spec`` with ``ar`` tokens per step and context length ``cl`` (same weights)."""
    return _step(spec, ar, cl - ar)


def _prefill_at(spec: DecoderSpec, ar: int, cl: int) -> Built:
    """The prefill case of ``spec`` on ``ar`` tokens (a prefill graph's CL is its AR)."""
    return _prefill(spec, ar)


def _info(
    name: str,
    spec: DecoderSpec,
    kind: str,
    seq: int,
    past: int,
    extra: str = "",
    exporters: tuple[str, ...] | None = None,
) -> CaseInfo:
    notes = "; ".join(n for n in (spec.notes, extra) if n)
    return CaseInfo(
        name=name,
        family=spec.family,
        description=spec.description,
        kind=kind,
        heads=spec.heads,
        kv_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        seq_len=seq,
        past_len=past,
        vocab_size=VOCAB,
        notes=notes,
        attn_implementation=spec.attn,
        exporters=EXPORTERS if exporters is None else exporters,
    )


def cases() -> list[Case]:
    """Prefill + step for every family, plus AR=1 decode and shape-collision adversarial steps."""
    out: list[Case] = []
    for key, spec in SPECS.items():
        out.append(
            Case(
                _info(f"{key}_prefill", spec, "prefill", PREFILL_LEN, 0),
                functools.partial(_prefill, spec, PREFILL_LEN),
                functools.partial(_prefill_at, spec),
            )
        )
        out.append(
            Case(
                _info(f"{key}_step", spec, "step", STEP_AR, PAST_LEN),
                functools.partial(_step, spec, STEP_AR, PAST_LEN),
                functools.partial(_step_at, spec),
            )
        )
    llama = SPECS["llama"]
    out.append(
        Case(
            _info("llama_decode_ar1", llama, "step", 1, PAST_LEN + 4, "single-token decode step (AR=1)"),
            lambda: _step(llama, 1, PAST_LEN + 4),
            functools.partial(_step_at, llama),
        )
    )
    out.append(
        Case(
            _info("adv_llama_ar_eq_heads", llama, "step", 4, PAST_LEN, "adversarial: AR == heads == 4"),
            lambda: _step(llama, 4, PAST_LEN),
            functools.partial(_step_at, llama),
        )
    )
    hd8 = replace(
        llama,
        description="Llama MHA hidden 64, 8 heads of head_dim 8",
        make_config=_cfg("LlamaConfig", **{**_LLAMA, "num_attention_heads": 8, "num_key_value_heads": 8}),
        heads=8,
        kv_heads=8,
        head_dim=8,
    )
    out.append(
        Case(
            _info(
                "adv_llama_hd_eq_heads", hd8, "step", STEP_AR, PAST_LEN, "adversarial: head_dim == heads == 8"
            ),
            lambda: _step(hd8, STEP_AR, PAST_LEN),
            functools.partial(_step_at, hd8),
        )
    )
    return out


# --- SDPA variants -------------------------------------------------------------------------------
# transformers' default attention calls F.scaled_dot_product_attention. TorchScript decomposes it
# into MatMul/Softmax with its own scale and mask handling, dynamo (opset < 23) likewise, and dynamo
# at opset 23 may keep it as one ONNX ``Attention`` node. These variants are not in ``CASES`` (the
# converter's own family tests run on ``CASES``); the third-party corpus tests convert them.

SDPA_EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo", "dynamo23")
SDPA_UNSUPPORTED: dict[str, str] = {
    "gemma2": "transformers 5 has no SDPA path for Gemma2 (attention logit soft-capping)",
    "bloom": "transformers 5 has no SDPA path for Bloom (ALiBi via baddbmm)",
}
SDPA_EXPORTER_GAPS: dict[str, tuple[str, str]] = {
    "falcon": (
        "dynamo23",
        "torch 2.13's opset-23 SDPA translation asserts q_num_heads == kv_num_heads: Falcon's "
        "multi-query SDPA broadcasts its one KV head without enable_gqa",
    ),
}
"""An exporter a family's SDPA variant cannot use, and why (said in the case's notes)."""
SDPA_PREFILL: tuple[str, ...] = ("llama_gqa", "gpt2", "phi3")
"""Prefill variants (no past, all-ones mask: SDPA's ``is_causal`` path); the other families: step only."""
SDPA_ALL_OPSETS: tuple[str, ...] = ("llama_gqa",)
"""Families whose SDPA step is also exported at the extra opsets (TorchScript 20, dynamo 18)."""


def variant_cases() -> list[Case]:
    """``<family>_step_sdpa`` for every family with an SDPA path, ``<family>_prefill_sdpa`` for a few."""
    out: list[Case] = []
    for key, spec in SPECS.items():
        if spec.lora or key in SDPA_UNSUPPORTED:
            continue
        gap, why = SDPA_EXPORTER_GAPS.get(key, ("", ""))
        notes = "; ".join(n for n in (spec.notes, f"no {gap}: {why}" if gap else "") if n)
        sdpa = replace(spec, attn="sdpa", description=f"{spec.description}; SDPA attention", notes=notes)
        step_exporters = ALL_EXPORTERS if key in SDPA_ALL_OPSETS else SDPA_EXPORTERS
        step_exporters = tuple(e for e in step_exporters if e != gap)
        out.append(
            Case(
                _info(f"{key}_step_sdpa", sdpa, "step", STEP_AR, PAST_LEN, exporters=step_exporters),
                functools.partial(_step, sdpa, STEP_AR, PAST_LEN),
            )
        )
        if key in SDPA_PREFILL:
            out.append(
                Case(
                    _info(f"{key}_prefill_sdpa", sdpa, "prefill", PREFILL_LEN, 0, exporters=SDPA_EXPORTERS),
                    functools.partial(_prefill, sdpa, PREFILL_LEN),
                )
            )
    return out
