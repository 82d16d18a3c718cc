"""mpcompile: compile a PyTorch model into a mixed-precision program (Micikevicius et al. 2018).

``export_onnx``, ``export_graph`` and ``OrtTrainer`` need the ``[onnx]`` extra; they are imported
on first use, so ``convert`` and ``compile_train_step`` work without onnx installed.
"""

from . import optim
from .api import MixedPrecisionModule, Program, convert
from .errors import (
    BannedOpError,
    CaptureError,
    CheckpointError,
    ExportError,
    KernelError,
    MPCompileError,
    PassError,
    PolicyError,
    SignatureError,
    TrainStepError,
    UnknownNodeError,
)
from .numerics import NumericsProfile, Overflow, localize_overflow, profile
from .policy import DEFAULT_TABLE, Entry, OpClass, Policy
from .report import Report
from .scaling import DynamicLossScale
from .train import StepResult, TrainReport, TrainStep, compile_train_step

_ONNX = ("OrtTrainer", "export_graph", "export_onnx")


def __getattr__(name: str):
    if name in _ONNX:
        try:
            from . import export
        except ImportError as e:
            raise ImportError(
                f"mpcompile.{name} needs onnx, onnxscript and onnxruntime: "
                "pip install 'mpcompile[onnx]'"
            ) from e
        return getattr(export, name)
    raise AttributeError(f"module 'mpcompile' has no attribute {name!r}")


__all__ = [
    "DEFAULT_TABLE",
    "BannedOpError",
    "CaptureError",
    "CheckpointError",
    "DynamicLossScale",
    "Entry",
    "ExportError",
    "KernelError",
    "MPCompileError",
    "MixedPrecisionModule",
    "NumericsProfile",
    "OpClass",
    "OrtTrainer",
    "Overflow",
    "PassError",
    "Policy",
    "PolicyError",
    "Program",
    "Report",
    "SignatureError",
    "StepResult",
    "TrainReport",
    "TrainStep",
    "TrainStepError",
    "UnknownNodeError",
    "compile_train_step",
    "convert",
    "export_graph",
    "export_onnx",
    "localize_overflow",
    "optim",
    "profile",
]
