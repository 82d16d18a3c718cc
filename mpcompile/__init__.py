"""mpcompile: compile a PyTorch model into a mixed-precision program (Micikevicius et al. 2018)."""

from . import optim
from .api import MixedPrecisionModule, Program, convert
from .errors import (
    BannedOpError,
    CaptureError,
    ExportError,
    MPCompileError,
    PassError,
    PolicyError,
    SignatureError,
    TrainStepError,
    UnknownNodeError,
)
from .export import OrtTrainer, export_onnx
from .report import Report
from .policy import DEFAULT_TABLE, Entry, OpClass, Policy
from .scaling import DynamicLossScale
from .train import StepResult, TrainReport, TrainStep, compile_train_step

__all__ = [
    "DEFAULT_TABLE",
    "DynamicLossScale",
    "BannedOpError",
    "CaptureError",
    "Entry",
    "ExportError",
    "MPCompileError",
    "MixedPrecisionModule",
    "OpClass",
    "OrtTrainer",
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
    "export_onnx",
    "optim",
]
