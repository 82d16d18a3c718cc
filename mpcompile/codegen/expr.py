"""One source for the kernels' index math: Python functions over int-like values.

Every address and fragment mapping of a kernel is written once, as a Python function using
``+ - * // % & | ^ << >>`` and comparisons. Called with ints or NumPy integer arrays it computes
(the NumPy model of the kernel executes it for every thread); called with :class:`Sym` values it
builds the C++ expression the renderer pastes into the CUDA source. Indices are non-negative, so
Python's ``//`` and ``%`` agree with C++'s ``/`` and ``%``.
"""

from __future__ import annotations

from typing import Any

from ..errors import KernelError


class SymbolicError(KernelError, TypeError):
    """A symbolic index expression was used where a concrete value is needed."""


class Sym:
    """A C++ integer (or boolean) expression."""

    __slots__ = ("code",)

    def __init__(self, code: str):
        self.code = code

    def __str__(self) -> str:
        return self.code

    def __repr__(self) -> str:
        return f"Sym({self.code!r})"

    def __bool__(self) -> bool:  # a symbolic value has no truth value at render time
        raise SymbolicError(f"cannot branch on the symbolic value {self.code}: write the "
                            "condition as an expression (all_of, comparisons)")


def _code(x: Any) -> str:
    if isinstance(x, Sym):
        return x.code
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x) if x >= 0 else f"({x})"
    raise SymbolicError(f"cannot render {x!r} in an index expression")


def _binop(op: str, fold):
    def f(a, b):
        if not isinstance(a, Sym) and not isinstance(b, Sym):
            return fold(a, b)
        # identities keep the rendered code readable
        if op == "*" and (a == 0 if not isinstance(a, Sym) else False):
            return 0
        if op == "*" and not isinstance(b, Sym) and b == 0:
            return 0
        if op in ("+", "-", "|", "^", "<<", ">>") and not isinstance(b, Sym) and b == 0:
            return a
        if op in ("+", "|", "^") and not isinstance(a, Sym) and a == 0:
            return b
        if op in ("*", "/") and not isinstance(b, Sym) and b == 1:
            return a
        if op == "*" and not isinstance(a, Sym) and a == 1:
            return b
        return Sym(f"({_code(a)} {op} {_code(b)})")

    return f


_OPS = {
    "add": ("+", lambda a, b: a + b),
    "sub": ("-", lambda a, b: a - b),
    "mul": ("*", lambda a, b: a * b),
    "floordiv": ("/", lambda a, b: a // b),
    "mod": ("%", lambda a, b: a % b),
    "and": ("&", lambda a, b: a & b),
    "or": ("|", lambda a, b: a | b),
    "xor": ("^", lambda a, b: a ^ b),
    "lshift": ("<<", lambda a, b: a << b),
    "rshift": (">>", lambda a, b: a >> b),
    "lt": ("<", lambda a, b: a < b),
    "le": ("<=", lambda a, b: a <= b),
    "gt": (">", lambda a, b: a > b),
    "ge": (">=", lambda a, b: a >= b),
    "eq": ("==", lambda a, b: a == b),
    "ne": ("!=", lambda a, b: a != b),
}

for _name, (_op, _fold) in _OPS.items():
    _f = _binop(_op, _fold)
    setattr(Sym, f"__{_name}__", lambda self, other, _f=_f: _f(self, other))
    if _name not in ("lt", "le", "gt", "ge", "eq", "ne"):
        setattr(Sym, f"__r{_name}__", lambda self, other, _f=_f: _f(other, self))

Sym.__hash__ = lambda self: hash(self.code)  # __eq__ is symbolic; keep Sym hashable


def all_of(*conds):
    """Logical and of conditions (``&&`` when rendered)."""
    conds = [c for c in conds if c is not True]
    if not conds:
        return True
    if any(isinstance(c, Sym) for c in conds):
        return Sym("(" + " && ".join(_code(c) for c in conds) + ")")
    out = conds[0]
    for c in conds[1:]:
        out = out & c
    return out


def minimum(a, b):
    """The smaller of two int-like values (``min`` when rendered; element-wise on arrays)."""
    if isinstance(a, Sym) or isinstance(b, Sym):
        return Sym(f"min({_code(a)}, {_code(b)})")
    if hasattr(a, "shape") or hasattr(b, "shape"):
        import numpy as np

        return np.minimum(a, b)
    return min(a, b)


def select(cond, a, b):
    """``a`` where ``cond`` holds, else ``b`` (``cond ? a : b`` when rendered; element-wise on
    arrays)."""
    if any(isinstance(v, Sym) for v in (cond, a, b)):
        return Sym(f"({_code(cond)} ? {_code(a)} : {_code(b)})")
    if any(hasattr(v, "shape") for v in (cond, a, b)):
        import numpy as np

        return np.where(cond, a, b)
    return a if cond else b


def below(x, n: int):
    """``0 <= x < n`` for a signed int-like ``x``: one unsigned comparison when rendered."""
    if isinstance(x, Sym):
        return Sym(f"((unsigned){_code(x)} < {_code(n)}u)")
    return (x >= 0) & (x < n)


def wide(x):
    """``x`` as a 64-bit integer: a cast when rendered (the arithmetic it feeds is then 64-bit
    in C++); Python ints and NumPy int64 arrays are already wide."""
    return Sym(f"((long long){_code(x)})") if isinstance(x, Sym) else x


def render(x) -> str:
    return _code(x)
