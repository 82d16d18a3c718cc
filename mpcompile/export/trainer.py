"""``OrtTrainer``: train with an exported training step in onnxruntime."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..api import as_args, split_inputs, tensor_leaves
from ..errors import ExportError
from .compat import bf16_io_as_float32, emulate_bf16_on_cpu, has_bf16
from .onnx_export import metadata


@dataclass(frozen=True)
class OrtStepResult:
    loss: float
    loss_scale: float
    skipped: bool
    grad_norm: float | None = None


class OrtTrainer:
    """Loads a training step written by ``export_onnx(train_step, path)`` and trains with it.

    The state (masters, working copies, optimizer state, loss scale, counters, buffers) starts
    from the values stored in the file and is kept here between calls; each :meth:`step` feeds it
    with the batch and the learning rates and keeps what comes back.

    Args:
        path: the ``.onnx`` file (or a ModelProto).
        providers: onnxruntime providers; default CUDA first when available, else CPU. BF16
            models cross the Python boundary as float32 (exact) and, on the CPU provider, run
            their arithmetic in float32 with bfloat16 rounding (see ``export/compat.py``).
    """

    def __init__(self, path: str | Path | onnx.ModelProto, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        model = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path))
        meta = metadata(model)
        if meta.get("kind") != "train_step":
            raise ExportError("OrtTrainer needs an exported TrainStep, not a forward model")
        self.meta = meta
        # dtypes as written, before the bfloat16 compatibility rewrites below change them
        original = {t.name: t.data_type for t in model.graph.initializer}
        if providers is None:
            avail = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in avail]
        self.providers = list(providers)
        self.bf16 = has_bf16(model)
        if self.bf16:
            cpu_only = self.providers == ["CPUExecutionProvider"]
            model = emulate_bf16_on_cpu(model) if cpu_only else bf16_io_as_float32(model)
        self._low_state = {}  # state names held as float32 but bfloat16 in the graph
        inits = {t.name: t for t in model.graph.initializer}
        self._state: dict[str, np.ndarray] = {}
        for name in meta["state"] + meta["lrs"]:
            self._state[name] = onnx.numpy_helper.to_array(inits[name]).copy()
        for name in meta["state"]:
            if original.get(name) == onnx.TensorProto.BFLOAT16:
                self._low_state[name] = torch.bfloat16
        so = ort.SessionOptions()
        so.log_severity_level = 3  # state inputs have default initializers: ORT warns per input
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                            providers=self.providers)
        self._outputs = [o.name for o in self.session.get_outputs()]

    def set_lr(self, lr: float | Sequence[float]) -> None:
        lrs = self.meta["lrs"]
        values = [lr] * len(lrs) if isinstance(lr, (int, float)) else list(lr)
        if len(values) != len(lrs):
            raise ExportError(f"set_lr: give one lr or {len(lrs)}")
        for name, v in zip(lrs, values):
            self._state[name] = np.array(v, dtype=np.float64)

    def step(self, inputs: Any, targets: Any = None) -> OrtStepResult:
        """One step: inputs and targets as for ``TrainStep.step`` (a tensor, a tuple, a dict of
        keyword inputs; targets for the loss function, if the step has one)."""
        batch = [*tensor_leaves(*split_inputs(inputs)), *as_args(targets)]
        names = self.meta["batch"]
        if len(batch) != len(names):
            raise ExportError(f"step: expected {len(names)} batch tensors ({names}), got "
                              f"{len(batch)}")
        feeds = dict(self._state)
        for name, t in zip(names, batch):
            feeds[name] = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
        outs = dict(zip(self._outputs, self.session.run(None, feeds)))
        for name in self.meta["state"]:
            self._state[name] = outs[f"next.{name}"]
        return OrtStepResult(float(outs["loss"]), float(outs["loss_scale"]),
                             bool(outs["skipped"]),
                             float(outs["grad_norm"]) if "grad_norm" in outs else None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every piece of state by name, as torch tensors in their graph dtypes."""
        out = {}
        for name in self.meta["state"]:
            t = torch.from_numpy(np.array(self._state[name]))
            out[name] = t.to(self._low_state[name]) if name in self._low_state else t
        return out

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The FP32 masters and buffers under the model's own names: ready for
        ``model.load_state_dict``."""
        state = self.state_dict()
        out = {fqn: state[key] for fqn, key in self.meta["masters"].items()}
        for fqn, key in self.meta["working"].items():
            out.setdefault(fqn, state[key].to(torch.float32))
        out.update({fqn: state[key] for fqn, key in self.meta["buffers"].items()})
        return out
