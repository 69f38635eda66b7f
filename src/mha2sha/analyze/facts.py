"""Cheap facts of a graph, read from its structure only: op counts, inputs, tensors of rank > 4,
and how an encodings file covers it. Nothing here reads a weight."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

import onnx_ir as ir

from mha2sha.analyze.record import EncodingsSummary, InputInfo, ModelFacts
from mha2sha.encodings.model import EncodingSet
from mha2sha.graph import DATA_MOVEMENT_OPS, is_onnx_domain, name_of
from mha2sha.io.names import tensor_names, values_by_name
from mha2sha.layout.rank import high_rank_tensors

__all__ = ["encodings_summary", "input_infos", "model_facts", "op_counts"]

#: Ops whose constant inputs are weights (quantized by an encodings file).
_WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "Einsum"})
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


def op_counts(model: ir.Model) -> dict[tuple[str, str], int]:
    """``(domain, op type) -> count`` over the main graph and every subgraph."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for node in model.graph.all_nodes():
        counts[("" if is_onnx_domain(node.domain) else node.domain, node.op_type)] += 1
    return dict(counts)


def _shape_text(shape: Iterable[object] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join(str(d) if isinstance(d, int) else (getattr(d, "value", None) or "?") for d in shape) + "]"


def model_facts(model: ir.Model, *, rank: bool = True) -> ModelFacts:
    """Op counts, node / weight counts and (with ``rank``) every tensor of rank > 4."""
    facts = ModelFacts(ops=op_counts(model))
    facts.nodes = sum(facts.ops.values())
    facts.weights = len(model.graph.initializers)
    facts.weight_bytes = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )
    if rank:
        facts.high_rank = [(t.name, _shape_text(t.shape), t.producer) for t in high_rank_tensors(model)]
    return facts


def input_infos(model: ir.Model, used: Mapping[str, tuple[int, ...]]) -> list[InputInfo]:
    """Every graph input: declared shape (dim names kept) and the static shape ``used``."""
    infos = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        shape = value.shape
        dynamic = shape is None or not all(isinstance(d, int) for d in shape)
        static = used.get(name_of(value))
        if static is None and not dynamic and shape is not None:
            static = tuple(int(d) for d in shape)  # type: ignore[arg-type]
        infos.append(
            InputInfo(
                name_of(value),
                str(value.dtype.name.lower()) if value.dtype is not None else "?",
                _shape_text(shape),
                _shape_text(static) if static is not None else "",
                dynamic,
            )
        )
    return infos


def encodings_summary(
    model: ir.Model, encodings: EncodingSet, path: str, attention_tensors: Iterable[str] = ()
) -> EncodingsSummary:
    """How ``encodings`` cover ``model`` as given: which float activations and weights have an
    encoding, which encodings name no tensor, and which tensors the split will cut are unencoded."""
    names = tensor_names(model)
    graph = model.graph
    activations: list[str] = [
        v.name for v in graph.inputs if not v.is_initializer() and v.dtype in _FLOATS and v.name
    ]
    weights: list[str] = []
    for node in graph:
        # data movement (Reshape, Transpose, ...) carries its input's encoding: not counted
        if node.op_type != "Constant" and node.op_type not in DATA_MOVEMENT_OPS:
            activations += [out.name for out in node.outputs if out.name and out.dtype in _FLOATS]
        if node.op_type in _WEIGHT_OPS:
            for value in node.inputs:
                if (
                    value is not None
                    and value.is_initializer()
                    and value.const_value is not None
                    and value.const_value.dtype in _FLOATS
                    and len(value.const_value.shape) >= 2
                    and name_of(value) not in weights
                ):
                    weights.append(name_of(value))
    encoded = set(encodings.activations) | set(encodings.params)
    values = values_by_name(graph)

    def needs_encoding(name: str) -> bool:
        value = values.get(name)
        if value is None:
            return False
        producer = value.producer()
        if producer is not None and producer.op_type in DATA_MOVEMENT_OPS:
            return False  # carries its input's encoding
        dtype = value.dtype or (value.const_value.dtype if value.const_value is not None else None)
        return dtype in _FLOATS

    cut = [t for t in dict.fromkeys(attention_tensors) if needs_encoding(t)]
    return EncodingsSummary(
        path=path,
        version=encodings.version,
        activations=len(encodings.activations),
        params=len(encodings.params),
        float_activations=len(activations),
        encoded_activations=sum(1 for a in activations if a in encoded),
        weights=len(weights),
        encoded_weights=sum(1 for w in weights if w in encoded),
        unknown=[n for n, _ in encodings.items() if n not in names],
        unencoded_activations=[a for a in activations if a not in encoded],
        unencoded_weights=[w for w in weights if w not in encoded],
        attention_unencoded=[t for t in cut if t not in encoded],
        attention_tensors=len(cut),
    )
