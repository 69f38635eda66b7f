"""Symbolic sizes of a step graph: ``c + a*AR + p*P`` (AR tokens per step, P cached positions).

Every size the AR/CL rewrite touches is linear in the two free quantities of a step graph: the
tokens processed per call (AR) and the past length (P); the context length is ``CL = AR + P``.
A :class:`Dim` is such a linear form. A concrete size is a Dim with no AR and no P part, so shape
arithmetic (Reshape groups, Concat sums, Slice lengths, Shape -> Gather -> Concat chains) runs on
Dims the same way whether a size moves with AR/CL or not.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Dim", "NotLinear", "AR", "P", "CL", "ONE", "dim"]


class NotLinear(ArithmeticError):
    """The result would not be linear in AR and P (a product of two moving sizes, a remainder)."""


@dataclass(frozen=True, slots=True)
class Dim:
    """``c + a*AR + p*P``."""

    c: int = 0
    a: int = 0
    p: int = 0

    @property
    def symbolic(self) -> bool:
        return bool(self.a or self.p)

    def at(self, ar: int, past: int) -> int:
        return self.c + self.a * ar + self.p * past

    # arithmetic ------------------------------------------------------------------------------

    def __add__(self, other: object) -> Dim:
        o = dim(other)
        return Dim(self.c + o.c, self.a + o.a, self.p + o.p)

    __radd__ = __add__

    def __neg__(self) -> Dim:
        return Dim(-self.c, -self.a, -self.p)

    def __sub__(self, other: object) -> Dim:
        return self + (-dim(other))

    def __rsub__(self, other: object) -> Dim:
        return dim(other) - self

    def __mul__(self, other: object) -> Dim:
        o = dim(other)
        if self.symbolic and o.symbolic:
            raise NotLinear(f"({self}) * ({o})")
        if o.symbolic:
            return o * self.c
        return Dim(self.c * o.c, self.a * o.c, self.p * o.c)

    __rmul__ = __mul__

    def __floordiv__(self, other: object) -> Dim:
        o = dim(other)
        if o.symbolic:
            if not self.symbolic and self.c == 0:
                return Dim()
            raise NotLinear(f"({self}) // ({o})")
        if o.c == 0:
            raise ZeroDivisionError(str(self))
        if not self.symbolic:
            return Dim(self.c // o.c)
        if self.c % o.c or self.a % o.c or self.p % o.c:
            raise NotLinear(f"({self}) // {o.c}")
        return Dim(self.c // o.c, self.a // o.c, self.p // o.c)

    def __mod__(self, other: object) -> Dim:
        o = dim(other)
        if self.symbolic or o.symbolic:
            raise NotLinear(f"({self}) % ({o})")
        return Dim(self.c % o.c)

    def __int__(self) -> int:
        if self.symbolic:
            raise NotLinear(f"{self} is not a constant")
        return self.c

    __index__ = __int__

    # comparisons of concrete sizes (data arrays of Dims compare like ints) ---------------------

    def _concrete(self, other: object) -> tuple[int, int]:
        o = dim(other)
        if self.symbolic or o.symbolic:
            raise NotLinear(f"comparing {self} with {o}")
        return self.c, o.c

    def __lt__(self, other: object) -> bool:
        a, b = self._concrete(other)
        return a < b

    def __le__(self, other: object) -> bool:
        a, b = self._concrete(other)
        return a <= b

    def __gt__(self, other: object) -> bool:
        a, b = self._concrete(other)
        return a > b

    def __ge__(self, other: object) -> bool:
        a, b = self._concrete(other)
        return a >= b

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Dim):
            return self.c == other.c and self.a == other.a and self.p == other.p
        if isinstance(other, (int,)) or hasattr(other, "__index__"):
            return not self.symbolic and self.c == int(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.c, self.a, self.p))

    def __str__(self) -> str:
        if not self.symbolic:
            return str(self.c)
        terms = []
        if self.a and self.a == self.p:
            terms.append(_term(self.a, "CL"))
        else:
            if self.a:
                terms.append(_term(self.a, "AR"))
            if self.p:
                terms.append(_term(self.p, "P"))
        if self.c:
            terms.append(str(self.c))
        return "+".join(terms).replace("+-", "-")

    def __repr__(self) -> str:
        return f"Dim({self})"


def _term(k: int, name: str) -> str:
    return name if k == 1 else f"-{name}" if k == -1 else f"{k}*{name}"


def dim(x: object) -> Dim:
    """``x`` as a Dim (ints and numpy integers become constants)."""
    if isinstance(x, Dim):
        return x
    try:
        return Dim(int(x))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise TypeError(f"not a size: {x!r}") from None


AR = Dim(a=1)
P = Dim(p=1)
CL = Dim(a=1, p=1)
ONE = Dim(1)
