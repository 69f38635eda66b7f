"""Head specs: which part of a tensor each attention head needs.

The split is tensor parallelism along the head axis. Every tensor touched by the split carries a
:class:`HeadSpec`: a tuple of :class:`AxisCut`, one per tensor axis that is cut per head. Head ``h``
(a query head of the attention core) uses, on each cut axis, the contiguous range
``[offset + i * block, offset + (i + 1) * block)`` with ``i = (h // div) % count``.

- ``count`` blocks of ``block`` elements, starting at ``offset``: ``[B, S, H*D]`` with heads on
  axis 2 is ``AxisCut(2, offset=0, block=D, count=H)``; packed QKV shifts ``offset``.
- ``div`` folds query heads onto shared tensors: a GQA key tensor with ``Hkv`` heads, each shared
  by ``g`` query heads, is cut with ``count=Hkv, div=g``.
An empty spec means the tensor is shared: every head uses it whole.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "AxisCut",
    "HeadSpec",
    "head_spec_of_output",
    "is_full_cover",
    "piece_key",
    "piece_ranges",
    "piece_shape",
]


@dataclasses.dataclass(frozen=True, order=True)
class AxisCut:
    """A per-head contiguous range along one axis (see the module docstring)."""

    axis: int
    offset: int
    block: int
    count: int
    div: int = 1

    def index(self, head: int) -> int:
        return (head // self.div) % self.count

    def start(self, head: int) -> int:
        return self.offset + self.index(head) * self.block

    def moved(self, axis: int, *, offset: int | None = None, block: int | None = None) -> AxisCut:
        """The same cut on another axis (and optionally another offset/block size)."""
        return dataclasses.replace(
            self,
            axis=axis,
            offset=self.offset if offset is None else offset,
            block=self.block if block is None else block,
        )


HeadSpec = tuple[AxisCut, ...]


def piece_key(spec: HeadSpec, head: int) -> tuple[int, ...]:
    """Identifies the piece a head uses: heads with equal keys share the piece (GQA, MQA)."""
    return tuple(cut.index(head) for cut in spec)


def piece_shape(shape: tuple[int, ...], spec: HeadSpec) -> tuple[int, ...]:
    dims = list(shape)
    for cut in spec:
        dims[cut.axis] = cut.block
    return tuple(dims)


def piece_ranges(spec: HeadSpec, head: int) -> tuple[tuple[int, int, int], ...]:
    return tuple((cut.axis, cut.start(head), cut.start(head) + cut.block) for cut in spec)


def is_full_cover(spec: HeadSpec, shape: tuple[int, ...]) -> bool:
    """True when the pieces, concatenated in order along one axis, rebuild the whole tensor."""
    if len(spec) != 1:
        return False
    (cut,) = spec
    return cut.offset == 0 and cut.block * cut.count == shape[cut.axis]


def head_spec_of_output(shape: tuple[int, ...]) -> HeadSpec:
    """Head cut of an attention output ``MatMul(P, V)`` of static ``shape``: ``[B,H,S,D]``,
    ``[B*H,S,D]`` (heads folded into batch), ``[B,Hkv,g,S,D]`` (GQA without repeat_kv).

    Returns an empty spec when there is a single head (nothing to split).
    """
    dims = list(shape)
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
