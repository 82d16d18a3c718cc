"""Trace one training step into an fx graph.

The step is a pure function of (state, learning rates, batch) -> (new state, loss, scale,
skipped[, grad norm]), traced once with ``make_fx`` in fake mode:

    inputs -> forward (fx.Interpreter over the forward graph, weights as working copies)
    -> loss -> loss x S -> autograd.grad -> the phases in ``phases.py``

Each part runs inside ``provenance.phase`` so its nodes know what they are.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx

from .. import optim, scaling
from ..capture import Binding, BindingKind, Captured
from ..errors import MPCompileError, TrainStepError
from . import distributed, phases
from .distributed import DataParallel
from .layout import StateKind, StateLayout, key
from .provenance import hook_backward, phase

F32 = torch.float32


@dataclass(frozen=True)
class StepSpec:
    """Everything the traced step depends on."""

    forward: fx.GraphModule  # the mixed-precision forward, weights as working-copy inputs
    bindings: tuple[Binding, ...]  # what each of its placeholders is
    captured: Captured  # output bindings and structure of the model
    layout: StateLayout
    plan: optim.Plan
    loss_scale: scaling.LossScale
    low: torch.dtype
    max_grad_norm: float | None
    loss_fn: Callable | None  # None: the model returns its loss
    n_inputs: int  # tensors of the batch that are model inputs (the rest are targets)
    n_constants: int  # tensor constants of the model, the step's last inputs
    keep_master: tuple[str, ...]  # parameters with an FP32 master (all, unless the ablation)
    data_parallel: DataParallel | None = None  # None: one process, no collectives
    shards: distributed.ShardPlan | None = None  # sharded FP32 state (ZeRO-1); needs the above
    grad_stats: bool = False  # also return zero / non-finite gradient counts per group


def trace(spec: StepSpec, example: list[torch.Tensor]) -> fx.GraphModule:
    """``make_fx`` of the step on ``example`` (state, lrs, batch); errors become
    ``TrainStepError`` naming what failed."""
    step = _step_function(spec)
    try:
        with fx_traceback.preserve_node_meta():
            return make_fx(step, tracing_mode="fake")(*example)
    except MPCompileError:
        raise
    except Exception as e:  # noqa: BLE001 - a loss_fn that cannot be traced, etc.
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainStepError(f"could not trace the training step: {type(e).__name__}: {msg}"
                             ) from e


def _step_function(spec: StepSpec) -> Callable:
    n_state, n_groups = len(spec.layout.names), len(spec.plan.groups)

    def step(*flat):
        st = dict(zip(spec.layout.names, flat[:n_state]))
        lrs = flat[n_state:n_state + n_groups]
        batch = flat[n_state + n_groups:len(flat) - spec.n_constants]
        consts = flat[len(flat) - spec.n_constants:]
        inputs, targets = batch[:spec.n_inputs], batch[spec.n_inputs:]
        fp32_of, feed, leaves = _inputs(spec, st, inputs, consts)
        loss, grads, new_buffers = _forward_backward(spec, st, feed, leaves, targets)
        dp, sp = spec.data_parallel, spec.shards
        with torch.no_grad():
            shard_parts = {}
            if sp is not None:
                with phase("grad_reduce_scatter", subject=str(dp)):
                    shard_parts = distributed.reduce_scatter_gradients(
                        dp, sp, {f: grads.pop(f) for f in sp.sharded})
            if dp is not None:
                with phase("grad_all_reduce", subject=str(dp)):
                    grads = distributed.average_gradients(dp, grads)
            g32, gs, found, norm, counts = _unscale(spec, st, grads, shard_parts)
            if dp is not None:
                with phase("found_inf", subject=f"all-reduce MAX: {dp}"):
                    found = distributed.agree_found_inf(dp, found)
            new, step_now = _update(spec, st, lrs, g32, gs, found, fp32_of)
            with phase("gate", subject="buffers and step count"):
                for fqn, v in new_buffers.items():
                    name = key(StateKind.BUFFER, fqn)
                    if dp is not None:
                        with phase("buffer_broadcast", subject=f"{fqn}: rank 0's, {dp}"):
                            v = distributed.from_rank0(dp, v)
                    new[name] = phases.gate(found, st[name], v)
                new["step"] = phases.gate(found, st["step"], step_now)
            with phase("scale_update"):
                new["scale"], new["growth_tracker"] = phases.scale_update(
                    spec.loss_scale, st["scale"], st["growth_tracker"], found)
            with phase("outputs"):
                out = [new[k] for k in spec.layout.names]
                loss = loss.detach().to(F32)
                if dp is not None:
                    with phase("outputs", subject=f"the loss, mean over ranks: {dp}"):
                        loss = distributed.global_mean(dp, loss)
                out += [loss, new["scale"], found]
                if norm is not None:
                    out.append(norm)
                if counts is not None:
                    out += list(counts)
        return tuple(out)

    return step


def _inputs(spec: StepSpec, st: dict, inputs: tuple, consts: tuple):
    """(FP32 value per parameter, the forward's feed, the autograd leaves per parameter).
    Tensor constants of the model come in as inputs (a real tensor cannot enter fake tracing)."""
    with phase("inputs"):
        leaves: dict[str, list[torch.Tensor]] = defaultdict(list)

        def leaf(fqn: str, t: torch.Tensor) -> torch.Tensor:
            if fqn in spec.plan.group_of:
                t = t.detach().requires_grad_()
                leaves[fqn].append(t)
            return t

        params = {b.target for b in spec.bindings if b.kind is BindingKind.PARAM}
        sharded = set(spec.shards.sharded) if spec.shards is not None else set()
        # a sharded parameter's FP32 placeholder has no users (that is why it could be
        # sharded): it is fed its working copy, never read
        fp32_of = {fqn: (st[key(StateKind.WORKING, fqn)] if fqn in sharded
                         else st[key(StateKind.MASTER, fqn)] if fqn in spec.keep_master
                         else st[key(StateKind.WORKING, fqn)].to(F32)) for fqn in params}
        feed, next_const = [], iter(consts)
        for b in spec.bindings:
            if b.kind is BindingKind.PARAM:
                feed.append(leaf(b.target, fp32_of[b.target]))
            elif b.kind is BindingKind.WORKING:
                feed.append(leaf(b.target, st[key(StateKind.WORKING, b.target)]))
            elif b.kind is BindingKind.BUFFER:
                feed.append(st[key(StateKind.BUFFER, b.target)])
            elif b.kind is BindingKind.CONST:
                feed.append(next(next_const))
            else:
                feed.append(inputs[b.target])
    return fp32_of, feed, leaves


def _forward_backward(spec: StepSpec, st: dict, feed: list, leaves: dict, targets: tuple):
    """(loss, gradient parts per parameter, new buffer values)."""
    with torch.enable_grad():
        outs = fx.Interpreter(spec.forward).run(*feed)
        new_buffers, user = {}, []
        for b, v in zip(spec.captured.outputs, outs):
            if b.kind is BindingKind.BUFFER:
                new_buffers[b.target] = v.detach()
            else:
                user.append(v)
        with phase("loss"):
            outputs = spec.captured.out_spec.unflatten(user)
            loss = (spec.loss_fn(outputs, *targets) if spec.loss_fn is not None
                    else model_loss(outputs))
        _check_scalar(loss)
        with phase("loss_scale"):
            scaled_loss = phases.scale_loss(loss, st["scale"], spec.loss_scale is not None)
        wrt = [t for fqn in spec.plan.group_of for t in leaves[fqn]]
        handles = hook_backward(scaled_loss.grad_fn) if scaled_loss.grad_fn else []
        try:
            with phase("backward"):
                grads = torch.autograd.grad(scaled_loss, wrt, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
    by_leaf = dict(zip(map(id, wrt), grads))
    parts = {fqn: [by_leaf[id(t)] for t in leaves[fqn] if by_leaf[id(t)] is not None]
             for fqn in spec.plan.group_of}
    return loss, parts, new_buffers


def model_loss(outputs: Any) -> Any:
    """The loss a model returns: ``outputs.loss`` (Hugging Face ``ModelOutput``),
    ``outputs["loss"]``, the first element of a tuple, or the output itself."""
    if isinstance(outputs, dict):  # Hugging Face ModelOutput is a dict without None fields
        if outputs.get("loss") is None:
            raise TrainStepError(
                f"the model returned no loss (its output has {', '.join(map(str, outputs))}): "
                "pass labels in the batch so it computes one, or give a loss_fn")
        found = outputs["loss"]
    elif getattr(outputs, "loss", None) is not None:
        found = outputs.loss
    elif isinstance(outputs, (tuple, list)) and outputs:
        found = outputs[0]
    else:
        found = outputs
    if found is None:
        raise TrainStepError("the model returned no loss (outputs.loss is None): pass labels "
                             "in the batch, or give a loss_fn")
    return found


def _check_scalar(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.dim() != 0:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss)
        raise TrainStepError(
            f"loss_fn must return a scalar tensor, got {shape}: reduce it (e.g. .mean())")


def _unscale(spec: StepSpec, st: dict, grads: dict, shard_parts: dict):
    """(unscaled FP32 gradient per parameter, unscaled FP32 gradient shard per sharded group,
    found_inf, total norm or None)."""
    scaled = spec.loss_scale is not None
    g32: dict[str, torch.Tensor] = {}
    gs: dict[int, torch.Tensor] = {}
    with phase("unscale"):
        inv = phases.inverse_scale(st["scale"]) if scaled else None
        for fqn, parts in grads.items():
            if not parts:
                continue  # no gradient reaches it: frozen, as torch.optim skips it
            with phase("unscale", subject=fqn):
                g32[fqn] = phases.unscale(parts, inv)
        for g, shard in shard_parts.items():
            with phase("unscale", subject=f"param group {g}: this rank's shard"):
                gs[g] = phases.unscale([shard], inv)
    with phase("found_inf"):
        found = phases.found_inf([*g32.values(), *gs.values()], st["scale"].device)
    counts = _counts(spec, g32, gs, st) if spec.grad_stats else None
    norm = None
    if spec.max_grad_norm is not None and (g32 or gs):
        with phase("clip"):
            if gs:  # the norm over every rank's shard plus the replicated gradients
                shard_sq = distributed.all_reduce_sum(spec.data_parallel, phases.squared_norm(
                    list(gs.values()), st["scale"].device))
                g32, gs_list, norm = phases.clip_by(
                    g32, list(gs.values()), spec.max_grad_norm,
                    phases.squared_norm(list(g32.values()), st["scale"].device) + shard_sq)
                gs = dict(zip(gs, gs_list))
            else:
                g32, norm = phases.clip(g32, spec.max_grad_norm)
    return g32, gs, found, norm, counts


def _counts(spec: StepSpec, g32: dict, gs: dict, st: dict):
    """(zeros, non-finite) per param group of the unscaled gradients, summed over the ranks'
    shards when the FP32 state is sharded (replicated gradients are the same on every rank).
    A parameter no gradient reaches counts as zeros."""
    n, device = len(spec.plan.groups), st["scale"].device
    sharded = set(spec.shards.sharded) if spec.shards is not None else set()
    unreached = [0] * n
    for fqn, gi in spec.plan.group_of.items():
        if fqn not in g32 and fqn not in sharded:
            name = key(StateKind.MASTER, fqn)
            unreached[gi] += st[name if name in st else key(StateKind.WORKING, fqn)].numel()
    with phase("grad_stats", subject="zero and non-finite gradient elements per param group"):
        whole = [[g for f, g in g32.items() if spec.plan.group_of[f] == gi] for gi in range(n)]
        counts = phases.grad_counts(whole, unreached, device)
        if gs:
            sp = spec.shards
            shard = phases.grad_counts([[gs[gi]] if gi in gs else [] for gi in range(n)],
                                       [-sp.padding(gi) if gi in gs else 0 for gi in range(n)],
                                       device)
            summed = distributed.all_reduce_sum(spec.data_parallel, torch.stack(shard))
            counts = (counts[0] + summed[0], counts[1] + summed[1])
    return counts


def _update(spec: StepSpec, st: dict, lrs: tuple, g32: dict, gs: dict, found, fp32_of: dict):
    """(the new state: optimizer updates on the masters (whole, and this rank's shards), gated,
    and their working copies (the shards' all-gathered); the step count including this step,
    ungated)."""
    plan = spec.plan
    with phase("update", subject="step count"):
        step_now = st["step"] + 1
    scalars = {}
    for gi, group in enumerate(plan.groups):
        with phase("update", subject=f"param group {gi}", spec=repr(group)):
            scalars[gi] = optim.group_scalars(group, step_now, lrs[gi])
    new = dict(st)
    working = {b.target for b in spec.bindings if b.kind is BindingKind.WORKING}
    for fqn, g in g32.items():
        opt = plan.spec(fqn)
        slots = {s: key(StateKind.OPT, fqn, s) for s in opt.state_names}
        with phase("update", subject=fqn, spec=repr(opt)):
            p = fp32_of[fqn]
            p_new, s_new = phases.update(opt, p, g, {s: st[k] for s, k in slots.items()},
                                         scalars[plan.group_of[fqn]])
        with phase("gate", subject=fqn):
            p_new = phases.gate(found, p, p_new)
            for s, v in s_new.items():
                new[slots[s]] = phases.gate(found, st[slots[s]], v)
        if fqn in spec.keep_master:
            new[key(StateKind.MASTER, fqn)] = p_new
        if fqn in working or fqn not in spec.keep_master:
            with phase("working_copy", subject=fqn):
                new[key(StateKind.WORKING, fqn)] = phases.working_copy(p_new, spec.low)
    for g, grad in gs.items():
        name, opt = distributed.shard_fqn(g), plan.groups[g]
        slots = {s: key(StateKind.OPT, name, s) for s in opt.state_names}
        master = key(StateKind.MASTER, name)
        with phase("update", subject=f"param group {g}: this rank's shard", spec=repr(opt)):
            p_new, s_new = phases.update(opt, st[master], grad,
                                         {s: st[k] for s, k in slots.items()}, scalars[g])
        with phase("gate", subject=f"param group {g}: this rank's shard"):
            new[master] = phases.gate(found, st[master], p_new)
            for s, v in s_new.items():
                new[slots[s]] = phases.gate(found, st[slots[s]], v)
        with phase("working_copy", subject=f"param group {g}: this rank's shard"):
            low = phases.working_copy(new[master], spec.low)
        with phase("working_all_gather", subject=f"param group {g}, {spec.data_parallel}"):
            for fqn, t in distributed.gather_working(spec.data_parallel, spec.shards, g,
                                                     low).items():
                new[key(StateKind.WORKING, fqn)] = t
    return new, step_now
