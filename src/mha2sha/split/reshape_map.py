"""Carry a head cut through a reshape: ``[B, S, H*D] <-> [B, S, H, D]`` and friends.

A reshape of a static shape is a sequence of groups: contiguous input axes whose product equals the
product of contiguous output axes. A cut on one side maps to the other side within its group, either
as a single cut (``H`` blocks of ``D`` on the merged axis) or, when one axis splits into several
(``H -> (Hkv, g)`` for GQA ``repeat_kv``), as one cut per axis with the head index in mixed radix.
"""

from __future__ import annotations

import math

from mha2sha.split.spec import AxisCut, HeadSpec

__all__ = ["Unmappable", "reshape_groups", "map_spec_through_reshape"]


class Unmappable(Exception):
    """The cut does not map to a contiguous range on the other side of the reshape."""


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pairs of (source axes, destination axes) with equal products, in order.

    Size-1 axes that have no partner form groups of their own with an empty other side.
    """
    if math.prod(src) != math.prod(dst):
        raise Unmappable(f"reshape {src} -> {dst} changes the element count")
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        gi, gj = [i], [j]
        pa, pb = src[i], dst[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                gi.append(i)
                pa *= src[i]
                i += 1
            else:
                gj.append(j)
                pb *= dst[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _map_cut(
    cut: AxisCut, src_group: list[int], dst_group: list[int], src: tuple[int, ...], dst: tuple[int, ...]
) -> list[AxisCut]:
    src_dims = [src[a] for a in src_group]
    dst_dims = [dst[a] for a in dst_group]
    t = src_group.index(cut.axis)
    if math.prod(src_dims[:t]) != 1:
        raise Unmappable("cut axis is not the outermost non-trivial axis of its reshape group")
    inner = math.prod(src_dims[t + 1 :])
    flat_offset, flat_block = cut.offset * inner, cut.block * inner
    # One destination axis holds the whole range: a single cut.
    for u, axis in enumerate(dst_group):
        if math.prod(dst_dims[:u]) != 1:
            break
        inner_u = math.prod(dst_dims[u + 1 :])
        if flat_offset % inner_u == 0 and flat_block % inner_u == 0:
            return [cut.moved(axis, offset=flat_offset // inner_u, block=flat_block // inner_u)]
    # The heads spread over several destination axes (mixed radix), e.g. H -> (Hkv, g).
    if flat_offset == 0 and flat_block * cut.count == math.prod(dst_dims):
        for u in reversed(range(len(dst_group))):
            inner_u = math.prod(dst_dims[u + 1 :])
            if flat_block % inner_u or dst_dims[u] % (flat_block // inner_u):
                continue
            r = flat_block // inner_u
            cuts = [AxisCut(dst_group[u], 0, r, dst_dims[u] // r, cut.div)]
            div = cut.div * (dst_dims[u] // r)
            for k in reversed(range(u)):
                if dst_dims[k] > 1:
                    cuts.append(AxisCut(dst_group[k], 0, 1, dst_dims[k], div))
                    div *= dst_dims[k]
            return cuts
    raise Unmappable("head range is not contiguous after the reshape")


def map_spec_through_reshape(spec: HeadSpec, src: tuple[int, ...], dst: tuple[int, ...]) -> HeadSpec:
    """Map a spec on a tensor of shape ``src`` to the same elements viewed with shape ``dst``."""
    groups = reshape_groups(src, dst)
    out: list[AxisCut] = []
    seen_groups: set[int] = set()
    for cut in spec:
        g = next(k for k, (gi, _) in enumerate(groups) if cut.axis in gi)
        if g in seen_groups:
            raise Unmappable("two head cuts fall in one reshape group")
        seen_groups.add(g)
        src_group, dst_group = groups[g]
        if not dst_group:
            raise Unmappable("cut axis is removed by the reshape")
        out.extend(_map_cut(cut, src_group, dst_group, src, dst))
    return tuple(sorted(out))
