"""Every attention block is found and classified from the graph alone: heads, KV heads, head dim,
tokens, cached length, RoPE, mask, KV-cache layout, packed QKV, LoRA, fused op, and whether the
split takes it -- on the zoo's exports, a dynamo opset-23 graph with fused ``Attention`` /
``RotaryEmbedding``, a genai-style ``GroupQueryAttention`` decoder and hand-built graphs the split
refuses. One drawing pair per kind of block."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from mha2sha import zoo
from mha2sha.io.load import load_model
from tests.analyze._util import structure_of
from tests.lower._genai import GenaiSpec, genai_decoder
from tests.split._graphs import attention_model

HALF, CAUSAL, PRESENT = "rotate_half", "2-D int mask + causal (in graph)", "past/present concat"

# case: (rope, mask, kv_cache, packed_qkv, lora, features that must be listed)
EXPECTED = {
    "llama_gqa_step": (HALF, CAUSAL, PRESENT, "", "", ["GQA 8/2"]),
    "llama_prefill": (HALF, CAUSAL, "none", "", "", []),
    "prepared_llama_gqa_step": (
        "rotate_half, cos/sin inputs", "additive 4-D input", "new entries out, key transposed [B,H,D,T]", "", "", ["GQA 8/2"],
    ),
    "phi3_step": (HALF, CAUSAL, PRESENT, "q|k|v", "", ["GQA 4/2"]),
    "gpt_neox_step": ("rotate_half, partial 4 of 16", CAUSAL, PRESENT, "q|k|v", "", []),
    "falcon_step": (HALF, CAUSAL, PRESENT, "q|k|v", "", ["MQA"]),
    "gpt2_step": ("none", CAUSAL, PRESENT, "q|k|v", "", []),
    "bloom_step": ("none", CAUSAL, PRESENT, "q|k|v", "", ["per-head bias (ALiBi / relative position)"]),
    "llama_lora_step": (HALF, CAUSAL, PRESENT, "", "q, k, v", []),
    "gemma2_step": (HALF, CAUSAL, PRESENT, "", "", ["GQA 4/2", "logit softcap"]),
    "qwen3_step": (HALF, CAUSAL, PRESENT, "", "", ["q/k norm"]),
    "bert": ("none", "2-D int mask", "none", "", "", []),
    "vit": ("none", "none", "none", "", "", []),
    "sd_block": ("none", "none", "none", "", "", ["heads folded into batch [B*H,S,D]"]),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_zoo_blocks_are_classified(case: str) -> None:
    info = zoo.case_info(case)
    structure = structure_of(zoo.build(case, "torchscript"))
    rope, mask, kv, packed, lora, features = EXPECTED[case]
    assert len(structure.blocks) >= info.layers
    for block in structure.blocks:
        assert block.would_split and not block.reason
        assert block.heads == info.heads and block.head_dim == info.head_dim
        assert block.kv_heads == (info.kv_heads or info.heads)
        assert (block.rope, block.mask, block.kv_cache) == (rope, mask, kv), block
        assert (block.packed_qkv, block.lora) == (packed, lora)
        assert set(features) <= set(block.features), block.features
        if kv != "none":
            assert (block.seq, block.past) == (info.seq_len, info.past_len)
    # every layer of a family is one kind, drawn as the graph has it and as one head
    assert len(structure.kinds) == 1 if case != "sd_block" else len(structure.kinds) == 2
    kind = structure.kinds[0]
    assert kind.mha is not None and kind.sha is not None
    roles = {n.role for n in kind.mha.nodes}
    assert {"proj", "core"} <= roles and ("rope" in roles) == (rope != "none") and ("kv" in roles) == (kv != "none")
    assert any(n.role == "join" for n in kind.sha.nodes)
    ids = {n.id for n in kind.sha.nodes}
    assert all(a in ids and b in ids for a, b in kind.sha.edges)


def test_encoder_decoder_kinds() -> None:
    """Whisper's decoder: causal self-attention and cross-attention on the encoder states."""
    structure = structure_of(zoo.build("whisper_decoder", "torchscript"))
    kinds = {k.label: k for k in structure.kinds}
    cross = [b for b in structure.blocks if "cross-attention" in b.features]
    selfs = [b for b in structure.blocks if "cross-attention" not in b.features]
    assert len(cross) == len(selfs) == 2 and len(kinds) == 2
    assert {b.mask for b in selfs} == {"causal (in graph)"} and {b.mask for b in cross} == {"none"}


def test_fused_ops_are_named() -> None:
    """dynamo at opset 23 writes ONNX Attention and RotaryEmbedding: lowered, then classified."""
    structure = structure_of(zoo.build("llama_gqa_step_sdpa", "dynamo23"))
    for block in structure.blocks:
        assert block.fused_op == "Attention" and block.would_split
        assert block.rope == "fused RotaryEmbedding (lowered: rotate_half)"
        assert (block.heads, block.kv_heads, block.kv_cache) == (8, 2, PRESENT)


def test_group_query_attention_decoder() -> None:
    """onnxruntime-genai's GroupQueryAttention with RoPE inside and packed QKV."""
    spec = GenaiSpec(packed_qkv=True)
    structure = structure_of(ir.from_proto(genai_decoder(spec)))
    assert len(structure.blocks) == spec.layers
    for block in structure.blocks:
        assert block.fused_op == "com.microsoft.GroupQueryAttention" and block.would_split
        assert block.rope.startswith("fused com.microsoft.GroupQueryAttention")
        assert (block.heads, block.kv_heads, block.head_dim) == (spec.heads, spec.kv_heads, spec.head_size)
        assert (block.seq, block.past, block.packed_qkv) == (spec.seq, spec.past, "q|k|v")
        assert block.kv_cache == PRESENT and "causal" in block.mask


def test_refused_blocks_say_why(tmp_path) -> None:
    """A Softmax reaching MatMul(P, V) through an op the anchor does not know, and a block whose
    heads are mixed before Softmax: both reported as attention that would not split, with why."""
    proto = attention_model(4, 6, 8, None)
    graph = proto.graph
    pv = next(n for n in graph.node if n.name == "pv")
    pv.input[0] = "probs_padded"
    graph.node.insert(
        list(graph.node).index(pv),
        onnx.helper.make_node("Pad", ["probs", "pads"], ["probs_padded"], name="pad"),
    )
    graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(8, np.int64), "pads"))
    path = tmp_path / "pad.onnx"
    onnx.save(proto, path)
    structure = structure_of(load_model(path))
    (block,) = structure.blocks
    assert not block.would_split and "Pad 'pad' between Softmax and MatMul(P, V)" in block.reason
    assert structure.kinds[0].mha is None  # nothing anchored, nothing drawn
