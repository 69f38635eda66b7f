"""The lowering table: ``(domain, op_type) -> Lowering``, one entry per op the stage rewrites."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import onnx_ir as ir

from mha2sha.lower import activations, gqa, ms_attention, norms, onnx_attention, rotary
from mha2sha.lower._build import Builder

__all__ = ["LOWERINGS", "Lowering"]

LowerFn = Callable[[ir.Node, Builder], Sequence[ir.Value | None]]


def _always(node: ir.Node, opset: int) -> bool:
    return True


def _before_opset_17(node: ir.Node, opset: int) -> bool:
    """ONNX ``LayerNormalization`` is standard from opset 17; before, it is ORT's own schema."""
    return opset < 17


@dataclasses.dataclass(frozen=True)
class Lowering:
    """``fn`` builds the replacement and returns one value per node output (None: not produced);
    ``applies`` says whether the node needs lowering at the model's default opset."""

    fn: LowerFn
    applies: Callable[[ir.Node, int], bool] = _always


MS = "com.microsoft"

LOWERINGS: dict[tuple[str, str], Lowering] = {
    ("", "Attention"): Lowering(onnx_attention.lower_attention),
    ("", "RotaryEmbedding"): Lowering(rotary.lower_onnx_rotary),
    (MS, "Attention"): Lowering(ms_attention.lower_ms_attention),
    (MS, "MultiHeadAttention"): Lowering(ms_attention.lower_multi_head_attention),
    (MS, "GroupQueryAttention"): Lowering(gqa.lower_group_query_attention),
    (MS, "RotaryEmbedding"): Lowering(rotary.lower_ms_rotary),
    ("", "RMSNormalization"): Lowering(norms.lower_rms_norm),
    ("", "SimplifiedLayerNormalization"): Lowering(norms.lower_simplified_layer_norm),
    ("", "LayerNormalization"): Lowering(norms.lower_layer_norm, _before_opset_17),
    (MS, "LayerNormalization"): Lowering(norms.lower_layer_norm),
    (MS, "SimplifiedLayerNormalization"): Lowering(norms.lower_simplified_layer_norm),
    (MS, "SkipLayerNormalization"): Lowering(norms.lower_skip_layer_norm),
    (MS, "SkipSimplifiedLayerNormalization"): Lowering(norms.lower_skip_simplified_layer_norm),
    (MS, "EmbedLayerNormalization"): Lowering(norms.lower_embed_layer_norm),
    (MS, "Gelu"): Lowering(activations.lower_gelu),
    (MS, "BiasGelu"): Lowering(activations.lower_bias_gelu),
    (MS, "FastGelu"): Lowering(activations.lower_fast_gelu),
    (MS, "QuickGelu"): Lowering(activations.lower_quick_gelu),
    (MS, "BiasAdd"): Lowering(activations.lower_bias_add),
    (MS, "BiasSplitGelu"): Lowering(activations.lower_bias_split_gelu),
}
