"""The floating-point vocabulary: one place for each dtype's names, its torch/ONNX/NumPy
counterparts and its unit roundoff.

Every module that turns a dtype into a word, an ONNX element type or an error bound reads it
from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import MPCompileError


@dataclass(frozen=True)
class FloatType:
    """One floating-point format as mpcompile names and bounds it."""

    torch: torch.dtype
    name: str  # "float16": what reports, specs and kernels say
    short: str  # "f16": suffix of cast node names
    onnx: int  # onnx.TensorProto element type (the numbers are fixed by the ONNX spec)
    numpy: str | None  # NumPy dtype name; None: NumPy has no such type (bfloat16)
    mantissa_bits: int  # stored fraction bits

    @property
    def unit_roundoff(self) -> float:
        """u = 2^-(p) with p the fraction bits + 1: the relative error bound of one rounding
        to nearest."""
        return 2.0 ** -(self.mantissa_bits + 1)

    @property
    def is_low(self) -> bool:
        """A low precision this compiler computes in (FP16/BF16)."""
        return self.torch in (torch.float16, torch.bfloat16)


FLOAT16 = FloatType(torch.float16, "float16", "f16", 10, "float16", 10)
BFLOAT16 = FloatType(torch.bfloat16, "bfloat16", "bf16", 16, None, 7)
FLOAT32 = FloatType(torch.float32, "float32", "f32", 1, "float32", 23)
FLOAT64 = FloatType(torch.float64, "float64", "f64", 11, "float64", 52)
FLOATS = (FLOAT16, BFLOAT16, FLOAT32, FLOAT64)
LOW = (torch.float16, torch.bfloat16)

_BY_TORCH = {f.torch: f for f in FLOATS}
_BY_NAME = {f.name: f for f in FLOATS} | {f.short: f for f in FLOATS} | {
    "fp16": FLOAT16, "half": FLOAT16, "bf16": BFLOAT16, "fp32": FLOAT32, "float": FLOAT32,
    "fp64": FLOAT64, "double": FLOAT64}


def info(dtype: torch.dtype | str) -> FloatType:
    """The :class:`FloatType` of a torch dtype or of a name ("float16", "fp16", "bf16", ...)."""
    found = _BY_TORCH.get(dtype) if isinstance(dtype, torch.dtype) else _BY_NAME.get(
        str(dtype).removeprefix("torch.").lower())
    if found is None:
        raise MPCompileError(
            f"{dtype!r} is not a floating-point type mpcompile knows: use one of "
            + ", ".join(f.name for f in FLOATS))
    return found


def dtype_name(dtype: torch.dtype | None) -> str:
    """"float16" for torch.float16 (any torch dtype, not only floats); "-" for None."""
    return "-" if dtype is None else str(dtype).removeprefix("torch.")


def from_name(name: str) -> torch.dtype:
    """torch.float16 for "float16", "fp16", "f16", "half" (and the like for the others)."""
    return info(name).torch


def unit_roundoff(dtype: torch.dtype | str) -> float:
    """2^-11 for float16, 2^-8 for bfloat16, 2^-24 for float32, 2^-53 for float64."""
    return info(dtype).unit_roundoff


__all__ = ["BFLOAT16", "FLOAT16", "FLOAT32", "FLOAT64", "FLOATS", "LOW", "FloatType",
           "dtype_name", "from_name", "info", "unit_roundoff"]
