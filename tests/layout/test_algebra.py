"""The layout algebra never claims an equivalence numpy disproves (random chains, brute force)."""

from __future__ import annotations

import random

import numpy as np

from mha2sha.layout.algebra import Step, compose


def _factors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _shape(rng: random.Random, n: int, rank: int) -> tuple[int, ...]:
    dims, rest = [], n
    for _ in range(rank - 1):
        d = rng.choice(_factors(rest))
        dims.append(d)
        rest //= d
    dims.append(rest)
    rng.shuffle(dims)
    return tuple(dims)


def _apply(a: np.ndarray, steps) -> np.ndarray:
    for s in steps:
        a = a.transpose(s.param) if s.kind == "transpose" else a.reshape(s.param)
    return a


def test_random_chains_against_numpy() -> None:
    rng = random.Random(0)
    kinds: set[str] = set()
    for _ in range(4000):
        n = rng.choice([6, 8, 12, 24, 36, 60, 96])
        src = _shape(rng, n, rng.randint(1, 4))
        steps, shape = [], src
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.5:
                perm = list(range(len(shape)))
                rng.shuffle(perm)
                steps.append(Step("transpose", tuple(perm)))
                shape = tuple(shape[p] for p in perm)
            else:
                shape = _shape(rng, n, rng.randint(1, 5))
                steps.append(Step("reshape", shape))
        a = np.arange(n).reshape(src)
        expected = _apply(a, steps)
        comp = compose(src, steps)
        if comp is None:
            continue
        kinds.add(comp.kind)
        assert comp.dst_shape == expected.shape
        if comp.steps is None:
            assert not np.array_equal(expected.ravel(), a.ravel())
            continue
        got = _apply(a, comp.steps)
        assert got.shape == expected.shape and np.array_equal(got, expected), (src, steps, comp)
        if comp.kind == "identity":
            assert not comp.steps and expected.shape == src
        assert len(comp.steps) <= 2
    assert kinds >= {"identity", "reshape", "transpose", "reshape_transpose", "transpose_reshape"}


def test_bd1l_round_trip_is_identity() -> None:
    to = [Step("reshape", (1, 1, 7, 64)), Step("transpose", (0, 3, 1, 2))]
    back = [Step("transpose", (0, 2, 3, 1)), Step("reshape", (1, 7, 64))]
    comp = compose((1, 7, 64), to + back)
    assert comp is not None and comp.kind == "identity"
    comp = compose((1, 64, 1, 7), back + to)
    assert comp is not None and comp.kind == "identity"


def test_mixing_reshape_is_not_guessed() -> None:
    assert compose((4, 3), [Step("reshape", (6, 2))]).kind == "reshape"  # row-major: fine
    # [2,3] -> [3,2] -> [2,3]: the new first dim cuts the atom of size 3: not expressible with atoms
    assert compose((2, 3), [Step("transpose", (1, 0)), Step("reshape", (2, 3))]) is None
