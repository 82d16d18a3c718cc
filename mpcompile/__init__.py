"""mpcompile: compile a PyTorch model into a mixed-precision program (Micikevicius et al. 2018)."""

from .api import MixedPrecisionModule, Program, convert
from .errors import (
    BannedOpError,
    CaptureError,
    MPCompileError,
    PassError,
    PolicyError,
    SignatureError,
    UnknownNodeError,
)
from .inspect import Report
from .policy import DEFAULT_TABLE, Entry, OpClass, Policy

__all__ = [
    "DEFAULT_TABLE",
    "BannedOpError",
    "CaptureError",
    "Entry",
    "MPCompileError",
    "MixedPrecisionModule",
    "OpClass",
    "PassError",
    "Policy",
    "PolicyError",
    "Program",
    "Report",
    "SignatureError",
    "UnknownNodeError",
    "convert",
]
