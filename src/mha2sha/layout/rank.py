"""Rank check: HTP tensors have at most 4 dimensions.

A tensor of rank > 4 in the graph (GQA ``repeat_kv`` as ``[B, Hkv, g, S, D]``, mask construction
with 5-D broadcasts) is not supported on the HTP. The head split removes the ``repeat_kv`` ones (each
head reads its KV head directly); this check lists what remains so the report can name it.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from mha2sha.graph import static_shape

__all__ = ["HighRankTensor", "high_rank_tensors"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HighRankTensor:
    """A tensor of rank > ``max_rank``: its name, shape, and what produces it."""

    name: str
    shape: tuple[int | str | None, ...]
    producer: str  # op type, "graph input" or "initializer"
    node: str = ""


def _shape(value: ir.Value) -> tuple[int | str | None, ...] | None:
    shape: ir.ShapeProtocol | None = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    if shape is None:
        return None
    static = static_shape(value)
    if static is not None:
        return static
    return tuple(d if isinstance(d, int) else getattr(d, "value", None) for d in shape)


def high_rank_tensors(model: ir.Model, max_rank: int = 4) -> list[HighRankTensor]:
    """Every tensor of the main graph whose known rank exceeds ``max_rank``, in graph order.

    Tensors of unknown shape are not listed (run shape inference first, e.g.
    :func:`mha2sha.io.prepare.prepare_for_split`).
    """
    graph = model.graph
    found: list[HighRankTensor] = []
    for value in graph.inputs:
        shape = _shape(value)
        if shape is not None and len(shape) > max_rank:
            found.append(HighRankTensor(value.name or "", shape, "graph input"))
    for name, value in graph.initializers.items():
        shape = _shape(value)
        if shape is not None and len(shape) > max_rank and any(u.graph is graph for u, _ in value.uses()):
            found.append(HighRankTensor(name, shape, "initializer"))
    for node in graph:
        for value in node.outputs:
            shape = _shape(value)
            if shape is not None and len(shape) > max_rank:
                found.append(HighRankTensor(value.name or "", shape, node.op_type, node.name or ""))
    if found:
        logger.info("%d tensors of rank > %d remain", len(found), max_rank)
    return found
