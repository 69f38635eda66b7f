"""Find attention cores: a Softmax whose probabilities feed ``MatMul(P, V)``.

The anchor is only the core; which tensors are Q, K and V and how the heads reach the weights is
learnt by the walk (:mod:`mha2sha.split.walk`), so any exporter's graph around the core works.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from mha2sha.split.spec import AxisCut, HeadSpec

__all__ = ["AttentionCore", "find_attention_cores", "find_fused_attention", "head_spec_of_output"]

# Fused attention ops: reported as multi-head blocks the split does not handle (yet), never ignored.
FUSED_ATTENTION_OPS = {
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "PackedMultiHeadAttention",
    "PackedAttention",
    "DecoderMaskedMultiHeadAttention",
    "SparseAttention",
}

# Ops allowed between the Softmax and the MatMul with V: they move or retype the probabilities.
_PROBABILITY_PASSTHROUGH = {"Cast", "Dropout", "Identity", "Reshape", "Where", "Squeeze", "Unsqueeze"}


@dataclasses.dataclass
class AttentionCore:
    softmax: ir.Node
    pv_matmul: ir.Node  # MatMul(P, V)

    @property
    def output(self) -> ir.Value:
        return self.pv_matmul.outputs[0]

    @property
    def name(self) -> str:
        return self.softmax.name or self.pv_matmul.name or self.output.name


def _pv_matmul(softmax: ir.Node) -> ir.Node | None:
    value = softmax.outputs[0]
    for _ in range(8):  # a handful of retyping/reshaping hops, never a search
        users = [u for u in value.consumers()]
        if len(users) != 1:
            return None
        (user,) = users
        if user.op_type == "MatMul" and user.inputs[0] is value:
            return user
        if user.op_type not in _PROBABILITY_PASSTHROUGH:
            return None
        value = user.outputs[0]
    return None


def find_attention_cores(graph: ir.Graph) -> tuple[list[AttentionCore], list[ir.Node]]:
    """Cores found, and Softmax nodes that are not attention cores (reported, never converted)."""
    cores, others = [], []
    for node in graph:
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
            continue
        pv = _pv_matmul(node)
        if pv is None:
            others.append(node)
        else:
            cores.append(AttentionCore(node, pv))
    return cores, others


def find_fused_attention(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type in FUSED_ATTENTION_OPS]


def head_spec_of_output(value: ir.Value) -> HeadSpec:
    """Head cut of the attention output from its shape: ``[B,H,S,D]``, ``[B*H,S,D]``, ``[B,Hkv,g,S,D]``.

    Returns an empty spec when there is a single head (nothing to split).
    """
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return ()
    dims = [int(d) for d in shape]
    if len(dims) == 4 and dims[1] > 1:
        return (AxisCut(1, 0, 1, dims[1]),)
    if len(dims) == 3 and dims[0] > 1:
        return (AxisCut(0, 0, 1, dims[0]),)
    if len(dims) == 5:
        cuts = []
        if dims[1] > 1:
            cuts.append(AxisCut(1, 0, 1, dims[1], div=dims[2]))
        if dims[2] > 1:
            cuts.append(AxisCut(2, 0, 1, dims[2]))
        return tuple(cuts)
    return ()
