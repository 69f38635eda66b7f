"""Bidirectional encoders, cross-attention decoders, seq2seq and diffusion attention blocks.

These cover attention patterns that decoder-only LMs do not: no causal mask (BERT, ViT), a causal
mask without KV cache (CLIP text), Q from one sequence and K/V from another (Whisper decoder,
T5 decoder, diffusers attn2), an additive relative-position bias (T5) and heads folded into the
batch dimension (diffusers ``AttnProcessor``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict, TypeVar

import torch
from torch import nn

from .spec import Built, Case, CaseInfo
from .weights import ModuleT, reinit_

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, WhisperForConditionalGeneration
    from typing_extensions import Unpack

ConfigT = TypeVar("ConfigT", bound="PreTrainedConfig")

VOCAB = 256
SEQ = 10
DEC_SEQ = 7
HIDDEN = 64
HEADS = 4
INPUT_SEED = 11


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(INPUT_SEED)


def _eager(config: ConfigT, attn: str = "eager") -> ConfigT:
    config._attn_implementation = attn
    return config


def _prep(model: ModuleT) -> ModuleT:
    return reinit_(model).eval()


class _Outputs(nn.Module):
    """Call a HF model with keyword inputs and return the named output fields as a tuple."""

    def __init__(self, model: nn.Module, input_names: list[str], fields: list[str], **fixed: object) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.fields = fields
        self.fixed = fixed

    def forward(self, *args: torch.Tensor):
        out = self.model(**dict(zip(self.input_names, args, strict=True)), **self.fixed)
        return tuple(out[f] for f in self.fields)


def bert() -> Built:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = _eager(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            intermediate_size=112,
            max_position_embeddings=32,
        )
    )
    model = _prep(BertModel(config, add_pooling_layer=False))
    mask = torch.ones(1, SEQ, dtype=torch.int64)
    mask[:, -2:] = 0  # right padding, as a tokenizer would produce
    inputs = {"input_ids": torch.randint(0, VOCAB, (1, SEQ), generator=_gen()), "attention_mask": mask}
    return Built(_Outputs(model, list(inputs), ["last_hidden_state"]), inputs, ["last_hidden_state"])


def clip_text() -> Built:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = _eager(
        CLIPTextConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    model = _prep(CLIPTextModel(config))
    inputs = {
        "input_ids": torch.randint(3, VOCAB, (1, SEQ), generator=_gen()),
        "attention_mask": torch.ones(1, SEQ, dtype=torch.int64),
    }
    fields = ["last_hidden_state", "pooler_output"]
    return Built(_Outputs(model, list(inputs), fields), inputs, fields)


def clip_vision() -> Built:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = _eager(
        CLIPVisionConfig(
            hidden_size=HIDDEN,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            image_size=32,
            patch_size=8,
            num_channels=3,
        )
    )
    model = _prep(CLIPVisionModel(config))
    inputs = {"pixel_values": torch.randn(1, 3, 32, 32, generator=_gen())}
    fields = ["last_hidden_state", "pooler_output"]
    return Built(_Outputs(model, list(inputs), fields), inputs, fields)


def vit() -> Built:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = _eager(
        ViTConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            intermediate_size=112,
            image_size=24,
            patch_size=8,
            num_channels=3,
            qkv_bias=True,
        )
    )
    model = _prep(ViTModel(config, add_pooling_layer=False))
    inputs = {"pixel_values": torch.randn(1, 3, 24, 24, generator=_gen())}
    return Built(_Outputs(model, list(inputs), ["last_hidden_state"]), inputs, ["last_hidden_state"])


WHISPER_FRAMES = 12  # encoder positions; input_features has 2x frames (conv2 has stride 2)
WHISPER_MELS = 16


def _whisper(attn: str = "eager") -> WhisperForConditionalGeneration:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = _eager(
        WhisperConfig(
            vocab_size=VOCAB,
            num_mel_bins=WHISPER_MELS,
            d_model=HIDDEN,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS,
            encoder_ffn_dim=112,
            decoder_ffn_dim=112,
            max_source_positions=WHISPER_FRAMES,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            suppress_tokens=None,
            begin_suppress_tokens=None,
        ),
        attn,
    )
    return _prep(WhisperForConditionalGeneration(config))


class WhisperEncoder(nn.Module):
    """``input_features -> encoder last_hidden_state``."""

    def __init__(self, model: WhisperForConditionalGeneration) -> None:
        super().__init__()
        self.encoder = model.model.encoder

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features=input_features).last_hidden_state


class WhisperDecoder(nn.Module):
    """``(decoder_input_ids, encoder_hidden_states) -> logits``, no cache: self + cross attention."""

    def __init__(self, model: WhisperForConditionalGeneration) -> None:
        super().__init__()
        self.decoder = model.model.decoder
        self.proj_out = model.proj_out

    def forward(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        # An explicit all-ones mask: with mask=None and no cache, transformers probes position ids
        # for packed sequences with torch.diff, which the TorchScript exporter cannot translate.
        out = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=torch.ones_like(decoder_input_ids),
            encoder_hidden_states=encoder_hidden_states,
            use_cache=False,
        )
        return self.proj_out(out.last_hidden_state)


def whisper_encoder() -> Built:
    inputs = {"input_features": torch.randn(1, WHISPER_MELS, 2 * WHISPER_FRAMES, generator=_gen())}
    return Built(WhisperEncoder(_whisper()).eval(), inputs, ["last_hidden_state"])


def whisper_decoder(attn: str = "eager") -> Built:
    gen = _gen()
    inputs = {
        "decoder_input_ids": torch.randint(0, VOCAB, (1, DEC_SEQ), generator=gen),
        "encoder_hidden_states": torch.randn(1, WHISPER_FRAMES, HIDDEN, generator=gen),
    }
    return Built(WhisperDecoder(_whisper(attn)).eval(), inputs, ["logits"])


def t5() -> Built:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = _eager(
        T5Config(
            vocab_size=VOCAB,
            d_model=HIDDEN,
            d_kv=16,
            d_ff=112,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=HEADS,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            # a PreTrainedConfig kwarg T5Config's @strict dataclass fields do not list (it takes it)
            decoder_start_token_id=0,  # type: ignore[call-arg]
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    model = _prep(T5ForConditionalGeneration(config))
    gen = _gen()
    inputs = {
        "input_ids": torch.randint(0, VOCAB, (1, SEQ), generator=gen),
        "attention_mask": torch.ones(1, SEQ, dtype=torch.int64),
        "decoder_input_ids": torch.randint(0, VOCAB, (1, DEC_SEQ), generator=gen),
    }
    return Built(_Outputs(model, list(inputs), ["logits"], use_cache=False), inputs, ["logits"])


def _classic_attention(module: ModuleT) -> ModuleT:
    """Force diffusers' pre-2.0 ``AttnProcessor``: heads folded into batch, baddbmm/softmax/bmm.

    The default ``AttnProcessor2_0`` calls ``F.scaled_dot_product_attention``, which the dynamo
    exporter keeps as a fused op; the classic processor is what older SD exports look like.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.set_processor(AttnProcessor())
    return module


class DiffusersCall(nn.Module):
    """``(hidden_states, encoder_hidden_states) -> sample`` for a diffusers block or model."""

    def __init__(self, block: nn.Module, returns_output_obj: bool) -> None:
        super().__init__()
        self.block = block
        self.returns_output_obj = returns_output_obj

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if self.returns_output_obj:
            return self.block(hidden_states, encoder_hidden_states=encoder_hidden_states, return_dict=False)[
                0
            ]
        return self.block(hidden_states, encoder_hidden_states=encoder_hidden_states)


CROSS_DIM = 48
CROSS_SEQ = 7


def sd_block() -> Built:
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(
        dim=HIDDEN, num_attention_heads=HEADS, attention_head_dim=16, cross_attention_dim=CROSS_DIM
    )
    block = _prep(_classic_attention(block))
    gen = _gen()
    inputs = {
        "hidden_states": torch.randn(1, 20, HIDDEN, generator=gen),
        "encoder_hidden_states": torch.randn(1, CROSS_SEQ, CROSS_DIM, generator=gen),
    }
    return Built(DiffusersCall(block, False).eval(), inputs, ["sample"])


def sd_transformer2d() -> Built:
    # the same class as diffusers.Transformer2DModel; for mypy that name is diffusers' dummy object
    from diffusers.models import Transformer2DModel

    torch.manual_seed(0)
    model = Transformer2DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=32,
        num_layers=1,
        cross_attention_dim=CROSS_DIM,
        norm_num_groups=8,
    )
    model = _prep(_classic_attention(model))
    gen = _gen()
    inputs = {
        "hidden_states": torch.randn(1, 32, 4, 5, generator=gen),
        "encoder_hidden_states": torch.randn(1, CROSS_SEQ, CROSS_DIM, generator=gen),
    }
    return Built(DiffusersCall(model, True).eval(), inputs, ["sample"])


class _CaseExtras(TypedDict, total=False):
    """The :class:`CaseInfo` fields the cases below set besides the attention shape."""

    seq_len: int
    vocab_size: int
    notes: str
    exporters: tuple[str, ...]
    attn_implementation: str


def _case(
    name: str,
    family: str,
    kind: str,
    description: str,
    builder: Callable[[], Built],
    *,
    heads: int = HEADS,
    kv_heads: int = HEADS,
    head_dim: int = 16,
    **kw: Unpack[_CaseExtras],
) -> Case:
    info = CaseInfo(
        name=name,
        family=family,
        description=description,
        kind=kind,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        **kw,
    )
    return Case(info, builder)


def cases() -> list[Case]:
    """Encoder, cross-attention and diffusion cases."""
    return [
        _case(
            "bert",
            "bert",
            "encoder",
            "BERT encoder, bidirectional, right-padded attention_mask",
            bert,
            seq_len=SEQ,
            vocab_size=VOCAB,
        ),
        _case(
            "clip_text",
            "clip",
            "encoder",
            "CLIP text encoder: causal + padding mask, argmax(input_ids) pooling",
            clip_text,
            seq_len=SEQ,
            vocab_size=VOCAB,
        ),
        _case(
            "clip_vision",
            "clip",
            "encoder",
            "CLIP vision encoder: conv patch embed, 16 patches + CLS = 17 tokens, no mask",
            clip_vision,
            seq_len=17,
        ),
        _case("vit", "vit", "encoder", "ViT encoder: 9 patches + CLS = 10 tokens, no mask", vit, seq_len=10),
        _case(
            "whisper_encoder",
            "whisper",
            "encoder",
            "Whisper encoder self-attention: q pre-scaled by head_dim**-0.5, k_proj has no bias, conv front-end",
            whisper_encoder,
            seq_len=WHISPER_FRAMES,
        ),
        _case(
            "whisper_decoder",
            "whisper",
            "decoder",
            "Whisper decoder without cache: causal self-attn + cross-attn on encoder_hidden_states, q pre-scaled",
            whisper_decoder,
            seq_len=DEC_SEQ,
            vocab_size=VOCAB,
            notes="cross-attention K/V come from the encoder_hidden_states graph input (length 12)",
        ),
        _case(
            "t5",
            "t5",
            "seq2seq",
            "T5 encoder-decoder in one graph: relative position bias added to logits, no 1/sqrt(d) scaling",
            t5,
            seq_len=SEQ,
            vocab_size=VOCAB,
            notes="decoder length 7; the position bias is computed once (layer 0) and shared by all layers",
        ),
        _case(
            "sd_block",
            "diffusers",
            "block",
            "diffusers BasicTransformerBlock: self-attn + cross-attn (classic AttnProcessor, heads in batch)",
            sd_block,
            seq_len=20,
            notes=f"cross-attention context: encoder_hidden_states [1, {CROSS_SEQ}, {CROSS_DIM}]",
        ),
        _case(
            "sd_transformer2d",
            "diffusers",
            "block",
            "diffusers Transformer2DModel (SD spatial transformer): GroupNorm, proj_in, block, proj_out",
            sd_transformer2d,
            head_dim=8,
            seq_len=20,
            notes=f"hidden_states [1, 32, 4, 5] -> 20 tokens; context [1, {CROSS_SEQ}, {CROSS_DIM}]",
        ),
    ]


def variant_cases() -> list[Case]:
    """The Whisper decoder with transformers' default SDPA attention (see ``decoders.variant_cases``)."""
    from .decoders import SDPA_EXPORTERS

    return [
        _case(
            "whisper_decoder_sdpa",
            "whisper",
            "decoder",
            "Whisper decoder without cache, SDPA attention: causal self-attn + cross-attn",
            lambda: whisper_decoder("sdpa"),
            seq_len=DEC_SEQ,
            vocab_size=VOCAB,
            notes="cross-attention K/V come from the encoder_hidden_states graph input (length 12)",
            exporters=SDPA_EXPORTERS,
            attn_implementation="sdpa",
        )
    ]
