"""``mpcompile.convert``: model -> ``MixedPrecisionModule`` (capture -> pipeline -> runnable)."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import backends, passes
from .capture import BindingKind, Captured, capture
from .dtypes import dtype_name
from .errors import CaptureError, MPCompileError, PolicyError, SignatureError
from .explain import explain, to_dot, to_png
from .passes import Context
from .policy import Policy
from .report import build_report
from .signature import Signature, TensorSpec


@dataclass
class Program:
    """One compiled graph: a captured signature run through ``passes.FORWARD`` (the
    mixed-precision graph), then ``passes.EXECUTION`` (what runs)."""

    captured: Captured
    stages: dict[str, fx.GraphModule]  # every pass's graph, by name, from "capture" on
    graph_module: fx.GraphModule  # the mixed-precision graph: what reports, explain, export read
    executable: fx.GraphModule  # what runs: the same graph with generated kernels, if any
    policy: Policy
    device_type: str
    example: tuple[tuple, dict]  # the inputs it was captured with (reports re-run them)
    modes: tuple[bool, ...] = ()  # every module's training flag at capture
    runner: backends.Runner | None = None  # runs executable (eager or Inductor); None: eager

    @property
    def execution(self) -> backends.Status:
        """Which backend runs this program, why, and how long compiling took."""
        if self.runner is None:
            return backends.Status("eager", "eager", "requested")
        return self.runner.status

    def context(self, model: torch.nn.Module) -> Context:
        """The pass context this program was compiled with (for further pipelines)."""
        return Context(self.policy, self.device_type, model, self.captured.inputs)

    def output_dtypes(self) -> list[torch.dtype | None]:
        """dtypes of the model's flattened outputs, as captured (the FP32 model's)."""
        outs = self.captured.gm.graph.output_node().args[0]
        return [o.meta["val"].dtype if isinstance(o, fx.Node) and isinstance(
                    o.meta.get("val"), torch.Tensor) else None
                for o, b in zip(outs, self.captured.outputs) if b.kind is BindingKind.OUTPUT]

    def feed(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        out = []
        mutated = self.captured.mutated_buffers
        for b in self.captured.inputs:
            if b.kind is BindingKind.PARAM:
                out.append(_lookup(module, b.target, "_parameters"))
            elif b.kind is BindingKind.BUFFER:
                buf = _lookup(module, b.target, "_buffers")
                # a buffer the graph updates is fed as a copy: autograd may have saved the input
                # (batch norm saves its running stats), and the update is copied in after
                out.append(buf.clone() if b.target in mutated else buf)
            elif b.kind is BindingKind.CONST:
                out.append(b.target)
            else:
                out.append(tensors[b.target])
        return out

    def state_matches(self, module: torch.nn.Module) -> bool:
        """Do ``module``'s parameters and buffers still have the dtypes and devices the graph
        was captured with (``.to()``, ``.half()`` change them), and its submodules the same
        train/eval flags?"""
        if tuple(m.training for m in module.modules()) != self.modes:
            return False
        for b, (dtype, device) in self._state:
            t = _lookup(module, b.target,
                        "_parameters" if b.kind is BindingKind.PARAM else "_buffers")
            if t.dtype != dtype or t.device != device:
                return False
        return True

    @functools.cached_property
    def _state(self) -> list:
        phs = self.captured.gm.graph.find_nodes(op="placeholder")
        return [(b, (n.meta["val"].dtype, n.meta["val"].device))
                for b, n in zip(self.captured.inputs, phs)
                if b.kind in (BindingKind.PARAM, BindingKind.BUFFER)]

    def run(self, module: torch.nn.Module, args: tuple, kwargs: dict,
            gm: fx.GraphModule | None = None) -> Any:
        """Run the graph on ``module``'s parameters and buffers (buffers updated in place, as
        the model's own forward would) and rebuild the model's output structure."""
        outs = (gm or self.runner or self.executable)(*self.feed(module, args, kwargs))
        user = []
        for b, v in zip(self.captured.outputs, outs):
            if b.kind is BindingKind.BUFFER:
                with torch.no_grad():
                    module.get_buffer(b.target).copy_(v)
            else:
                user.append(v)
        return self.captured.out_spec.unflatten(user)


def _check_input_dtypes(known: Program, sig: Signature, module: torch.nn.Module) -> None:
    """A float input in another float dtype than captured, on an unchanged model, is a mistake
    (a float64 batch to a float32 model fails deep inside the graph): say so before running."""
    old = known.captured.signature
    if old.structure != sig.structure or not known.state_matches(module):
        return
    for name, a, b in zip(sig.names, old.leaves, sig.leaves):
        if (isinstance(a, TensorSpec) and isinstance(b, TensorSpec) and a.dtype != b.dtype
                and a.dtype.is_floating_point):
            raise SignatureError(
                f"{name} is {dtype_name(b.dtype)}, but {type(module.original).__name__} was "
                f"captured with {dtype_name(a.dtype)} there and its parameters have not "
                f"changed: cast the input (e.g. .to({a.dtype})), or move the model to that "
                "dtype first")


def _lookup(module: torch.nn.Module, fqn: str, where: str) -> torch.Tensor:
    """``module.get_parameter``/``get_buffer`` without the checks: this runs on every call."""
    *path, name = fqn.split(".")
    for part in path:
        module = module._modules[part]
    return getattr(module, where)[name]


def _device_type(model: torch.nn.Module, args: tuple, kwargs: dict) -> str:
    for t in (*model.parameters(), *model.buffers(),
              *[x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]):
        if t.is_floating_point():
            return t.device.type
    return "cpu"


def compile_program(model: torch.nn.Module, args: tuple, kwargs: dict,
                    policy: Policy, backend: str | None = "eager", direct: bool = False,
                    label: str | None = None) -> Program:
    """Capture ``model`` on these inputs and run the pipeline; ``backend`` runs the result
    (None: a program that is only read, e.g. the forward of a training step). ``direct`` and
    ``label``: see :class:`backends.Runner` (``label`` names the graph in its warning)."""
    captured = capture(model, args, kwargs, keep_whole=policy.keep_whole())
    device_type = _device_type(model, args, kwargs)
    ctx = Context(policy, device_type, model, captured.inputs)
    fwd = passes.run(passes.FORWARD, captured.gm, ctx, first="capture")
    run = passes.run(passes.EXECUTION, fwd.gm, fwd.ctx, graphs=fwd.graphs)
    runner = None if backend is None else backends.Runner(
        run.gm, backend, device_type, label or f"the forward of {type(model).__name__}",
        direct=direct)
    return Program(captured, run.graphs, fwd.gm, run.gm, policy, device_type,
                   (tuple(args), dict(kwargs)), tuple(m.training for m in model.modules()),
                   runner)


def split_inputs(inputs: Any, kwargs: dict | None = None) -> tuple[tuple, dict]:
    """The one input convention of ``convert``, ``compile_train_step`` and ``TrainStep``:
    a tensor, a tuple/list of positional inputs, a dict of keyword inputs (a Hugging Face
    batch), or ``(args_tuple, kwargs_dict)``; ``kwargs`` adds keyword inputs."""
    if isinstance(inputs, dict):
        args, kw = (), dict(inputs)
    elif (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], (tuple, list))
          and isinstance(inputs[1], dict)):
        args, kw = tuple(inputs[0]), dict(inputs[1])
    else:
        args, kw = as_args(inputs), {}
    for k, v in (kwargs or {}).items():
        if k in kw:
            raise SignatureError(f"keyword input {k!r} is given twice")
        kw[k] = v
    return args, kw


def tensor_leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among the inputs, in the order the captured graph takes them."""
    return [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]


def as_args(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


class MixedPrecisionModule(torch.nn.Module):
    """A model compiled to mixed precision. See :func:`convert`.

    It shares the original model's parameters, buffers and submodules (same names, same
    tensors): ``parameters()`` and ``state_dict()`` are the FP32 master weights, so any
    ``torch.optim`` optimizer and ``torch.amp.GradScaler`` train it unchanged, and a state dict
    saved from it loads into the original model. Calling it runs the rewritten graph; the casts
    in the graph carry gradients back to the FP32 masters. The model's own ``forward`` and its
    forward hooks are not called.
    """

    def __init__(self, model: torch.nn.Module, policy: Policy, recapture: bool = True,
                 cache_size: int = 8, backend: str = "auto", direct: bool = False,
                 label: str | None = None):
        super().__init__()
        # share, don't copy: the same tensors under the same names
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._modules = model._modules
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        object.__setattr__(self, "_original", model)
        object.__setattr__(self, "_policy", policy)
        object.__setattr__(self, "_recapture", recapture)
        object.__setattr__(self, "_cache_size", cache_size)
        object.__setattr__(self, "_backend", backends.check_backend(backend))
        object.__setattr__(self, "_direct", direct)  # see backends.Runner
        object.__setattr__(self, "_label", label)
        object.__setattr__(self, "_programs", OrderedDict())
        object.__setattr__(self, "_last", None)
        object.__setattr__(self, "_lock", threading.RLock())  # one recapture at a time
        self.training = model.training

    # -- nn.Module behaviour ----------------------------------------------------------------

    def _get_name(self) -> str:
        return f"MixedPrecision[{type(self._original).__name__}, " \
               f"{dtype_name(self._policy.dtype)}]"

    def train(self, mode: bool = True) -> MixedPrecisionModule:
        super().train(mode)
        self._original.training = mode
        return self

    def forward(self, *args, **kwargs):
        program = self.program_for(args, kwargs)
        object.__setattr__(self, "_last", program)
        return program.run(self, args, kwargs)

    # -- compilation cache ------------------------------------------------------------------

    def program_for(self, args: tuple, kwargs: dict | None = None) -> Program:
        """The program for these inputs in the module's current train/eval mode: the cached one,
        or a new capture (subject to ``recapture``)."""
        kwargs = dict(kwargs or {})
        with self._lock:
            return self._program_locked(args, kwargs)

    def _program_locked(self, args: tuple, kwargs: dict) -> Program:
        sig = Signature.of(args, kwargs, self.training)
        programs: OrderedDict = self._programs
        program = programs.get(sig)
        if program is not None and program.state_matches(self):
            programs.move_to_end(sig)
            return program
        if programs and program is None:
            _check_input_dtypes(programs[next(reversed(programs))], sig, self)
        if programs and program is None and not self._recapture:
            known = next(reversed(programs))
            raise SignatureError(
                f"{type(self._original).__name__} was captured for other inputs: "
                f"{known.mismatch(sig)}. Call it with inputs like the example, or convert with "
                "recapture=True to compile one graph per input signature."
            )
        try:  # a new signature, or parameters moved to another dtype/device: capture again
            program = compile_program(self._original, args, kwargs, self._policy,
                                      self._backend, self._direct, self._label)
        except CaptureError as e:
            if programs:
                known = next(reversed(programs))
                raise SignatureError(
                    f"{type(self._original).__name__} got new inputs ({known.mismatch(sig)}) "
                    f"and recapturing for them failed:\n{e}"
                ) from e
            raise
        programs[sig] = program
        programs.move_to_end(sig)
        while len(programs) > self._cache_size:
            programs.popitem(last=False)
        return program

    # -- inspection --------------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def original(self) -> torch.nn.Module:
        return self._original

    @property
    def program(self) -> Program:
        """The most recently used compiled program."""
        if self._last is None:
            if not self._programs:
                raise MPCompileError(
                    "nothing is compiled yet: call the module once, or convert with "
                    "example_inputs"
                )
            return next(reversed(self._programs.values()))
        return self._last

    @property
    def programs(self) -> list[Program]:
        return list(self._programs.values())

    @property
    def graph_module(self) -> fx.GraphModule:
        """The mixed-precision fx graph (of the most recent input signature)."""
        return self.program.graph_module

    @property
    def executable(self) -> fx.GraphModule:
        """The graph that runs: ``graph_module`` after ``passes.EXECUTION`` (generated kernels
        where ``Policy.kernels`` allows them)."""
        return self.program.executable

    @property
    def execution(self) -> backends.Status:
        """Which backend runs the program (of the most recent input signature), why, and how
        long compiling took."""
        return self.program.execution

    @property
    def stages(self) -> dict[str, fx.GraphModule]:
        """The graph after each pass: capture, classify, assign, casts, cleanup, kernels."""
        return dict(self.program.stages)

    def report(self, measure: bool = True):
        """Precision and cast statistics; see :class:`mpcompile.report.Report`."""
        return build_report(self.program, self._original, measure_calls=measure)

    def explain(self, node: str | fx.Node) -> str:
        """Why ``node`` (a node name in :attr:`graph_module`) runs in the precision it does."""
        return explain(self.program, node)

    def to_dot(self, path: str | None = None, stage: str | None = None) -> str:
        """The graph as Graphviz DOT coloured by precision; with ``path``, also write it there
        (and an SVG beside it when Graphviz ``dot`` is installed)."""
        return to_dot(self.program, path=path, stage=stage)

    def to_png(self, path: str, stage: str | None = None):
        """The graph drawn as a PNG coloured by precision (matplotlib, no Graphviz needed);
        returns the path."""
        return to_png(self.program, path, stage=stage)


def convert(model: torch.nn.Module, example_inputs: Any = None, *,
            dtype: torch.dtype | None = None, policy: Policy | None = None,
            example_kwargs: dict | None = None, recapture: bool = True,
            cache_size: int = 8, backend: str = "auto") -> MixedPrecisionModule:
    """Compile ``model`` to mixed precision.

    Args:
        model: any ``nn.Module`` torch.export can trace (no data-dependent Python branches).
        example_inputs: a tensor, a tuple of positional inputs, a dict of keyword inputs, or
            ``(args, kwargs)``; with them the model is captured now (errors surface here),
            without them on the first call.
        dtype: the low precision (default ``torch.float16``; ``torch.bfloat16``). Shorthand for
            ``policy=Policy(dtype=...)``.
        policy: a :class:`Policy` (op overrides, FP32 module pins, strategy).
        example_kwargs: keyword inputs to capture with.
        recapture: capture again when called with a new input signature (shape, dtype, device,
            train/eval); if False such a call raises :class:`SignatureError`.
        cache_size: how many compiled signatures to keep (least recently used dropped).
        backend: how the program runs: ``"inductor"`` (``torch.compile``'s compiler, forward
            and backward), ``"eager"`` (op by op: what ``report(measure=True)`` counts), or
            ``"auto"`` (default: Inductor where it can run on the device, else eager). If
            Inductor fails on a graph, that graph runs eagerly with one logged warning.
    """
    if isinstance(model, MixedPrecisionModule):
        raise MPCompileError("this model is already converted; convert the original model")
    if not isinstance(model, torch.nn.Module):
        raise MPCompileError(f"convert() takes an nn.Module, got {type(model).__name__}")
    if policy is None:
        policy = Policy(dtype=dtype if dtype is not None else torch.float16)
    elif dtype is not None and dtype != policy.dtype:
        raise PolicyError(
            f"convert(dtype={dtype}) conflicts with policy.dtype={policy.dtype}: give one"
        )
    policy.check_pins(model)
    mp = MixedPrecisionModule(model, policy, recapture=recapture, cache_size=cache_size,
                              backend=backend)
    if example_inputs is not None or example_kwargs:
        mp.program_for(*split_inputs(example_inputs, example_kwargs))
    return mp
