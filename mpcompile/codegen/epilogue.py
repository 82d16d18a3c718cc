"""The epilogue vocabulary: every op a kernel may apply to its FP32 accumulator, once.

Each :class:`EpilogueOp` holds the op in every form mpcompile needs: the C++ statement the
renderer pastes into the kernel, the torch function of the reference contract (and of the
library path), the NumPy function of the kernel's model, and how the float64 oracle of
``scripts/gpu_check.py`` carries a value and its error bound through it. Code that applies an
epilogue loops over ``spec.epilogue.ops`` and looks each name up in :data:`OPS`; nothing
dispatches on the names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..dtypes import from_name

GELU_MAX_SLOPE = 1.13  # max |d gelu / dx| ~ 1.129 (at x ~ 2.4), for both gelu forms


@dataclass(frozen=True)
class Operands:
    """What an op reads besides the accumulator ``x``: ``dtype`` the kernel's operand dtype name,
    ``bias`` already broadcastable to ``x`` (the caller reshapes it along the channel dimension,
    or gathers it at the output columns), ``scale`` a scalar (a 0-dim tensor for torch)."""

    dtype: str
    bias: Any = None
    scale: Any = None


@dataclass(frozen=True)
class EpilogueOp:
    """One epilogue op. ``c`` is a C++ statement on ``float x``, with ``{low}`` the operand
    dtype's short name (``f16``/``bf16``) and ``{bias}`` the prelude's conversion helper prefix
    of the bias dtype. ``torch`` keeps the dtype of ``x`` (FP32 in the reference, float64 in
    oracles); ``numpy`` works on float64 arrays. ``oracle(ref, bound, o)`` maps an exact float64
    value and its |.|-bound term through the op: rounding ops leave both alone (their error is the
    output rounding). ``linear``: commutes with summing split-K partials."""

    name: str
    c: str
    torch: Callable[[torch.Tensor, Operands], torch.Tensor]
    numpy: Callable[[np.ndarray, Operands], np.ndarray]
    oracle: Callable[[torch.Tensor, torch.Tensor, Operands], tuple[torch.Tensor, torch.Tensor]]
    linear: bool = False
    rounds: bool = False  # rounds to the operand dtype: the output's error is that dtype's u


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to ``dtype`` (nearest even) and back to float64."""
    return torch.from_numpy(np.asarray(x, dtype=np.float64)).to(from_name(dtype)).double().numpy()


def gelu_np(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def gelu_tanh_np(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_oracle(approximate: str):
    return lambda r, b, o: (F.gelu(r, approximate=approximate), GELU_MAX_SLOPE * b)


_TABLE = (
    EpilogueOp(
        "scale", "x *= scale;",
        torch=lambda x, o: x * o.scale.to(x.dtype),
        numpy=lambda x, o: x * o.scale,
        oracle=lambda r, b, o: (r * o.scale.to(r.dtype), b * o.scale.to(b.dtype).abs()),
        linear=True),
    EpilogueOp(
        "bias_n", "x += {bias}_to_f32(bias[col]);",
        torch=lambda x, o: x + o.bias.to(x.dtype),
        numpy=lambda x, o: x + o.bias,
        oracle=lambda r, b, o: (r + o.bias.to(r.dtype), b + o.bias.to(b.dtype).abs())),
    EpilogueOp(
        "relu", "x = fmaxf(x, 0.f);",
        torch=lambda x, o: torch.relu(x),
        numpy=lambda x, o: np.maximum(x, 0),
        oracle=lambda r, b, o: (torch.relu(r), b)),
    EpilogueOp(
        "gelu", "x = 0.5f * x * (1.f + erff(x * 0.7071067811865476f));",
        torch=lambda x, o: F.gelu(x),
        numpy=lambda x, o: gelu_np(x),
        oracle=_gelu_oracle("none")),
    EpilogueOp(
        "gelu_tanh", "x = 0.5f * x * (1.f + tanhf(0.7978845608028654f * "
                     "(x + 0.044715f * x * x * x)));",
        torch=lambda x, o: F.gelu(x, approximate="tanh"),
        numpy=lambda x, o: gelu_tanh_np(x),
        oracle=_gelu_oracle("tanh")),
    EpilogueOp(
        "round", "x = {low}_to_f32(f32_to_{low}(x));",
        torch=lambda x, o: x.to(from_name(o.dtype)).to(x.dtype),
        numpy=lambda x, o: round_to(x, o.dtype),
        oracle=lambda r, b, o: (r, b),
        rounds=True),
)

OPS: dict[str, EpilogueOp] = {op.name: op for op in _TABLE}
NAMES: tuple[str, ...] = tuple(OPS)
LINEAR: tuple[str, ...] = tuple(op.name for op in _TABLE if op.linear)


def channel_view(bias: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """``bias`` reshaped to broadcast along ``channel_dim`` of an ``ndim``-dimensional output."""
    shape = [1] * ndim
    shape[channel_dim] = -1
    return bias.reshape(shape)


__all__ = ["GELU_MAX_SLOPE", "LINEAR", "NAMES", "OPS", "EpilogueOp", "Operands", "channel_view",
           "gelu_np", "gelu_tanh_np", "round_to"]
