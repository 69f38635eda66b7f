"""Re-make a constant table whose axes move with AR or CL (mask and position arithmetic).

Exporters bake the index arithmetic of the attention mask into constants: ``arange(CL)`` key
positions ``[1,1,1,CL]``, ``arange(P, P+AR)`` query positions ``[1,1,AR,1]``, a causal boolean
``[1,1,AR,CL]``, GatherND index tables. The trace says which of their axes carry AR / CL; this
module re-makes them at the new sizes, by one of three rules, each checked to reproduce the
original table exactly before it is trusted:

1. *affine*: ``table = base + sum_k i_k * delta_k`` along the moving axes (aranges, index tables,
   uniform fills with delta 0). A progression along the AR axis that starts at the past length
   (query positions) starts at the new past length; any other start is kept.
2. *uniform*: every slice along the moving axes is the same (bool / float fills): tiled.
3. *causal*: a ``[.., AR, CL]`` table that is one value where ``col <= row + (CL - AR)`` and another
   elsewhere: re-made with the new offset. A boolean table of a graph exported with AR 1 has one
   all-visible row, which is that causal mask for one token; it is re-made causal too.

Anything else is refused (the caller names the constant and its consumer).
"""

from __future__ import annotations

import numpy as np

from mha2sha.arcl.dims import Dim

__all__ = ["NotATable", "regenerate"]


class NotATable(ValueError):
    """No rule reproduces the table."""


def _grid(shape: tuple[int, ...], axes: dict[int, np.ndarray]) -> np.ndarray:
    """Sum of ``i_k * delta_k`` over the moving axes, broadcast to ``shape``."""
    total = np.zeros(shape, dtype=np.float64)
    for k, delta in axes.items():
        idx = np.arange(shape[k]).reshape([-1 if a == k else 1 for a in range(len(shape))])
        total = total + idx * delta
    return total


def _corner(array: np.ndarray, moving: list[int]) -> np.ndarray:
    return array[tuple(slice(0, 1) if a in moving else slice(None) for a in range(array.ndim))]


def _affine(array: np.ndarray, dims: dict[int, Dim], ar0: int, p0: int, ar: int, past: int):
    moving = sorted(dims)
    base = _corner(array, moving).astype(np.float64)
    deltas: dict[int, np.ndarray] = {}
    notes = []
    for k in moving:
        n = array.shape[k]
        if n >= 2:
            first = np.take(array, [0], axis=k).astype(np.float64)
            second = np.take(array, [1], axis=k).astype(np.float64)
            deltas[k] = _corner(second - first, [m for m in moving if m != k])
        elif dims[k].a and not dims[k].p and p0 > 0 and np.all(array == p0):
            deltas[k] = np.ones_like(base)  # one query position (AR is 1): positions past + i
        else:
            deltas[k] = np.zeros_like(base)
    if not np.array_equal(base + _grid(array.shape, deltas), array.astype(np.float64)):
        return None
    shift = np.zeros_like(base)
    for k, d in dims.items():
        delta = deltas[k]
        if not (d.a and not d.p) or not np.any(delta) or p0 == 0:
            continue
        start = base[delta != 0]
        if np.all(start == p0 * delta[delta != 0]):  # query positions: they start after the past
            shift = shift + np.where(delta != 0, (past - p0) * delta, 0)
            notes.append(f"axis {k}: positions past+i")
        elif np.all(start == 0):
            notes.append(f"axis {k}: index i")
        else:
            return None
    new_shape = tuple(dims[a].at(ar, past) if a in dims else s for a, s in enumerate(array.shape))
    out = base + shift + _grid(new_shape, deltas)
    kinds = []
    for k in moving:
        if not np.any(deltas[k]):
            kinds.append(f"axis {k}: repeated")
    meaning = "arithmetic progression (" + ", ".join(notes + kinds) + ")" if notes or kinds else "progression"
    if all(not np.any(deltas[k]) for k in moving):
        meaning = "repeated along " + ", ".join(f"axis {k} ({dims[k]})" for k in moving)
    return np.broadcast_to(out, new_shape).astype(array.dtype), meaning


def _uniform(array: np.ndarray, dims: dict[int, Dim], ar: int, past: int):
    moving = sorted(dims)
    corner = _corner(array, moving)
    if not np.array_equal(np.broadcast_to(corner, array.shape), array):
        return None
    new_shape = tuple(dims[a].at(ar, past) if a in dims else s for a, s in enumerate(array.shape))
    return np.broadcast_to(corner, new_shape).copy(), "repeated along " + ", ".join(
        f"axis {k} ({dims[k]})" for k in moving
    )


def _causal(array: np.ndarray, dims: dict[int, Dim], ar0: int, p0: int, ar: int, past: int):
    if len(dims) != 2:
        return None
    r, c = sorted(dims)
    rows, cols = dims[r], dims[c]
    moved = np.moveaxis(array, (r, c), (-2, -1))
    n_r, n_c = moved.shape[-2:]
    offset = (cols - rows).at(ar0, p0)
    visible = np.arange(n_c)[None, :] <= np.arange(n_r)[:, None] + offset
    flat = moved.reshape(-1, n_r, n_c)
    if not np.all(flat == flat[:1]):
        return None
    grid = flat[0]
    if not visible.any() or visible.all():
        return None
    on, off = grid[visible], grid[~visible]
    if not (np.all(on == on[0]) and np.all(off == off[0])):
        return None
    nr, nc = rows.at(ar, past), cols.at(ar, past)
    new_visible = np.arange(nc)[None, :] <= np.arange(nr)[:, None] + (cols - rows).at(ar, past)
    new_grid = np.where(new_visible, on[0], off[0]).astype(array.dtype)
    other = moved.shape[:-2]
    out = np.broadcast_to(new_grid, (*other, nr, nc))
    return np.moveaxis(out, (-2, -1), (r, c)).copy(), f"causal mask [row: {rows}, col: {cols}]"


def _one_row_causal(array: np.ndarray, dims: dict[int, Dim], ar0: int, p0: int, ar: int, past: int):
    """A boolean ``[.., 1, CL]`` mask of a graph exported with AR 1 is one all-visible row: the causal
    mask of a single token. Re-made causal (the only mask a decoder step applies to its new tokens)."""
    if array.dtype != np.bool_ or len(dims) != 2:
        return None
    r, c = sorted(dims)
    if array.shape[r] != 1 or not np.all(array == array.reshape(-1)[0]):
        return None
    on = bool(array.reshape(-1)[0])
    rows, cols = dims[r], dims[c]
    nr, nc = rows.at(ar, past), cols.at(ar, past)
    visible = np.arange(nc)[None, :] <= np.arange(nr)[:, None] + (cols - rows).at(ar, past)
    grid = np.where(visible, on, not on)
    moved = np.moveaxis(array, (r, c), (-2, -1))
    out = np.broadcast_to(grid, (*moved.shape[:-2], nr, nc))
    return np.moveaxis(
        out, (-2, -1), (r, c)
    ).copy(), f"causal mask [row: {rows}, col: {cols}] (one row when exported)"


def regenerate(
    array: np.ndarray, dims: dict[int, Dim], ar0: int, p0: int, ar: int, past: int
) -> tuple[np.ndarray, str]:
    """``array`` re-made with ``dims`` (axis -> Dim) at the new AR / past; raises :class:`NotATable`."""
    array = np.asarray(array)
    if array.dtype.kind in "iuf":
        done = _affine(array, dims, ar0, p0, ar, past)
        if done is not None:
            return done
    done = (
        _one_row_causal(array, dims, ar0, p0, ar, past)
        or _uniform(array, dims, ar, past)
        or _causal(array, dims, ar0, p0, ar, past)
    )
    if done is None:
        axes = ", ".join(f"axis {k} = {d}" for k, d in sorted(dims.items()))
        raise NotATable(
            f"a {array.dtype} table {list(array.shape)} whose {axes} is neither a progression, "
            "nor repeated, nor a causal mask"
        )
    return done
