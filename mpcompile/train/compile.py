"""``compile_train_step``: the paper's whole training step as one fx graph.

    capture + passes.FORWARD (train mode)      the mixed-precision forward, as ``convert``
    passes.TRAINING                            weight casts -> working-copy inputs
    layout.build                               the state: masters, working copies, optimizer
                                               state, buffers, scale, counters
    distributed.resolve/check_same             data parallel: the group; every rank compiled
                                               the same step (else an error on every rank);
                                               rank 0's weights broadcast
    trace.trace + provenance.finish            forward, loss, x S, autograd backward,
                                               [bucketed gradient all-reduce], unscale,
                                               found_inf [all-reduce MAX], [clip], update, gate,
                                               working copies, scale update, [loss mean over
                                               ranks]; a record on every node
    passes.EXECUTION + state_in_place          generated kernels where Policy.kernels allows;
                                               the new state stored into the state inputs
    backends.Runner                            eager, or Inductor on the first step
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import backends, optim, passes, scaling
from ..api import as_args, compile_program, split_inputs, tensor_leaves
from ..capture import BindingKind, module_modes, restore_modes
from ..checks import check
from ..errors import TrainStepError
from ..passes.working_copies import working
from ..policy import Policy
from ..signature import TensorSpec
from . import distributed
from . import layout as state_layout
from .provenance import finish, mark_forward
from .step import CompiledStep, TrainStep, batch_key, batch_signature
from .trace import StepSpec, trace


def compile_train_step(model: torch.nn.Module, loss_fn: Callable | None = None,
                       example_inputs: Any = None, example_targets: Any = None, *,
                       optimizer: Any, batch: Any = None, dtype: torch.dtype | None = None,
                       loss_scale: Any = "default", policy: Policy | None = None,
                       max_grad_norm: float | None = None,
                       master_weights: bool = True, backend: str = "auto",
                       process_group: Any = None, bucket_cap_mb: float = 25.0,
                       grad_reduce_dtype: torch.dtype | None = None,
                       shard_optimizer_state: bool = False,
                       grad_stats: bool = False) -> TrainStep:
    """Compile one mixed-precision training step of ``model`` into a single fx graph.

    Args:
        model: the FP32 model. Its FP32 parameters are the step's master weights and its
            buffers the step's buffers: each step updates them in place, as torch.optim would
            (no second FP32 copy is held); :meth:`TrainStep.to_module` returns a copy.
        loss_fn: ``loss_fn(outputs, *targets) -> scalar``; None: the model computes the loss
            (``outputs.loss``, ``outputs["loss"]``, or the first output), the Hugging Face way.
        example_inputs: the model's inputs: a tensor, a tuple (positional), a dict (keyword,
            e.g. a Hugging Face batch with ``labels``) or ``(args, kwargs)``; the step is
            specialised to their shapes and dtypes. ``batch=`` is the same argument by another
            name.
        example_targets: a tensor or tuple of tensors passed to ``loss_fn`` after the outputs.
        optimizer: a ``torch.optim.SGD``/``Adam``/``AdamW`` built on ``model.parameters()``
            (hyperparameters and per-group lr/weight decay are read from it, and its
            ``param_groups[i]["lr"]`` is read at every step, so LR schedulers work), or an
            ``mpcompile.optim.SGD/Adam/AdamW`` spec.
        dtype: ``torch.float16`` (default) or ``torch.bfloat16``; or set it in ``policy``.
        loss_scale: ``"dynamic"``, a number (static), ``None`` (off), or a
            :class:`DynamicLossScale`. Default: dynamic for float16, off for bfloat16.
        max_grad_norm: clip the unscaled gradients' total 2-norm to this.
        master_weights: False is the paper's ablation, for experiments only: no FP32 master;
            the optimizer's result is rounded straight into the low-precision weights, so
            updates below half an ulp of a weight are lost.
        backend: ``"inductor"`` (torch's compiler: the state update fuses into one loop per
            parameter), ``"eager"`` (op by op), or ``"auto"`` (default: Inductor where it can
            run on the device, else eager). Inductor compiles on the first step; if it fails
            the step runs eagerly with one logged warning (``report()`` says so).
        process_group: data parallelism. None (default): torch.distributed's default group
            when it is initialised with 2 or more ranks, else one process; or a
            ``torch.distributed.ProcessGroup``. Every rank compiles the same step (checked
            here: a different model, dtype, optimizer or batch shape raises on every rank);
            rank 0's parameters and buffers are copied to every rank (as DDP does). Each step
            averages the gradients over the ranks inside the graph (functional all-reduce,
            bucketed, before unscale, as DDP + GradScaler), skips on every rank when any rank
            overflows, and reports the loss averaged over the ranks (the concatenated batch's
            mean, since every rank's batch has the same size). The new buffers (batch-norm
            statistics) are rank 0's on every rank, as DDP's ``broadcast_buffers``; batch
            statistics stay per rank (no SyncBatchNorm). gloo (CPU) and NCCL (CUDA).
        bucket_cap_mb: the size of the flat buffers the gradients are all-reduced in (DDP's 25).
        grad_reduce_dtype: None (the gradients' dtype, as DDP) or ``torch.float32``.
        shard_optimizer_state: ZeRO stage 1 (data parallel only). Each rank keeps only its
            slice of the FP32 masters and optimizer state of every parameter the forward reads
            only as a low-precision working copy (the others, e.g. FP32 norm weights, stay
            replicated): the step reduce-scatters those gradients (bucketed, before unscale),
            updates its slice, and all-gathers the new low-precision working copies. Same
            results as the replicated step, bit for bit without clipping (with clipping the
            total norm is summed in another order). The model's own parameters are not
            updated by a sharded step: ``to_module()`` and ``sync_model()`` (both collective:
            call them on every rank) gather the masters.
        grad_stats: also count, inside the step, the zero and the non-finite elements of the
            unscaled gradients per param group: ``StepResult.grad_zeros`` /
            ``grad_nonfinite`` / ``zero_fraction`` (device tensors: no host sync unless read),
            so gradients lost to underflow show instead of passing silently.
    """
    dp = distributed.resolve(process_group, bucket_cap_mb, grad_reduce_dtype)
    try:
        backends.check_backend(backend)
        policy = _policy(policy, dtype)
        ls = scaling.resolve(loss_scale, policy.dtype)
        args, kwargs, targets = _batch(loss_fn, max_grad_norm, example_inputs, example_targets,
                                       batch)
        named = list(model.named_parameters())
        plan = optim.plan_for(optimizer, named)
        policy.check_pins(model)
        _check_sharding(shard_optimizer_state, dp, master_weights)
        if not isinstance(grad_stats, bool):
            raise TrainStepError(f"grad_stats must be True or False, got {grad_stats!r}")
    except Exception as e:
        if dp is not None:  # tell the other ranks, which wait for this rank's fingerprint
            distributed.share_failure(dp, e)
        raise
    inputs = tensor_leaves(args, kwargs)
    if dp is not None:
        distributed.check_same(dp, distributed.fingerprint(model, {
            "batch": _describe_batch(batch_signature(args, kwargs, targets)),
            "dtype": policy.dtype, "policy": policy, "optimizer": plan, "loss scale": ls,
            "loss_fn": getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__),
            "max_grad_norm": max_grad_norm, "master_weights": master_weights,
            "backend": backend, "bucket_cap_mb": bucket_cap_mb,
            "grad_reduce_dtype": grad_reduce_dtype, "world size": dp.world_size,
            "shard_optimizer_state": shard_optimizer_state, "grad_stats": grad_stats}))
        distributed.broadcast_model(dp, model)

    # the step trains: a model in eval mode is captured as after model.train(); a model already
    # in train mode keeps the modes of its submodules (e.g. a batch norm frozen with .eval())
    modes = module_modes(model)
    if not model.training:
        model.train()
    try:
        program = compile_program(model, args, kwargs, policy, backend=None)
    finally:
        restore_modes(modes)
    fwd = passes.run(passes.TRAINING, program.graph_module, program.context(model),
                     graphs={k: v for k, v in program.stages.items()
                             if k not in {p.name for p in passes.EXECUTION}})
    mark_forward(fwd.gm)
    has_copy = working(fwd.ctx)
    keep_master = tuple(fqn for fqn, _ in named if master_weights or fqn not in has_copy)
    shards = None
    if shard_optimizer_state:
        shards = distributed.plan_shards(
            dp, plan.group_of, {n: tuple(p.shape) for n, p in named},
            _only_working(fwd.gm, fwd.ctx.inputs, plan.group_of), grad_reduce_dtype or
            policy.dtype)
    layout, values = state_layout.build(model, plan, has_copy, keep_master, policy.dtype, ls,
                                        shards)
    constants = tuple(b.target for b in fwd.ctx.inputs if b.kind is BindingKind.CONST)
    spec = StepSpec(fwd.gm, fwd.ctx.inputs, program.captured, layout, plan, ls, policy.dtype,
                    max_grad_norm, loss_fn, len(inputs), len(constants), keep_master, dp, shards,
                    grad_stats)
    dev = values[0].device
    lrs = [torch.tensor(g.lr, dtype=torch.float64, device=dev) for g in plan.groups]
    input_names = (*layout.names, *(f"lr{i}" for i in range(len(lrs))),
                   *(f"input{i}" for i in range(len(inputs))),
                   *(f"target{i}" for i in range(len(targets))),
                   *(f"const{i}" for i in range(len(constants))))
    roles = ["state"] * len(layout.names) + ["lr"] * len(lrs) + ["input"] * len(inputs) \
        + ["target"] * len(targets) + ["model constant"] * len(constants)
    gm = trace(spec, [*values, *lrs, *inputs, *targets, *constants])
    gm = check(finish(gm, fwd.gm, list(zip(roles, input_names))), "train_step")
    graphs = {**fwd.graphs, "train_step": gm}
    run = passes.run((*passes.EXECUTION, passes.state_in_place(layout.names)), gm,
                     fwd.ctx, graphs=graphs)
    compiled = CompiledStep(
        forward=program, stages=run.graphs, graph_module=gm, executable=run.gm, layout=layout,
        plan=plan, loss_scale=ls, policy=policy, master_weights=master_weights,
        max_grad_norm=max_grad_norm, batch_signature=batch_signature(args, kwargs, targets),
        batch_key=batch_key(args, kwargs, targets),
        input_names=input_names, n_model_inputs=len(inputs), constants=constants,
        backend=backend, data_parallel=dp, shards=shards,
        grad_numel=_group_numel(plan, dict(named)) if grad_stats else None)
    lr_source = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    return TrainStep(model, compiled, values, lr_source)


def _group_numel(plan: optim.Plan, params: dict) -> tuple[int, ...]:
    """Trainable elements per param group (what grad_stats counts among)."""
    out = [0] * len(plan.groups)
    for fqn, gi in plan.group_of.items():
        out[gi] += params[fqn].numel()
    return tuple(out)


def _check_sharding(shard: bool, dp: distributed.DataParallel | None,
                    master_weights: bool) -> None:
    if not isinstance(shard, bool):
        raise TrainStepError(f"shard_optimizer_state must be True or False, got {shard!r}")
    if shard and dp is None:
        raise TrainStepError(
            "shard_optimizer_state=True shards the FP32 state across data-parallel ranks, but "
            "this step runs on one process: initialise torch.distributed with 2 or more ranks "
            "(e.g. torchrun) or pass process_group=")
    if shard and not master_weights:
        raise TrainStepError("shard_optimizer_state=True shards the FP32 masters; "
                             "master_weights=False has none: drop one of the two")


def _only_working(gm, bindings, group_of) -> list[str]:
    """Trainable parameters the forward reads only as their low-precision working copy (their
    FP32 placeholder has no users): the ones whose FP32 state can be sharded."""
    has_copy = {b.target for b in bindings if b.kind is BindingKind.WORKING}
    used32 = {b.target for node, b in zip(gm.graph.find_nodes(op="placeholder"), bindings)
              if b.kind is BindingKind.PARAM and node.users}
    return [f for f in group_of if f in has_copy and f not in used32]


def _policy(policy: Policy | None, dtype: torch.dtype | None) -> Policy:
    if policy is None:
        return Policy(dtype=dtype if dtype is not None else torch.float16)
    if dtype is not None and dtype != policy.dtype:
        raise TrainStepError(f"dtype={dtype} conflicts with policy.dtype={policy.dtype}")
    return policy


def _describe_batch(signature: tuple) -> str:
    return ", ".join(f"{k} {v if isinstance(v, TensorSpec) else v[1]}" for k, v in signature)


def _batch(loss_fn, max_grad_norm, example_inputs, example_targets, batch
           ) -> tuple[tuple, dict, tuple]:
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise TrainStepError(f"max_grad_norm must be positive, got {max_grad_norm}")
    if loss_fn is not None and not callable(loss_fn):
        raise TrainStepError("loss_fn must be callable: loss_fn(outputs, *targets) -> scalar, "
                             "or None when the model returns its loss")
    if batch is not None and example_inputs is not None:
        raise TrainStepError("give the model's inputs once: example_inputs or batch=")
    inputs = batch if batch is not None else example_inputs
    if inputs is None:
        raise TrainStepError("give example inputs (example_inputs or batch=): the step is "
                             "specialised to their shapes")
    args, kwargs = split_inputs(inputs)
    targets = as_args(example_targets)
    if loss_fn is None and targets:
        raise TrainStepError("example_targets were given but no loss_fn: pass loss_fn, or "
                             "pass the targets to the model (e.g. labels=...) so it returns "
                             "the loss")
    for i, t in enumerate(targets):
        if not isinstance(t, torch.Tensor):
            raise TrainStepError(f"example_targets[{i}] is a {type(t).__name__}; pass tensors")
    if not tensor_leaves(args, kwargs):
        raise TrainStepError("the example inputs hold no tensor")
    return args, kwargs, targets
