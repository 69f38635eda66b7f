"""A "Qualcomm-prepared" style Llama step graph, hand-written over HF Llama weights.

Models prepared for HTP (e.g. by AI Hub / QNN tooling) do not look like HF exports: the mask is an
additive float [1, 1, AR, CL] input, RoPE cos/sin are inputs, the key cache is stored transposed
([.., D, CL-AR]) so ``Q @ K`` needs no Transpose, and only the new KV entries are returned. The
converter must recognise this layout too, so the zoo rebuilds it from the HF modules' weights with
attention math written here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .decoders import SPECS, VOCAB, make_causal_lm
from .spec import Built, Case, CaseInfo

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

MASK_VALUE = -10000.0
CONTEXT = 17  # CL: past + AR
INPUT_SEED = 13


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, a, b] -> [B, Hkv * n_rep, a, b], kv head h serving q heads h*n_rep .. h*n_rep+n_rep-1."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def repeat_kv_tile(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``repeat_kv`` as AIMET re-exports it: Unsqueeze -> Tile -> Reshape (``Tensor.repeat``)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].repeat(1, 1, n_rep, 1, 1).reshape(b, h * n_rep, s, d)


def rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF "rotate_half" RoPE with half-width cos/sin: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class PreparedLlamaStep(nn.Module):
    """Llama decoder step with prepared-style I/O; weights are the HF model's own modules."""

    def __init__(self, hf: LlamaForCausalLM, tile: bool = False) -> None:
        super().__init__()
        self.repeat_kv = repeat_kv_tile if tile else repeat_kv
        cfg = hf.config
        self.embed = hf.model.embed_tokens
        self.layers = hf.model.layers
        self.norm = hf.model.norm
        self.lm_head = hf.lm_head
        self.heads = int(cfg.num_attention_heads)
        assert cfg.num_key_value_heads is not None  # LlamaConfig defaults it to num_attention_heads
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids_cos: torch.Tensor,
        position_ids_sin: torch.Tensor,
        *past: torch.Tensor,
    ):
        ar = input_ids.shape[1]
        h = self.embed(input_ids)
        new_kv: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, ar, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, ar, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, ar, self.kv_heads, self.head_dim).transpose(1, 2)
            q = rope_halves(q, position_ids_cos, position_ids_sin)
            k_t = rope_halves(k, position_ids_cos, position_ids_sin).transpose(2, 3)  # [1, Hkv, D, AR]
            keys = torch.cat([past[2 * i], k_t], dim=3)  # [1, Hkv, D, CL]
            values = torch.cat([past[2 * i + 1], v], dim=2)  # [1, Hkv, CL, D]
            rep = self.heads // self.kv_heads
            scores = torch.matmul(q, self.repeat_kv(keys, rep)) * self.scale + attention_mask
            probs = torch.softmax(scores, dim=-1)
            ctx = torch.matmul(probs, self.repeat_kv(values, rep))  # [1, H, AR, D]
            ctx = ctx.transpose(1, 2).reshape(1, ar, self.heads * self.head_dim)
            h = h + attn.o_proj(ctx)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            new_kv += [k_t, v]
        return (self.lm_head(self.norm(h)), *new_kv)


def rope_tables(hf: LlamaForCausalLM, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width cos/sin [1, 1, AR, D/2] from the HF model's own rotary embedding."""
    inv_freq = hf.model.rotary_emb.inv_freq.float()
    freqs = positions.float()[:, None] * inv_freq[None, :]
    scaling = float(getattr(hf.model.rotary_emb, "attention_scaling", 1.0))
    return (freqs.cos() * scaling)[None, None], (freqs.sin() * scaling)[None, None]


def prepared_mask(ar: int, context: int, padded: int = 2) -> torch.Tensor:
    """Additive [1, 1, AR, CL] mask: causal over the AR new tokens, ``padded`` leading past slots hidden."""
    past = context - ar
    allowed = torch.ones(ar, context, dtype=torch.bool)
    allowed[:, :padded] = False
    allowed[:, past:] = torch.tril(torch.ones(ar, ar, dtype=torch.bool))
    return torch.where(allowed, 0.0, MASK_VALUE)[None, None].float()


def build_prepared(ar: int, context: int = CONTEXT, tile: bool = False) -> Built:
    """Prepared-style step over the ``llama_gqa`` weights (8 q heads, 2 kv heads, head_dim 12)."""
    from transformers import LlamaForCausalLM

    spec = SPECS["llama_gqa"]
    hf = make_causal_lm(spec)
    assert isinstance(hf, LlamaForCausalLM)  # a LlamaConfig without LoRA
    past = context - ar
    layers = int(hf.config.num_hidden_layers)
    gen = torch.Generator().manual_seed(INPUT_SEED)
    cos, sin = rope_tables(hf, torch.arange(past, past + ar))
    inputs = {
        "input_ids": torch.randint(0, VOCAB, (1, ar), generator=gen),
        "attention_mask": prepared_mask(ar, context),
        "position_ids_cos": cos,
        "position_ids_sin": sin,
    }
    outputs = ["logits"]
    for layer in range(layers):
        inputs[f"past_key_{layer}_in"] = torch.randn(1, spec.kv_heads, spec.head_dim, past, generator=gen)
        inputs[f"past_value_{layer}_in"] = torch.randn(1, spec.kv_heads, past, spec.head_dim, generator=gen)
        outputs += [f"past_key_{layer}_out", f"past_value_{layer}_out"]
    return Built(PreparedLlamaStep(hf, tile).eval(), inputs, outputs)


def _info(name: str, ar: int, extra: str) -> CaseInfo:
    spec = SPECS["llama_gqa"]
    return CaseInfo(
        name=name,
        family="llama",
        description="Qualcomm-prepared style Llama GQA step: additive float mask, cos/sin inputs, "
        "transposed key cache, only new KV returned",
        kind="prepared_step",
        heads=spec.heads,
        kv_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        seq_len=ar,
        past_len=CONTEXT - ar,
        vocab_size=VOCAB,
        notes=f"CL={CONTEXT}; past_key_*_in [1,Hkv,D,CL-AR], past_value_*_in [1,Hkv,CL-AR,D]; "
        f"mask value {MASK_VALUE}{extra}",
    )


def cases() -> list[Case]:
    """Prepared-style step with AR=3, the AR=1 decode variant, and repeat_kv through Tile."""
    return [
        Case(_info("prepared_llama_gqa_step", 3, ""), lambda: build_prepared(3), build_prepared),
        Case(_info("prepared_llama_gqa_ar1", 1, "; AR=1 decode"), lambda: build_prepared(1), build_prepared),
        Case(
            _info("prepared_llama_gqa_tile", 3, "; repeat_kv as Unsqueeze -> Tile (AIMET re-export)"),
            lambda: build_prepared(3, tile=True),
            lambda ar, cl: build_prepared(ar, cl, tile=True),
        ),
    ]
