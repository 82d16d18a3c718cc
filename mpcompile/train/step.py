"""``TrainStep``: runs a compiled training step and holds its state between calls."""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .. import backends, optim, scaling
from ..api import Program, as_args, split_inputs, tensor_leaves
from ..dtypes import dtype_name
from ..errors import SignatureError, TrainStepError
from ..explain import explain_node
from ..policy import Policy
from ..report import build_report
from ..signature import Signature, TensorSpec
from . import checkpoint, distributed
from .distributed import DataParallel, ShardPlan
from .layout import StateKind, StateLayout, key, outputs
from .report import build_train_report


@dataclass(frozen=True)
class StepResult:
    """What one step reports, as device tensors (read them when you choose: no sync here)."""

    loss: torch.Tensor  # the unscaled loss
    loss_scale: torch.Tensor  # the scale the next step will use
    skipped: torch.Tensor  # bool: gradients were not finite, nothing was updated
    grad_norm: torch.Tensor | None = None  # total norm of the unscaled gradients (clipping only)
    min_scale: float | None = None  # the dynamic scale's floor, if it has one
    # grad_stats=True only: per param group, int64 vectors
    grad_zeros: torch.Tensor | None = None  # gradient elements that are exactly zero
    grad_nonfinite: torch.Tensor | None = None  # gradient elements that are inf or NaN
    grad_numel: tuple[int, ...] | None = None  # trainable elements per group

    @property
    def zero_fraction(self) -> torch.Tensor | None:
        """Per param group, the fraction of gradient elements that are zero (FP32 device
        tensor; grad_stats=True only). A fraction near 1 on a clean step: the gradients
        underflowed (raise the loss scale), or nothing reaches those parameters."""
        if self.grad_zeros is None:
            return None
        numel = torch.tensor(self.grad_numel, dtype=torch.float32,
                             device=self.grad_zeros.device)
        return self.grad_zeros.to(torch.float32) / numel.clamp(min=1)

    @property
    def at_min_scale(self) -> torch.Tensor:
        """bool: the scale sits at its floor (a device tensor; no sync until read). With every
        step skipped there, the batches themselves are not finite."""
        if self.min_scale is None:
            return torch.zeros((), dtype=torch.bool, device=self.loss_scale.device)
        return self.loss_scale <= self.min_scale


def batch_key(args: tuple, kwargs: dict, targets: tuple) -> tuple:
    """What a batch must match, cheap to build on every step (no leaf names)."""
    return (Signature.of(args, kwargs, True),
            tuple(TensorSpec(tuple(t.shape), t.dtype, t.device) for t in targets))


def batch_signature(args: tuple, kwargs: dict, targets: tuple) -> tuple:
    """(where, TensorSpec or ("value", repr)) for every leaf of the inputs and targets."""
    sig = Signature.of(args, kwargs, True)
    names = [n.replace("args[", "inputs[", 1) if n.startswith("args[") else n
             for n in sig.names]
    return (*zip(names, sig.leaves),
            *((f"targets[{i}]", Signature.of((t,), {}, True).leaves[0])
              for i, t in enumerate(targets)))


def _batch_mismatch(want: tuple, got: tuple) -> str:
    if [k for k, _ in want] != [k for k, _ in got]:
        return (f"it has {', '.join(k for k, _ in got) or 'nothing'}, the example had "
                f"{', '.join(k for k, _ in want)}")
    for (k, a), (_, b) in zip(want, got):
        if a != b:
            fmt = lambda x: str(x) if isinstance(x, TensorSpec) else x[1]  # noqa: E731
            return f"{k} is {fmt(b)}, compiled for {fmt(a)}"
    return "no difference"


@dataclass(frozen=True)
class CompiledStep:
    """What :func:`compile_train_step` built: the graphs and everything fixed at compile time."""

    forward: Program  # the forward as ``convert`` compiles it (the report describes it)
    stages: dict[str, fx.GraphModule]  # every pass's graph, forward stages then the step's
    graph_module: fx.GraphModule  # the step graph: mixed precision, before kernels
    executable: fx.GraphModule  # what runs: kernels where Policy.kernels allows, state in place
    layout: StateLayout
    plan: optim.Plan
    loss_scale: scaling.LossScale
    policy: Policy
    master_weights: bool
    max_grad_norm: float | None
    batch_signature: tuple
    input_names: tuple[str, ...]  # per graph input: state, lr<i>, input<i>, target<i>, const<i>
    n_model_inputs: int  # how many batch tensors the model takes (the rest are targets)
    constants: tuple[torch.Tensor, ...] = ()  # the model's tensor constants: the last inputs
    batch_key: tuple = ()  # batch_key() of the example: what step() compares
    backend: str = "auto"  # the requested execution backend (backends.BACKENDS)
    data_parallel: DataParallel | None = None  # the ranks it averages over; None: one process
    shards: ShardPlan | None = None  # sharded FP32 state (ZeRO-1); None: replicated
    grad_numel: tuple[int, ...] | None = None  # grad_stats=True: trainable elements per group

    @property
    def output_names(self) -> tuple[str, ...]:
        return (*(f"next.{n}" for n in self.layout.names), *self.extra_outputs)

    @property
    def extra_outputs(self) -> tuple[str, ...]:
        """What the step graph returns after the new state (``layout.OUTPUTS``, in order)."""
        return outputs(self.max_grad_norm is not None, self.grad_numel is not None)


class TrainStep:
    """A compiled mixed-precision training step. See :func:`compile_train_step`."""

    def __init__(self, model: torch.nn.Module, compiled: CompiledStep,
                 state: Sequence[torch.Tensor], lr_source: torch.optim.Optimizer | None = None):
        self._model = model
        self._compiled = compiled
        self._state: list[torch.Tensor] = list(state)  # contiguous (layout.build)
        self._runner = backends.Runner(compiled.executable, compiled.backend,
                                       self._state[0].device.type, "the training step",
                                       direct=True)
        self._lr_source = lr_source
        self._lr_override: list[float] | None = None
        self.warn_after_skips = 100  # consecutive skipped steps before a warning (0: never)
        self._recent_skips: list[torch.Tensor] = []
        self._skip_run = 0  # skipped steps in a row up to the last window read
        self._scale_in: torch.Tensor | None = None  # the scale the last step ran at

    # -- what was compiled ---------------------------------------------------------------------

    @property
    def compiled(self) -> CompiledStep:
        return self._compiled

    layout = property(lambda self: self._compiled.layout, doc="the state's names and order")
    plan = property(lambda self: self._compiled.plan, doc="optimizer groups and their specs")
    policy = property(lambda self: self._compiled.policy)
    dtype = property(lambda self: self._compiled.policy.dtype, doc="the low precision")
    loss_scale_config = property(lambda self: self._compiled.loss_scale)
    master_weights = property(lambda self: self._compiled.master_weights)
    max_grad_norm = property(lambda self: self._compiled.max_grad_norm)
    graph_module = property(lambda self: self._compiled.graph_module,
                            doc="the step graph (mixed precision, before kernels)")
    executable = property(lambda self: self._compiled.executable,
                          doc="the graph that runs: stores the new state into its state inputs "
                              "and returns loss, loss_scale, skipped (and grad_norm)")
    execution = property(lambda self: self._runner.status,
                         doc="which backend runs the step, why, and its compile time")
    stages = property(lambda self: dict(self._compiled.stages), doc="every pass's graph")
    data_parallel = property(lambda self: self._compiled.data_parallel,
                             doc="the ranks the step averages gradients over (a "
                                 "DataParallel: group, rank, world_size), or None")
    shards = property(lambda self: self._compiled.shards,
                      doc="how the FP32 state is sharded across the ranks (a ShardPlan: "
                          "buckets per optimizer group), or None when it is replicated")
    input_names = property(lambda self: self._compiled.input_names,
                           doc="one name per graph input: state, lr<i>, input<i>, target<i>")
    output_names = property(lambda self: self._compiled.output_names,
                            doc="next.<state> per state entry, then loss, loss_scale, skipped "
                                "(and grad_norm with clipping)")
    n_model_inputs = property(lambda self: self._compiled.n_model_inputs)
    ties = property(lambda self: dict(self._compiled.forward.captured.ties),
                    doc="tied parameters: the name that holds the state -> its other names")

    def aliases(self) -> dict[str, str]:
        """State names under a tied parameter's other names -> the state name that holds it
        (``master.head.weight`` -> ``master.emb.weight``)."""
        out = {}
        for first, others in self.ties.items():
            for kind in (StateKind.MASTER, StateKind.WORKING):
                if key(kind, first) in self.layout:
                    out.update({key(kind, o): key(kind, first) for o in others})
        return out

    @property
    def state(self) -> tuple[torch.Tensor, ...]:
        """The current state tensors, in ``layout`` order (the step's first inputs)."""
        return tuple(self._state)

    def example_args(self) -> list[torch.Tensor]:
        """One argument per graph input: the current state, the learning rates (float64 0-dim),
        zeros shaped like the example batch, and the model's tensor constants."""
        dev = self._state[0].device
        lrs = [torch.tensor(x, dtype=torch.float64, device=dev) for x in self.learning_rates()]
        batch = [torch.zeros(s.shape, dtype=s.dtype, device=s.device)
                 for _, s in self._compiled.batch_signature if isinstance(s, TensorSpec)]
        return [*self._state, *lrs, *batch, *self._compiled.constants]

    # -- running ---------------------------------------------------------------------------

    def learning_rates(self) -> list[float]:
        """The per-group learning rates the next step uses: ``set_lr``'s, else the passed torch
        optimizer's (so its LR schedulers work), else the spec's."""
        if self._lr_override is not None:
            return list(self._lr_override)
        if self._lr_source is not None:
            lrs = [float(g["lr"]) for g in self._lr_source.param_groups]
            bad = [(i, x) for i, x in enumerate(lrs) if not (math.isfinite(x) and x >= 0)]
            if bad:
                raise TrainStepError(
                    f"the optimizer's param group {bad[0][0]} has lr {bad[0][1]}: a learning "
                    "rate must be finite and non-negative (check the LR scheduler); nothing was "
                    "changed")
            return lrs
        return [g.lr for g in self.plan.groups]

    def set_lr(self, lr: float | Sequence[float]) -> None:
        """Set the learning rate (one value for all param groups, or one per group); no
        recompilation: the learning rate is a graph input."""
        n = len(self.plan.groups)
        lrs = [float(lr)] * n if isinstance(lr, (int, float)) else [float(x) for x in lr]
        if len(lrs) != n or not all(math.isfinite(x) and x >= 0 for x in lrs):
            raise TrainStepError(f"set_lr: give one finite, non-negative lr or {n} (one per "
                                 f"group), got {lr!r}")
        self._lr_override = lrs

    def __call__(self, inputs: Any, targets: Any = None) -> StepResult:
        return self.step(inputs, targets)

    def step(self, inputs: Any, targets: Any = None) -> StepResult:
        """One training step on a batch (inputs as at compile time: a tensor, a tuple, a dict
        of keyword inputs; targets for ``loss_fn``); the state tensors are updated in place."""
        args, kwargs = split_inputs(inputs)
        targets = as_args(targets)
        if batch_key(args, kwargs, targets) != self._compiled.batch_key:
            sig, want = batch_signature(args, kwargs, targets), self._compiled.batch_signature
            raise SignatureError(
                "this batch does not match the example the step was compiled for: "
                f"{_batch_mismatch(want, sig)}. Compile another step for it."
            )
        dev = self._state[0].device
        lrs = [torch.tensor(x, dtype=torch.float64, device=dev) for x in self.learning_rates()]
        batch = [t.contiguous() for t in (*tensor_leaves(args, kwargs), *targets)]
        # the scale this step runs at (a device copy, no sync): the skip warning re-runs at it
        self._scale_in = self.value("scale").clone() if self.warn_after_skips else None
        rest = self._runner(*self._state, *lrs, *batch, *self._compiled.constants)
        if self._lr_source is not None:
            # this step is the optimizer's step: tell torch's LR schedulers, which otherwise
            # warn that scheduler.step() came before optimizer.step()
            self._lr_source._opt_called = True
        ls = self.loss_scale_config
        out = dict(zip(self._compiled.extra_outputs, rest))
        result = StepResult(out["loss"], out["loss_scale"], out["skipped"], out.get("grad_norm"),
                            getattr(ls, "min_scale", None), out.get("grad_zeros"),
                            out.get("grad_nonfinite"), self._compiled.grad_numel)
        self._watch_skips(result, inputs, targets)
        return result

    def _watch_skips(self, result: StepResult, inputs: Any, targets: Any) -> None:
        """Warn when ``warn_after_skips`` steps in a row were skipped. The skip flags stay on the
        device until ``warn_after_skips`` of them have gathered (no work per step), then are read
        at once; the run length carries across windows. When the last step was skipped, the
        warning names the first node that produced inf/NaN on its batch
        (:func:`mpcompile.localize_overflow`, re-run at the current scale; the state is not
        touched)."""
        k = self.warn_after_skips
        if not k:
            return
        self._recent_skips.append(result.skipped)
        if len(self._recent_skips) < k:
            return
        longest = 0
        for skipped in torch.stack(self._recent_skips).tolist():  # the one sync per window
            self._skip_run = self._skip_run + 1 if skipped else 0
            longest = max(longest, self._skip_run)
        self._recent_skips.clear()
        if longest >= k:
            warnings.warn(
                f"{longest} training steps in a row were skipped (non-finite "
                f"gradients); the loss scale is now {result.loss_scale.item():g}. If it sits at "
                "its floor the batches or the model produce inf/NaN by themselves (check the "
                "data, lower the learning rate, or keep the overflowing module in FP32 with "
                "Policy(keep_fp32_modules=...)); otherwise the scale is still backing off."
                + self._where(inputs, targets, bool(result.skipped)),
                RuntimeWarning, stacklevel=3)

    def _where(self, inputs: Any, targets: Any, skipped: bool) -> str:
        """The overflow localised on the last batch, as a sentence for the warning."""
        if not skipped:
            return ""
        if self.data_parallel is not None:
            return (" To find the node, compile the same step on one process and call "
                    "mpcompile.localize_overflow(step, batch) with the overflowing rank's batch.")
        from ..numerics import describe, localize_overflow

        # _scale_in is set on every step while warn_after_skips is on (the only caller's case)
        scale = float(self._scale_in)
        try:
            found = localize_overflow(self, inputs, targets, loss_scale=scale)
        except Exception as e:  # noqa: BLE001 - the warning must not fail the step
            return f" (Localising the overflow failed: {type(e).__name__}: {e}.)"
        if found is None:
            return (" Re-running the last batch at the scale it ran at "
                    f"({scale:g}) gave no inf/NaN.")
        return " Last batch: " + describe(found)

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Masters, working copies, optimizer state, loss scale, good-step counter, step count
        and buffers by name (tensors), plus the learning-rate override if one is set. A tied
        parameter's master and working copy appear under each of its names as the same tensor,
        as in ``model.state_dict()``."""
        out: dict[str, Any] = dict(zip(self.layout.names, self._state))
        out.update({alias: out[name] for alias, name in self.aliases().items()})
        out["lr_override"] = None if self._lr_override is None else list(self._lr_override)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned; every entry is checked before anything
        changes: names, shapes and dtypes, finite masters, working copies and optimizer state,
        a finite positive loss scale, non-negative counters."""
        self._checked(state)()

    def _checked(self, state: dict[str, Any]):
        """Check ``state`` as :meth:`load_state_dict` does; return the function that loads it
        (nothing changes until it is called)."""
        names, aliases = self.layout.names, self.aliases()
        missing = [k for k in names if k not in state]
        extra = [k for k in state if k not in names and k not in aliases and k != "lr_override"]
        if missing or extra:
            raise TrainStepError(f"load_state_dict: missing {missing}, unexpected {extra}")
        for alias, name in aliases.items():
            if alias in state and not (state[alias] is state[name] or (
                    isinstance(state[alias], torch.Tensor) and state[alias].shape ==
                    state[name].shape and torch.equal(state[alias], state[name]))):
                raise TrainStepError(
                    f"load_state_dict: {alias} and {name} are one tied parameter but the "
                    "checkpoint holds different values for them")
        lr = state.get("lr_override")
        n = len(self.plan.groups)
        if lr is not None and not (isinstance(lr, (list, tuple)) and len(lr) == n and all(
                isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in lr)):
            raise TrainStepError(f"load_state_dict: lr_override is {lr!r}: give None or {n} "
                                 "finite, non-negative learning rates (one per group)")
        new = []
        for name, cur in zip(names, self._state):
            t = state[name]
            if not isinstance(t, torch.Tensor) or t.shape != cur.shape or t.dtype != cur.dtype:
                got = (f"{dtype_name(t.dtype)}{list(t.shape)}" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise TrainStepError(
                    f"load_state_dict: {name} is {got}, expected "
                    f"{dtype_name(cur.dtype)}{list(cur.shape)}"
                )
            why = checkpoint.entry_problem(self.layout, name, t)
            if why:
                raise TrainStepError(f"load_state_dict: {why}; nothing was changed")
            new.append(t)

        def apply() -> None:
            with torch.no_grad():  # checked: now copy in place (the state may be the model's)
                for cur, t in zip(self._state, new):
                    cur.copy_(t)
            self._lr_override = None if lr is None else [float(x) for x in lr]

        return apply

    def save(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint to ``path`` atomically (a crash never loses the previous one):
        the state, the ``set_lr`` override and the learning rates in use, checksummed. Returns
        the path. See :mod:`mpcompile.train.checkpoint`.

        A data-parallel step writes a folder: one file per rank (``rank<r>-<save id>.mpc``, its
        own state: its shard with ``shard_optimizer_state``) and ``manifest.json`` (world size,
        sharding, the files and their checksums), written by rank 0 once every rank's file is
        on disk; the previous save's files are removed after that, so a failed or cut-off save
        leaves the previous checkpoint loadable. A collective: call it on every rank; a failure
        on any rank raises on all of them."""
        if self.data_parallel is not None:
            return checkpoint.save_distributed(self, path)
        return checkpoint.save(self, path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore what :meth:`save` wrote, learning rates included (into the torch optimizer
        the step reads them from); a damaged file or another model's raises
        :class:`~mpcompile.CheckpointError` and leaves the step unchanged.

        A data-parallel checkpoint folder loads on the same number of ranks; a replicated one
        (every rank's state is the same) also on another number of ranks or on one process;
        a sharded one only on the world size that wrote it (else CheckpointError). A data-
        parallel step loads collectively: every rank checks its file first, and unless all
        pass, every rank raises and none changes."""
        if self.data_parallel is not None or checkpoint.is_distributed(path):
            checkpoint.load_distributed(self, path)
        else:
            checkpoint.load(self, path)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of this process's state by kind (``master``, ``working``, ``opt``, ``buffer``,
        ...); with sharded FP32 state, this rank's slices."""
        out: dict[str, int] = {}
        for name, t in zip(self.layout.names, self._state):
            kind = str(self.layout.kind(name))
            out[kind] = out.get(kind, 0) + t.numel() * t.element_size()
        return out

    def value(self, name: str) -> torch.Tensor:
        """One state tensor by name (``layout.names``)."""
        return self._state[self.layout.index(name)]

    def masters(self) -> dict[str, torch.Tensor]:
        """The FP32 value of every parameter, by FQN: its master (gathered from every rank's
        shard when the FP32 state is sharded: a collective, call it on every rank), else its
        working copy widened (``master_weights=False``)."""
        sp = self._compiled.shards
        out = {}
        if sp is not None:
            shards = {g: self.value(key(StateKind.MASTER, distributed.shard_fqn(g)))
                      for g in sp.groups}
            out = distributed.gather_masters(self.data_parallel, sp, shards)
        for name, _ in self._model.named_parameters():
            if name in out:
                continue
            master = key(StateKind.MASTER, name)
            work = key(StateKind.WORKING, name)
            if master in self.layout:
                out[name] = self.value(master)
            elif work in self.layout:
                out[name] = self.value(work).float()
        return out

    def to_module(self) -> torch.nn.Module:
        """A copy of the original model (its class, FP32) holding the current masters and
        buffers. With sharded FP32 state it gathers the masters: call it on every rank."""
        model = copy.deepcopy(self._model)
        self._write_into(model)
        return model

    def sync_model(self) -> None:
        """Write the current masters and buffers into the model the step was compiled from.
        A replicated step updates the model in place already; a step with sharded FP32 state
        does not (each rank holds a slice of the masters): this gathers them, so call it on
        every rank."""
        self._write_into(self._model)

    def _write_into(self, model: torch.nn.Module) -> None:
        masters = self.masters()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in masters and masters[name] is not p:
                    p.copy_(masters[name].to(p.dtype))
            for name, b in model.named_buffers():
                buf = key(StateKind.BUFFER, name)
                if buf in self.layout:
                    b.copy_(self.value(buf))

    # -- inspection ------------------------------------------------------------------------

    def explain(self, node: str | fx.Node) -> str:
        """Why a node of the step graph (or of the graph that runs) does what it does."""
        gm = self.graph_module
        if isinstance(node, str) and not any(n.name == node for n in gm.graph.nodes):
            gm = self.executable
        return explain_node(gm, node, self._compiled.stages)

    def report(self, measure: bool = False):
        """The core report of the forward, plus the training-only nodes and the state sizes
        (a :class:`TrainReport`)."""
        return build_train_report(self, build_report(self._compiled.forward, self._model,
                                                     measure_calls=measure))
