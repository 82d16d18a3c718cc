"""Numerics tools: the FP32 profiler (what FP16/BF16 at a loss scale would do to a step's
values) and overflow localisation (the first node of a step that produces inf/NaN)."""

from .localize import Overflow, TensorInfo, describe, localize_overflow
from .profile import (
    FORMATS,
    KINDS,
    LOG2_MAX,
    LOG2_MIN,
    NumericsProfile,
    ProfileError,
    ScaleRange,
    TensorStats,
    profile,
)

__all__ = [
    "FORMATS",
    "KINDS",
    "LOG2_MAX",
    "LOG2_MIN",
    "NumericsProfile",
    "Overflow",
    "ProfileError",
    "ScaleRange",
    "TensorInfo",
    "TensorStats",
    "describe",
    "localize_overflow",
    "profile",
]
