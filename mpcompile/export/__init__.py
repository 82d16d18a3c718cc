"""ONNX export of forward graphs and whole training steps, and training with them in
onnxruntime."""

from .onnx_export import export_graph, export_onnx, metadata
from .trainer import OrtStepResult, OrtTrainer

__all__ = ["OrtStepResult", "OrtTrainer", "export_graph", "export_onnx", "metadata"]
