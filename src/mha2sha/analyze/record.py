"""The analysis stage's records: what is in a model, in plain data (no graph references).

The report (``report/``) reads only these: the terminal summary, ``<name>.report.json``, the CSV
tables and the HTML report of ``mha2sha analyze``, and the HTML report of ``mha2sha convert``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = [
    "AnalysisRecord",
    "AttentionInfo",
    "BlockKind",
    "EncodingsSummary",
    "InputInfo",
    "ModelFacts",
    "OpSupport",
    "ProbeRecord",
    "Sketch",
    "SketchNode",
    "StructureRecord",
]

#: What a sketch node is, for its colour in the drawing.
Role = Literal["input", "output", "shared", "proj", "rope", "kv", "mask", "core", "layout", "norm", "other", "join"]


@dataclasses.dataclass
class SketchNode:
    """One box of a drawing: an op (label = op type) or a tensor entering/leaving the block."""

    id: str
    label: str
    detail: str = ""  # shape, weight slice, input name
    role: Role = "other"
    title: str = ""  # full tensor / node name (tooltip)


@dataclasses.dataclass
class Sketch:
    """A small DAG to draw: one attention block as the graph has it, or one head after the split."""

    title: str
    nodes: list[SketchNode] = dataclasses.field(default_factory=list)
    edges: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "note": self.note,
            "nodes": [dataclasses.asdict(n) for n in self.nodes],
            "edges": [list(e) for e in self.edges],
        }


@dataclasses.dataclass
class AttentionInfo:
    """One attention block: where it is, what kind it is, and whether the split takes it."""

    name: str  # the block's Softmax (or the fused / control-flow node that holds it)
    layer: str  # layer path, best effort (node name folder, weight name prefix, KV cache input)
    kind: str = ""  # label of its BlockKind ("A", "B", ...)
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    seq: int | None = None  # query tokens (AR)
    past: int | None = None  # cached tokens read
    rope: str = "none"
    mask: str = "none"
    kv_cache: str = "none"
    packed_qkv: str = ""  # "" or "q|k|v" / "k|v"
    lora: str = ""  # "" or the projections with a low-rank branch ("q, k, v")
    fused_op: str = ""  # the fused op it came from (lowered) or still is (not lowered)
    would_split: bool = False
    reason: str = ""  # why not (or "" when it splits)
    features: list[str] = dataclasses.field(default_factory=list)  # GQA, cross-attention, softcap, ...

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BlockKind:
    """Blocks with the same structure: one drawing each (as the graph has it, and one head)."""

    label: str
    blocks: list[str]  # block names
    layers: list[str]
    summary: str  # one line: "32 heads (GQA 8 KV), head dim 128, rotate_half ..."
    mha: Sketch | None = None
    sha: Sketch | None = None

    def to_dict(self, sketches: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "blocks": list(self.blocks),
            "layers": list(self.layers),
            "summary": self.summary,
        }
        if sketches:
            out["mha"] = self.mha.to_dict() if self.mha else None
            out["sha"] = self.sha.to_dict() if self.sha else None
        return out


@dataclasses.dataclass
class StructureRecord:
    """Every attention block of a model and one drawing per kind (before the split emits)."""

    blocks: list[AttentionInfo] = dataclasses.field(default_factory=list)
    kinds: list[BlockKind] = dataclasses.field(default_factory=list)
    other_softmax: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self, sketches: bool = True) -> dict[str, Any]:
        return {
            "blocks": [b.to_dict() for b in self.blocks],
            "kinds": [k.to_dict(sketches) for k in self.kinds],
            "non_attention_softmax": list(self.other_softmax),
        }


@dataclasses.dataclass
class InputInfo:
    """A graph input: its declared shape (dim names kept) and the static shape used."""

    name: str
    dtype: str
    declared: str  # "[batch_size,sequence_length]"
    used: str  # "[1,128]", or "" when no static shape could be chosen
    dynamic: bool


@dataclasses.dataclass
class ModelFacts:
    """Cheap facts of a graph: op counts, inputs, tensors of rank > 4 (nothing read but the graph)."""

    ops: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)  # (domain, op) -> count
    nodes: int = 0
    weights: int = 0  # initializers
    weight_bytes: int = 0
    high_rank: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (tensor, shape, producer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "weights": self.weights,
            "weight_bytes": self.weight_bytes,
            "ops": [{"domain": d, "op": o, "count": n} for (d, o), n in sorted(self.ops.items())],
            "rank_gt_4": [{"tensor": t, "shape": s, "producer": p} for t, s, p in self.high_rank],
        }


@dataclasses.dataclass
class OpSupport:
    """One op type of the model and whether the HTP backend takes it."""

    domain: str
    op: str
    count: int
    htp: Literal["yes", "no", "unknown"] = "unknown"
    reason: str = ""
    probed: int = 0  # nodes of this type the probe asked QNN about
    rejected: int = 0
    note: str = ""  # e.g. "lowered to primitives by mha2sha"
    converted: bool = True  # in the graph mha2sha converts (not lowered / folded away)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ProbeRecord:
    """The HTP support probe: which nodes the QNN execution provider takes (CPU fallback off)."""

    status: Literal["ran", "unavailable", "failed", "skipped"]
    soc: str
    message: str = ""  # why unavailable / failed / skipped
    encodings: str = ""  # "user" or a description of the generated ones
    components: list[str] = dataclasses.field(default_factory=list)  # what was probed
    # node name -> (op type (domain.op), taken, reason)
    nodes: dict[str, tuple[str, bool, str]] = dataclasses.field(default_factory=dict)
    unseen: dict[str, str] = dataclasses.field(default_factory=dict)  # probed nodes ORT removed: node -> op
    compiled: bool | None = None  # the QNN graph compiled (only tried when every node was taken)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0  # of the probe's child process

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "soc": self.soc,
            "message": self.message,
            "encodings": self.encodings,
            "components": list(self.components),
            "nodes": [{"node": n, "op": o, "taken": t, "reason": r} for n, (o, t, r) in self.nodes.items()],
            "unseen": [{"node": n, "op": o} for n, o in self.unseen.items()],
            "compiled": self.compiled,
            "seconds": round(self.seconds, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


@dataclasses.dataclass
class EncodingsSummary:
    """How an encodings file covers the model as given (before any split)."""

    path: str
    version: str
    activations: int  # encodings in the file
    params: int
    float_activations: int  # float tensors computed by the graph (and float graph inputs)
    encoded_activations: int
    weights: int  # float initializers read by a MatMul / Gemm / Conv / Gather
    encoded_weights: int
    unknown: list[str] = dataclasses.field(default_factory=list)  # encodings naming no tensor
    unencoded_activations: list[str] = dataclasses.field(default_factory=list)
    unencoded_weights: list[str] = dataclasses.field(default_factory=list)
    attention_unencoded: list[str] = dataclasses.field(default_factory=list)  # tensors the split cuts
    attention_tensors: int = 0

    @property
    def ok(self) -> bool:
        return not self.unknown and not self.unencoded_activations and not self.unencoded_weights

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


@dataclasses.dataclass
class AnalysisRecord:
    """Everything ``mha2sha analyze`` found, from the model as given to what the split would do."""

    model: str
    name: str
    opset: int
    producer: str
    inputs: list[InputInfo] = dataclasses.field(default_factory=list)
    outputs: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, shape)
    shape_suggestion: str = ""  # a consistent --input-shape / role command line ("" when static)
    shapes_note: str = ""  # how the analysis chose static shapes
    problems: list[str] = dataclasses.field(default_factory=list)  # what would stop `convert`
    notes: list[str] = dataclasses.field(default_factory=list)
    lowered: dict[str, int] = dataclasses.field(default_factory=dict)  # fused op -> count lowered
    not_lowered: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (node, op, reason)
    facts: ModelFacts = dataclasses.field(default_factory=ModelFacts)  # as converted (after lowering)
    original_ops: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)  # as given
    structure: StructureRecord = dataclasses.field(default_factory=StructureRecord)
    high_rank_after_split: list[tuple[str, str, str]] | None = None  # with --encodings (dry run)
    rank_in_split_blocks: list[str] = dataclasses.field(default_factory=list)  # rank > 4, recomputed per head
    ops: list[OpSupport] = dataclasses.field(default_factory=list)
    probe: ProbeRecord | None = None
    encodings: EncodingsSummary | None = None
    coverage: Any = None  # CoverageReport of the dry-run propagation, when encodings are given
    phases: list[Any] = dataclasses.field(default_factory=list)  # PhaseRecord

    @property
    def convertible(self) -> bool:
        """``convert`` would split every attention block (with the suggested shapes)."""
        return not self.problems and all(b.would_split or b.heads == 1 for b in self.structure.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "name": self.name,
            "opset": self.opset,
            "producer": self.producer,
            "convertible": self.convertible,
            "problems": list(self.problems),
            "notes": list(self.notes),
            "inputs": [dataclasses.asdict(i) for i in self.inputs],
            "outputs": [{"name": n, "shape": s} for n, s in self.outputs],
            "shape_suggestion": self.shape_suggestion,
            "shapes_note": self.shapes_note,
            "lowered": dict(self.lowered),
            "not_lowered": [{"node": n, "op": o, "reason": r} for n, o, r in self.not_lowered],
            "graph": self.facts.to_dict(),
            "attention": self.structure.to_dict(),
            "rank_gt_4_in_split_blocks": list(self.rank_in_split_blocks),
            "rank_gt_4_after_split": (
                None
                if self.high_rank_after_split is None
                else [{"tensor": t, "shape": s, "producer": p} for t, s, p in self.high_rank_after_split]
            ),
            "ops": [o.to_dict() for o in self.ops],
            "htp_probe": self.probe.to_dict() if self.probe else None,
            "encodings": self.encodings.to_dict() if self.encodings else None,
            "encodings_propagation": self.coverage.to_dict() if self.coverage is not None else None,
            "phases": [dataclasses.asdict(p) for p in self.phases],
        }
