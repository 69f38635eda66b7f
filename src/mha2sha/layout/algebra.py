"""Compose chains of Transpose/Reshape exactly, to prove when they cancel.

A chain of data-movement ops maps the elements of its source to its result. Describe the source as
row-major *atoms* (its non-unit dims, refined into factors as reshapes require) and every
intermediate tensor as a list of atom groups, one group per dim: a Transpose permutes the groups,
a Reshape regroups the row-major atom sequence (splitting an atom when a new dim cuts through
it). A reshape that mixes elements of two atoms in a non-factorable way (``[4, 3] -> [6, 2]``)
cannot be described and the composition is reported as unknown, never guessed.

The result is then classified from the atoms alone:
- **identity**: same shape and the atoms in source order;
- **reshape**: atoms in source order (one Reshape does it);
- **transpose**: every result dim is exactly one source dim's atoms (one Transpose does it);
- otherwise **general** (the chain is kept).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

__all__ = ["Composition", "Step", "compose"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One data movement: ``kind`` "transpose" with ``param`` = perm, or "reshape" with the new shape."""

    kind: str
    param: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Composition:
    """What a chain does, and the shortest equivalent op sequence found (``steps``)."""

    src_shape: tuple[int, ...]
    dst_shape: tuple[int, ...]
    kind: str  # "identity" | "reshape" | "transpose" | "reshape_transpose" | "transpose_reshape" | "general"
    steps: tuple[Step, ...] | None = None  # None for "general"


class _Atoms:
    def __init__(self, shape: Sequence[int]):
        self._ids = itertools.count()
        self.size: dict[int, int] = {}
        self.src_groups: list[list[int]] = [self._group(d) for d in shape]
        self.ref: list[int] = [a for g in self.src_groups for a in g]
        self.groups: list[list[int]] = [list(g) for g in self.src_groups]
        self.src_valid = True  # every atom lies within one source dim

    def _group(self, dim: int) -> list[int]:
        if dim == 1:
            return []
        atom = next(self._ids)
        self.size[atom] = dim
        return [atom]

    def split(self, atom: int, major: int) -> tuple[int, int]:
        """Split ``atom`` into (major, size // major) everywhere it appears."""
        a, b = next(self._ids), next(self._ids)
        self.size[a], self.size[b] = major, self.size[atom] // major
        for groups in (self.src_groups, self.groups, [self.ref]):
            for g in groups:
                if atom in g:
                    i = g.index(atom)
                    g[i : i + 1] = [a, b]
        return a, b

    def transpose(self, perm: Sequence[int]) -> bool:
        if sorted(perm) != list(range(len(self.groups))):
            return False
        self.groups = [self.groups[p] for p in perm]
        return True

    def reshape(self, shape: Sequence[int]) -> bool:
        return self._regroup(shape) or (self._coalesce() and self._regroup(shape))

    def _coalesce(self) -> bool:
        """Fuse neighbouring atoms that are also neighbours in source order (``[4,3] -> [6,2]``)."""
        pos = {a: i for i, a in enumerate(self.ref)}
        flat = [a for g in self.groups for a in g]
        merged = False
        i = 0
        while i + 1 < len(flat):
            a, b = flat[i], flat[i + 1]
            if pos[b] != pos[a] + 1:
                i += 1
                continue
            c = next(self._ids)
            self.size[c] = self.size[a] * self.size[b]
            k = self.ref.index(a)
            self.ref[k : k + 2] = [c]
            pos = {x: j for j, x in enumerate(self.ref)}
            flat[i : i + 2] = [c]
            for g in self.src_groups:
                if a in g or b in g:
                    if a in g and b in g:
                        j = g.index(a)
                        g[j : j + 2] = [c]
                    else:  # the fused atom spans two source dims: no single Transpose can use it
                        self.src_valid = False
            merged = True
        if merged:
            self.groups = [flat]  # only the row-major order matters to the reshape that follows
        return merged

    def _regroup(self, shape: Sequence[int]) -> bool:
        flat = [a for g in self.groups for a in g]
        out: list[list[int]] = []
        i = 0
        for dim in shape:
            group: list[int] = []
            acc = 1
            while acc < dim:
                if i >= len(flat):
                    return False
                atom = flat[i]
                size = self.size[atom]
                if dim % (acc * size) == 0:
                    group.append(atom)
                    acc *= size
                    i += 1
                elif dim % acc == 0 and size % (dim // acc) == 0:
                    major, minor = self.split(atom, dim // acc)
                    flat[i] = minor
                    group.append(major)
                    acc = dim
                else:
                    return False
            if acc != dim:
                return False
            out.append(group)
        if i != len(flat):
            return False
        self.groups = out
        return True


def compose(src_shape: Sequence[int], steps: Sequence[Step]) -> Composition | None:
    """Classify the chain ``steps`` applied to a tensor of ``src_shape``; None when not describable."""
    src = tuple(int(d) for d in src_shape)
    atoms = _Atoms(src)
    for step in steps:
        ok = atoms.transpose(step.param) if step.kind == "transpose" else atoms.reshape(step.param)
        if not ok:
            return None
    flat = [a for g in atoms.groups for a in g]
    dst = _dst_shape(src, steps)
    if flat == atoms.ref:
        if dst == src:
            return Composition(src, dst, "identity", ())
        return Composition(src, dst, "reshape", (Step("reshape", dst),))
    perm = _as_transpose(atoms, src) if atoms.src_valid else None
    if perm is not None and tuple(src[p] for p in perm) == dst:
        return Composition(src, dst, "transpose", (Step("transpose", perm),))
    if perm is not None:
        return Composition(src, dst, "transpose_reshape", (Step("transpose", perm), Step("reshape", dst)))
    mid_perm = _as_reshape_transpose(atoms)
    if mid_perm is not None:
        mid, perm2 = mid_perm
        return Composition(src, dst, "reshape_transpose", (Step("reshape", mid), Step("transpose", perm2)))
    return Composition(src, dst, "general")


def _as_transpose(atoms: _Atoms, src: tuple[int, ...]) -> tuple[int, ...] | None:
    """A permutation of the source dims whose row-major order is the result's (then a reshape)."""
    flat = [a for g in atoms.groups for a in g]
    order: list[int] = []
    i = 0
    while i < len(flat):
        j = next((k for k, sg in enumerate(atoms.src_groups) if sg and sg[0] == flat[i]), -1)
        if j < 0 or flat[i : i + len(atoms.src_groups[j])] != atoms.src_groups[j]:
            return None
        order.append(j)
        i += len(atoms.src_groups[j])
    units = [j for j, d in enumerate(src) if d == 1]
    return tuple(units + order)


def _as_reshape_transpose(atoms: _Atoms) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """A reshape of the source then a transpose: every result dim is a contiguous run of source atoms."""
    pos = {a: i for i, a in enumerate(atoms.ref)}
    groups = atoms.groups
    for g in groups:
        if g and [pos[a] for a in g] != list(range(pos[g[0]], pos[g[0]] + len(g))):
            return None
    units = [i for i, g in enumerate(groups) if not g]
    runs = sorted((i for i, g in enumerate(groups) if g), key=lambda i: pos[groups[i][0]])
    mid_order = units + runs  # mid dim k holds result dim mid_order[k]
    mid = []
    for i in mid_order:
        n = 1
        for a in groups[i]:
            n *= atoms.size[a]
        mid.append(n)
    perm = tuple(mid_order.index(i) for i in range(len(groups)))
    return tuple(mid), perm


def _dst_shape(src: tuple[int, ...], steps: Sequence[Step]) -> tuple[int, ...]:
    shape = src
    for step in steps:
        shape = tuple(shape[p] for p in step.param) if step.kind == "transpose" else tuple(step.param)
    return shape
