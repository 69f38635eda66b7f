"""The analysis stage: what is in a model before (and after) conversion, as plain records.

``analyze(path, AnalyzeOptions(...))`` returns an :class:`AnalysisRecord`: every attention block
(heads, KV heads, head dim, RoPE, mask, KV cache layout, packed QKV, LoRA, fused op, whether the
split takes it and why not), one drawing per kind of block, the op types with HTP support from the
QNN execution provider, dynamic inputs with a consistent shape suggestion, tensors of rank > 4 and
encodings coverage. ``describe_attention`` is the part ``convert`` reuses for its own report.
"""

from mha2sha.analyze.analysis import AnalyzeOptions, analyze
from mha2sha.analyze.record import AnalysisRecord, AttentionInfo, BlockKind, ModelFacts, StructureRecord
from mha2sha.analyze.structure import describe_attention

__all__ = [
    "AnalysisRecord",
    "AnalyzeOptions",
    "AttentionInfo",
    "BlockKind",
    "ModelFacts",
    "StructureRecord",
    "analyze",
    "describe_attention",
]
