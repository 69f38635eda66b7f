"""Graphs written by real tools: lowered exactly, then split per head by mha2sha's normal conversion.

- onnxruntime's transformers optimizer on the zoo's torch exports (``com.microsoft.Attention``,
  ``MultiHeadAttention`` with packed KV, ``SkipLayerNormalization``, ``BiasGelu``, ``FastGelu``,
  ``QuickGelu``, ``Gelu``, ``BiasSplitGelu``, ``BiasAdd``, ``(Skip)SimplifiedLayerNormalization``);
  the lowered graph is compared with the original (unfused) export, which onnxruntime's CPU provider
  always runs (some fused forms are CUDA-only).
- torch's dynamo exporter at opset 23 with HF's ``sdpa`` attention (ONNX ``Attention``).
"""

from __future__ import annotations

import collections
import logging
import warnings

import onnx
import pytest

from mha2sha import zoo
from tests.lower._util import assert_same, convert_and_check, lower, run_ort

pytestmark = pytest.mark.filterwarnings("ignore")

OPTIMIZER_CASES = [
    ("bert", "bert", {"Attention", "SkipLayerNormalization", "BiasGelu"}),
    ("sd_block", "unet", {"MultiHeadAttention", "BiasSplitGelu", "BiasAdd", "SkipLayerNormalization"}),
    ("gpt2_prefill", "gpt2", {"FastGelu", "SkipLayerNormalization"}),
    ("clip_text", "clip", {"QuickGelu"}),
    ("whisper_encoder", "bart", {"Gelu", "BiasGelu"}),
    ("llama_step", "gpt2", {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}),
]


def _fused_ops(model: onnx.ModelProto) -> set[str]:
    return {
        n.op_type
        for n in model.graph.node
        if n.domain == "com.microsoft" or n.op_type == "SimplifiedLayerNormalization"
    }


@pytest.mark.parametrize(
    ("case", "model_type", "expected_ops"), OPTIMIZER_CASES, ids=[c[0] for c in OPTIMIZER_CASES]
)
def test_ort_optimizer_graphs(tmp_path, case, model_type, expected_ops):
    from onnxruntime.transformers.optimizer import optimize_model

    path = zoo.build(case, "torchscript")
    info = zoo.CASES[case]
    logging.disable(logging.WARNING)
    try:
        optimized = optimize_model(
            str(path),
            model_type=model_type,
            num_heads=info.heads,
            hidden_size=info.heads * info.head_dim,
            opt_level=0,
        ).model
    finally:
        logging.disable(logging.NOTSET)
    assert expected_ops <= _fused_ops(optimized)
    lowered, record = lower(optimized)
    assert not record.refused
    assert not _fused_ops(lowered)
    feeds = zoo.example_inputs(case)
    assert_same(optimized, run_ort(onnx.load(path), feeds), run_ort(lowered, feeds))
    convert_and_check(lowered, tmp_path, blocks=_attention_count(optimized))


def _attention_count(model: onnx.ModelProto) -> int:
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return counts["Softmax"] + counts["Attention"] + counts["MultiHeadAttention"]


def _sdpa_opset23(case: str):
    """The zoo case with HF's ``sdpa`` attention, exported by dynamo at opset 23 (ONNX Attention)."""
    from mha2sha.zoo.cache import cache_key, cached_build
    from mha2sha.zoo.cases import REGISTRY
    from mha2sha.zoo.export import quiet_export

    def produce(path):
        import torch

        built = REGISTRY[case].builder()
        for module in built.module.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = "sdpa"
        with torch.no_grad(), quiet_export(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                built.module,
                tuple(built.inputs.values()),
                input_names=list(built.inputs),
                output_names=built.output_names,
                dynamo=True,
                opset_version=23,
                optimize=True,
            )
            program.save(str(path), external_data=False)
        return {"case": case, "opset": 23, "attention": "sdpa"}

    return cached_build(cache_key(f"lower-{case}-sdpa23", "dynamo"), produce)


@pytest.mark.parametrize("case", ["llama_gqa_step", "bert"])
def test_dynamo_opset23_attention(tmp_path, case):
    path = _sdpa_opset23(case)
    model = onnx.load(path)
    assert any(n.op_type == "Attention" for n in model.graph.node)
    lowered, record = lower(model)
    assert not record.refused
    assert not any(n.op_type == "Attention" for n in lowered.graph.node)
    feeds = zoo.example_inputs(case)
    assert_same(model, run_ort(model, feeds), run_ort(lowered, feeds))
    convert_and_check(lowered, tmp_path, blocks=zoo.CASES[case].layers)
