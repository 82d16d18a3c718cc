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

        model, self.source = _load(path)
        self.meta = meta = _train_step_meta(model, self.source)
        # dtypes as written, before the bfloat16 compatibility rewrites below change them
        original = {t.name: t.data_type for t in model.graph.initializer}
        self._bf16_faces = {vi.name for vi in model.graph.input  # float32 in the session
                            if vi.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16}
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
        inits = _check_names(model, meta, self.source)
        self._state: dict[str, np.ndarray] = {}
        for name in meta["state"] + meta["lrs"]:
            self._state[name] = onnx.numpy_helper.to_array(inits[name]).copy()
        self._batch_spec = _input_specs(model, meta["batch"])
        for name in meta["state"]:
            if original.get(name) == onnx.TensorProto.BFLOAT16:
                self._low_state[name] = torch.bfloat16
        so = ort.SessionOptions()
        so.log_severity_level = 3  # state inputs have default initializers: ORT warns per input
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                                providers=self.providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types, all of them
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"OrtTrainer: onnxruntime cannot load {self.source} "
                              f"({first[:300]})") from e
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
        feeds = dict(self._state)
        feeds.update(self._batch_feeds(batch))
        outs = dict(zip(self._outputs, self.session.run(None, feeds)))
        for name in self.meta["state"]:
            self._state[name] = outs[f"next.{name}"]
        return OrtStepResult(float(outs["loss"]), float(outs["loss_scale"]),
                             bool(outs["skipped"]),
                             float(outs["grad_norm"]) if "grad_norm" in outs else None)

    def _batch_feeds(self, batch: list) -> dict[str, np.ndarray]:
        """The batch as onnxruntime's feeds, checked against the graph's inputs first: a wrong
        count, shape or dtype is an ExportError naming the input, not onnxruntime's error."""
        spec = self._batch_spec
        if len(batch) != len(spec):
            want = ", ".join(f"{n} {_fmt(*s)}" for n, s in spec.items())
            raise ExportError(f"OrtTrainer.step: expected {len(spec)} batch tensors ({want}), got "
                              f"{len(batch)}; pass the inputs and targets the step was compiled "
                              "with")
        feeds = {}
        for i, ((name, (dtype, shape)), t) in enumerate(zip(spec.items(), batch)):
            given = _as_array(t, widen_bf16=name in self._bf16_faces)
            if given is None or given.dtype != dtype or not _shape_ok(given.shape, shape):
                got = (_fmt(t.dtype, tuple(t.shape)) if isinstance(t, (torch.Tensor, np.ndarray))
                       else type(t).__name__)
                raise ExportError(f"OrtTrainer.step: batch tensor {i} ('{name}') must be "
                                  f"{_fmt(dtype, shape)}, got {got}")
            feeds[name] = given
        return feeds

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


def _load(path: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The model and how to name it in errors; a file that is not an ONNX model is an
    ExportError naming it, not protobuf's or the OS's error."""
    if isinstance(path, onnx.ModelProto):
        return path, "the given ModelProto"
    source = repr(str(path))
    if Path(path).is_dir():
        raise ExportError(f"OrtTrainer: {source} is a directory, not an .onnx file")
    try:
        return onnx.load(str(path)), source
    except FileNotFoundError as e:
        raise ExportError(f"OrtTrainer: {source} does not exist; give the path "
                          "export_onnx(train_step, path) wrote") from e
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, OSError, onnx's own errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"OrtTrainer: cannot read {source} as an ONNX model ({first[:200]}): "
                          "the file is truncated or not an ONNX file; export the step again") from e


def _train_step_meta(model: onnx.ModelProto, source: str) -> dict:
    try:
        meta = metadata(model)
    except (ExportError, ValueError) as e:  # ValueError: the metadata is not JSON
        raise ExportError(f"OrtTrainer: {source} is not a training step written by mpcompile's "
                          "export_onnx(train_step, path) (no readable 'mpcompile' metadata; "
                          "truncated, or another tool's model)") from e
    if meta.get("kind") != "train_step":
        raise ExportError(f"OrtTrainer: {source} is an exported forward model; OrtTrainer needs "
                          "an exported TrainStep (export_onnx(compile_train_step(...), path))")
    if not all(isinstance(meta.get(k), list) for k in ("state", "lrs", "batch")):
        raise ExportError(f"OrtTrainer: {source} is damaged: its 'mpcompile' metadata lacks "
                          "the state, lrs or batch lists; export the step again")
    return meta


def _check_names(model: onnx.ModelProto, meta: dict, source: str) -> dict[str, onnx.TensorProto]:
    """The initializers by name, once every name the metadata lists is in the graph."""
    inits = {t.name: t for t in model.graph.initializer}
    inputs = {vi.name for vi in model.graph.input}
    missing = [n for n in meta["state"] + meta["lrs"] if n not in inits]
    missing += [n for n in meta["batch"] if n not in inputs]
    if missing:
        raise ExportError(f"OrtTrainer: {source} is damaged: its metadata names inputs the "
                          f"graph does not have ({', '.join(missing[:5])}); export the step again")
    return inits


def _input_specs(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple]:
    """name -> (numpy dtype, shape with None for a symbolic dimension), as the session (built
    from this model) expects them."""
    inputs = {vi.name: vi.type.tensor_type for vi in model.graph.input}
    out = {}
    for name in names:
        tt = inputs[name]
        dims = (tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
                if tt.HasField("shape") else None)  # None: any shape
        out[name] = (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims)
    return out


def _as_array(t: Any, widen_bf16: bool) -> np.ndarray | None:
    """``t`` as a numpy array without changing its dtype (None if it cannot be one); with
    ``widen_bf16`` (a bfloat16 graph input, float32 in the session) a bfloat16 tensor is widened
    to float32, exactly."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16 and widen_bf16:
            t = t.float()
        try:
            return t.numpy()
        except TypeError:  # a dtype numpy lacks
            return None
    try:
        return np.asarray(t)  # a numpy array, or a Python number or list
    except (TypeError, ValueError):
        return None


def _shape_ok(given: tuple, want: tuple | None) -> bool:
    if want is None:
        return True
    return len(given) == len(want) and all(w is None or g == w for g, w in zip(given, want))


def _fmt(dtype: Any, shape: tuple | None) -> str:
    """``float32[8, 3, 16, 16]``; ``?`` a dimension of any size, ``[...]`` any shape."""
    name = str(dtype).replace("torch.", "")
    if shape is None:
        return f"{name}[...]"
    return f"{name}[{', '.join('?' if d is None else str(d) for d in shape)}]"
