"""The policy: the op table (``optable``) plus a user's overrides, module pins and options.

A :class:`Policy` is frozen and validated when built; ``Policy.rule(op, device)`` gives the
effective class of an op and the reason, which the classify pass records on every node.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch._ops import OpOverload, OpOverloadPacket

from .dtypes import LOW, dtype_name
from .errors import PolicyError
from .optable import (
    CPU_PROVEN,
    DEFAULT_TABLE,
    Entry,
    Op,
    OpClass,
    expand,
    index_table,
)

L, F, A, W, P, B = (OpClass.LOWER, OpClass.FP32, OpClass.FP32_ACCUM, OpClass.FOLLOW,
                    OpClass.PASSTHROUGH, OpClass.BANNED)

_DEFAULT_INDEX = index_table(DEFAULT_TABLE)  # validated at import


@dataclass(frozen=True)
class Rule:
    """What the policy says about one op on one device: its effective class and why."""

    op_class: OpClass
    reason: str
    source: str  # "table", "user", "strict_reductions", "unproven", "default"
    fp32_args: tuple[str, ...] = ()


def _module_pin_desc(pin: str | type) -> str:
    return pin.__qualname__ if isinstance(pin, type) else repr(pin)


@dataclass(frozen=True)
class Policy:
    """How a model is converted.

    Args:
        dtype: the low precision, ``torch.float16`` or ``torch.bfloat16`` (``torch.float32``
            turns low precision off everywhere: the FP32 baseline of the same pipeline).
        lower, fp32, follow, passthrough: ATen ops to move into that class, overriding the table
            (an overload like ``torch.ops.aten.mm.default``, or a packet for all overloads).
        keep_fp32_modules: pins whole submodules to FP32. A string is a regular expression
            matched (``re.fullmatch``) against the dotted module path (``"fc"``, ``"blocks\\.\\d+
            \\.norm"``); a class pins every instance (``torch.nn.BatchNorm2d``). Each must match
            at least one module of the model.
        strict_reductions: run FP32_ACCUM ops (softmax, norms, mean) in FP32, as torch.autocast
            does on GPUs.
        strategy: ``"mincut"`` (global minimum of cast bytes) or ``"local"`` (each free op takes
            its inputs' precision, as autocast's type promotion does).
        kernels: run low-precision matmuls/convolutions as generated tensor-core kernels (the
            ``kernels`` pass of ``passes.EXECUTION``, each a ``torch.ops.mpcompile.kernel`` call
            with an autograd formula). ``"auto"``: on CUDA, each kernel runs only after it passed
            a verification on the device (else, and where the library is faster, cuBLAS/cuDNN);
            without NVRTC the library ops, with one logged line; off CUDA not lowered. ``"on"``:
            lowered everywhere (off-GPU the same contract computed with torch); on CUDA verified
            like "auto" but a passing kernel is used even where the library is faster; without
            NVRTC on CUDA an error. ``"off"``: never.
    """

    dtype: torch.dtype = torch.float16
    lower: Sequence[Op] = ()
    fp32: Sequence[Op] = ()
    follow: Sequence[Op] = ()
    passthrough: Sequence[Op] = ()
    keep_fp32_modules: Sequence[str | type] = ()
    strict_reductions: bool = False
    strategy: str = "mincut"
    kernels: str = "auto"
    _user: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in (*LOW, torch.float32):
            raise PolicyError(
                f"Policy(dtype={self.dtype}): use torch.float16 or torch.bfloat16 "
                "(or torch.float32 for an all-FP32 baseline)"
            )
        if self.strategy not in ("mincut", "local"):
            raise PolicyError(f"Policy(strategy={self.strategy!r}): use 'mincut' or 'local'")
        if self.kernels not in ("auto", "on", "off"):
            raise PolicyError(f"Policy(kernels={self.kernels!r}): use 'auto' (verified "
                              "generated kernels on CUDA), 'on' (also elsewhere, via the "
                              "reference) or 'off'")
        user: dict[OpOverload, tuple[OpClass, str]] = {}
        for arg, cls in (("lower", L), ("fp32", F), ("follow", W), ("passthrough", P)):
            ops = getattr(self, arg)
            if isinstance(ops, (str, OpOverload, OpOverloadPacket)):
                ops = (ops,)
            ops = tuple(ops)
            object.__setattr__(self, arg, ops)
            for op in ops:
                for ov in expand(op):
                    if ov in user and user[ov][0] is not cls:
                        raise PolicyError(
                            f"{ov} is in Policy({user[ov][1]}=...) and Policy({arg}=...): "
                            "put it in one"
                        )
                    user[ov] = (cls, arg)
        object.__setattr__(self, "_user", user)
        pins = self.keep_fp32_modules
        if isinstance(pins, (str, type)):
            pins = (pins,)
        pins = tuple(pins)
        for pin in pins:
            if isinstance(pin, type):
                if not issubclass(pin, torch.nn.Module):
                    raise PolicyError(f"keep_fp32_modules: {pin} is not an nn.Module class")
            elif isinstance(pin, str):
                try:
                    re.compile(pin)
                except re.error as e:
                    raise PolicyError(
                        f"keep_fp32_modules: {pin!r} is not a valid regular expression: {e}"
                    ) from None
            else:
                raise PolicyError(
                    f"keep_fp32_modules: {pin!r} must be a regex string on the module path or an "
                    "nn.Module class"
                )
        object.__setattr__(self, "keep_fp32_modules", pins)

    def rule(self, op: object, device_type: str) -> Rule:
        """The effective class of ``op`` on ``device_type`` under this policy, with the reason."""
        if isinstance(op, OpOverload) and op in self._user:
            cls, arg = self._user[op]
            return Rule(cls, f"user override: Policy({arg}=[...{op}...])", "user",
                        _DEFAULT_INDEX[op].fp32_args if op in _DEFAULT_INDEX else ())
        entry = _DEFAULT_INDEX.get(op) if isinstance(op, OpOverload) else None
        if entry is None:
            return Rule(
                F,
                f"{op} is not in the policy table, so it runs in FP32 (the safe default); "
                "if it is safe in low precision add it with Policy(follow=[...]) or "
                "Policy(lower=[...])",
                "default",
            )
        if entry.op_class is A:
            if self.strict_reductions:
                return Rule(F, f"{entry.reason}; FP32 because strict_reductions=True",
                            "strict_reductions", entry.fp32_args)
            if self.dtype in LOW and (device_type, self.dtype) not in entry.proven_on:
                return Rule(
                    F,
                    f"{entry.reason}; but FP32 accumulation with {dtype_name(self.dtype)} I/O is"
                    f" not proven on {device_type}, so it runs in FP32",
                    "unproven",
                    entry.fp32_args,
                )
            if self.dtype in LOW:
                return Rule(A, f"{entry.reason} (proven with {dtype_name(self.dtype)} I/O on "
                            f"{device_type} by tests/test_fp32_accum.py)", "table",
                            entry.fp32_args)
        return Rule(entry.op_class, entry.reason, "table", entry.fp32_args)

    def keep_whole(self) -> tuple[OpOverload, ...]:
        """Ops capture must not decompose: every op a user list names, and every banned op, so
        the policy sees the op the model called rather than its pieces."""
        banned = (ov for ov, e in _DEFAULT_INDEX.items() if e.op_class is B)
        return tuple(dict.fromkeys((*self._user, *banned)))

    def module_pin(self, path: str, module: torch.nn.Module | None) -> str | None:
        """The keep_fp32_modules entry that pins the module at ``path``, if any."""
        for pin in self.keep_fp32_modules:
            if isinstance(pin, type):
                if module is not None and isinstance(module, pin):
                    return _module_pin_desc(pin)
            elif re.fullmatch(pin, path):
                return _module_pin_desc(pin)
        return None

    def check_pins(self, model: torch.nn.Module) -> None:
        """Every keep_fp32_modules entry must match a module of ``model``."""
        named = list(model.named_modules())
        for pin in self.keep_fp32_modules:
            if isinstance(pin, type):
                hit = any(isinstance(m, pin) for _, m in named)
            else:
                hit = any(re.fullmatch(pin, path) for path, _ in named if path)
            if not hit:
                paths = ", ".join(p for p, _ in named if p)[:400]
                raise PolicyError(
                    f"keep_fp32_modules entry {_module_pin_desc(pin)} matches no module of "
                    f"{type(model).__name__}; module paths are: {paths}"
                )




def table_rows() -> list[tuple[str, str, str]]:
    """(overload, class, reason) for every overload the default table covers."""
    return sorted((str(ov), str(e.op_class), e.reason) for ov, e in _DEFAULT_INDEX.items())


__all__ = ["CPU_PROVEN", "DEFAULT_TABLE", "Entry", "OpClass", "Policy", "Rule", "expand",
           "index_table", "table_rows"]
