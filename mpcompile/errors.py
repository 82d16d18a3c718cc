"""Every error mpcompile raises on purpose.

Each message names what is at fault (node, op, module, argument) and says what to do. All derive
from :class:`MPCompileError`, so ``except mpcompile.MPCompileError`` catches them all.
"""

from __future__ import annotations


class MPCompileError(Exception):
    """Base class of mpcompile's errors."""


class PolicyError(MPCompileError, ValueError):
    """A policy entry is unknown, not an ATen overload, or conflicts with another entry."""


class CaptureError(MPCompileError):
    """The model could not be turned into a functional ATen graph (e.g. data-dependent control
    flow, an in-place mutation of an input, an output type that holds tensors but cannot be
    flattened)."""


class SignatureError(MPCompileError, TypeError):
    """A call's inputs do not match any captured signature and cannot be recaptured."""


class BannedOpError(MPCompileError):
    """The model uses an op the policy bans in low precision."""


class PassError(MPCompileError):
    """A compiler stage broke an invariant (a bug in mpcompile or in a user-supplied policy):
    the message names the stage and the node."""


class UnknownNodeError(MPCompileError, KeyError):
    """``explain()`` was asked about a node name the graph does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class TrainStepError(MPCompileError):
    """A training step cannot be compiled as asked (unsupported optimizer or option, a loss that
    is not a scalar, ...)."""


class ExportError(MPCompileError):
    """A graph cannot be written as standard ONNX (an op without a correct translation), the
    file cannot be written or read (the message names the path), or a batch does not fit an
    exported step (names the input, expected and given dtype/shape)."""


class KernelError(MPCompileError):
    """A generated kernel cannot be specified, compiled, disassembled or launched as asked."""


class CheckpointError(MPCompileError):
    """A training-step checkpoint cannot be written, or the file is not one this step can load
    (missing, empty, truncated, corrupted, not an mpcompile checkpoint, another model's): the
    message names the file and what is wrong; the step is left unchanged."""
