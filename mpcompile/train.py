"""``compile_train_step``: the paper's whole training step as one fx graph.

    forward (mixed precision, from the core pipeline, weights as low-precision working copies)
    -> loss (FP32) -> loss x S -> backward (autograd of the rewritten forward: low-precision
    matmuls/convs in the backward too) -> unscale in FP32 -> found_inf -> [clip] -> optimizer on
    FP32 masters and FP32 state -> where(found_inf, old, new) for every piece of state -> new
    working copies cast from the new masters -> dynamic scale update

The step is a pure function of (state, learning rates, batch) traced once with ``make_fx`` in fake
mode; its nodes carry provenance: forward nodes keep their records, backward nodes name the
forward node they differentiate, the training nodes name their phase (and parameter).
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx

from . import optim, scaling
from .api import Program, _as_args, compile_program
from .capture import Signature, TensorSpec, module_modes, restore_modes
from .errors import MPCompileError, SignatureError, TrainStepError
from .checks import check
from .dtypes import dtype_name
from .fxutil import is_cast, is_getitem, val_dtype
from .records import MP, NodeRecord, record
from . import passes
from .passes import Context, kernels, working_copies
from .policy import Policy

F32 = torch.float32
_OUT = ("loss", "loss_scale", "skipped", "grad_norm")

# what each training phase is, for explain()
PHASES = {
    "inputs": "prepares the step's inputs",
    "loss": "the loss, computed in FP32 on the model's FP32 outputs",
    "loss_scale": "multiplies the loss by the loss scale S before backward, so small gradients "
                  "stay representable in FP16",
    "backward": "backward, derived by autograd from the mixed-precision forward",
    "unscale": "casts a gradient to FP32 and divides it by S, right after backward",
    "found_inf": "checks every unscaled gradient for inf/NaN (the skip decision, in the graph: "
                 "no host sync)",
    "clip": "clips the unscaled gradients to max_grad_norm (after unscaling, before the "
            "optimizer)",
    "update": "the optimizer's update, on the FP32 master and FP32 optimizer state",
    "gate": "keeps the old value when found_inf is set: a skipped step leaves every piece of "
            "state bit-identical",
    "working_copy": "rounds the new FP32 master to the low-precision working copy the next "
                    "forward uses",
    "scale_update": "dynamic loss scale: backoff on overflow, growth after growth_interval clean "
                    "steps",
    "outputs": "the step's reported values",
}


@contextlib.contextmanager
def phase(name: str, **info: Any):
    """Annotate the nodes traced inside with ``{"mp_phase": name, ...}`` (node.meta["custom"])."""
    saved = fx_traceback.current_meta.get("custom")
    fx_traceback.current_meta["custom"] = {"mp_phase": name, **info}
    try:
        yield
    finally:
        if saved is None:
            fx_traceback.current_meta.pop("custom", None)
        else:
            fx_traceback.current_meta["custom"] = saved


def _hook_backward(root) -> list:
    """Tag the nodes each autograd node emits with the sequence number of the forward op it
    differentiates (what aot_autograd does for stack traces)."""
    handles, seen, stack = [], set(), [root]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        seq = fn._sequence_nr()

        def pre(_grads, seq=seq):
            fx_traceback.current_meta["custom"] = {"mp_phase": "backward", "mp_of": seq}

        def post(_gi, _go):
            fx_traceback.current_meta["custom"] = {"mp_phase": "backward"}

        handles += [fn.register_prehook(pre), fn.register_hook(post)]
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return handles


# --- state layout -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The flat order of the step's state, and what each entry is."""

    names: tuple[str, ...]  # "master.fc.weight", "working.fc.weight", "opt.fc.weight.exp_avg",
    #                         "buffer.bn.running_mean", "scale", "growth_tracker", "step"

    def index(self, name: str) -> int:
        return self.names.index(name)


@dataclass(frozen=True)
class StepResult:
    """What one step reports, as device tensors (read them when you choose: no sync here)."""

    loss: torch.Tensor  # the unscaled loss
    loss_scale: torch.Tensor  # the scale the next step will use
    skipped: torch.Tensor  # bool: gradients were not finite, nothing was updated
    grad_norm: torch.Tensor | None = None  # total norm of the unscaled gradients (clipping only)


def _batch_signature(inputs: tuple, targets: tuple) -> tuple:
    return tuple((f"{kind}[{i}]", Signature.of((t,), {}, True).leaves[0])
                 for kind, group in (("inputs", inputs), ("targets", targets))
                 for i, t in enumerate(group))


def _batch_mismatch(want: tuple, got: tuple) -> str:
    if [k for k, _ in want] != [k for k, _ in got]:
        return (f"it has {', '.join(k for k, _ in got) or 'nothing'}, the example had "
                f"{', '.join(k for k, _ in want)}")
    for (k, a), (_, b) in zip(want, got):
        if a != b:
            fmt = lambda x: str(x) if isinstance(x, TensorSpec) else x[1]  # noqa: E731
            return f"{k} is {fmt(b)}, compiled for {fmt(a)}"
    return "no difference"


class TrainStep:
    """A compiled mixed-precision training step. See :func:`compile_train_step`."""

    def __init__(self, *, model, program, fwd, layout, state, plan, loss_scale, lr_source,
                 low, master_weights, max_grad_norm, gm, unlowered, batch_sig, n_inputs,
                 policy):
        self._model = model
        self._program: Program = program
        self._fwd: working_copies.WorkingCopies = fwd
        self.layout: Layout = layout
        self._state: list[torch.Tensor] = state
        self.plan: optim.Plan = plan
        self.loss_scale_config = loss_scale
        self._lr_source = lr_source
        self._lr_override: list[float] | None = None
        self.dtype = low
        self.master_weights = master_weights
        self.max_grad_norm = max_grad_norm
        self.graph_module: fx.GraphModule = gm  # what runs (kernels if lowered)
        self.unlowered: fx.GraphModule = unlowered  # before lowering: export reads this
        self._batch_sig = batch_sig
        self._n_inputs = n_inputs
        self.policy = policy

    # -- running ---------------------------------------------------------------------------

    def learning_rates(self) -> list[float]:
        """The per-group learning rates the next step uses: ``set_lr``'s, else the passed torch
        optimizer's (so its LR schedulers work), else the spec's."""
        if self._lr_override is not None:
            return list(self._lr_override)
        if self._lr_source is not None:
            return [float(g["lr"]) for g in self._lr_source.param_groups]
        return [g.lr for g in self.plan.groups]

    def set_lr(self, lr: float | Sequence[float]) -> None:
        """Set the learning rate (one value for all param groups, or one per group); no
        recompilation: the learning rate is a graph input."""
        n = len(self.plan.groups)
        lrs = [float(lr)] * n if isinstance(lr, (int, float)) else [float(x) for x in lr]
        if len(lrs) != n or any(x < 0 for x in lrs):
            raise TrainStepError(f"set_lr: give one non-negative lr or {n} (one per group)")
        self._lr_override = lrs

    def __call__(self, inputs: Any, targets: Any) -> StepResult:
        return self.step(inputs, targets)

    def step(self, inputs: Any, targets: Any) -> StepResult:
        """One training step on a batch; the state advances in place of the old."""
        inputs, targets = _as_args(inputs), _as_args(targets)
        sig = _batch_signature(inputs, targets)
        if sig != self._batch_sig:
            raise SignatureError(
                "this batch does not match the example the step was compiled for: "
                f"{_batch_mismatch(self._batch_sig, sig)}. Compile another step for it."
            )
        dev = self._state[0].device
        lrs = [torch.tensor(x, dtype=torch.float64, device=dev) for x in self.learning_rates()]
        batch = [t for t in (*inputs, *targets) if isinstance(t, torch.Tensor)]
        outs = self.graph_module(*self._state, *lrs, *batch)
        if self._lr_source is not None:
            # this step is the optimizer's step: tell torch's LR schedulers, which otherwise
            # warn that scheduler.step() came before optimizer.step()
            self._lr_source._opt_called = True
        n = len(self._state)
        self._state = list(outs[:n])
        rest = outs[n:]
        return StepResult(rest[0], rest[1], rest[2], rest[3] if len(rest) > 3 else None)

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Masters, working copies, optimizer state, loss scale, good-step counter, step count
        and buffers by name (tensors), plus the learning-rate override if one is set."""
        out: dict[str, Any] = dict(zip(self.layout.names, self._state))
        out["lr_override"] = None if self._lr_override is None else list(self._lr_override)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned; every entry is checked before anything
        changes."""
        missing = [k for k in self.layout.names if k not in state]
        extra = [k for k in state if k not in self.layout.names and k != "lr_override"]
        if missing or extra:
            raise TrainStepError(f"load_state_dict: missing {missing}, unexpected {extra}")
        new = []
        for name, cur in zip(self.layout.names, self._state):
            t = state[name]
            if not isinstance(t, torch.Tensor) or t.shape != cur.shape or t.dtype != cur.dtype:
                got = (f"{dtype_name(t.dtype)}{list(t.shape)}" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise TrainStepError(
                    f"load_state_dict: {name} is {got}, expected "
                    f"{dtype_name(cur.dtype)}{list(cur.shape)}"
                )
            new.append(t.detach().clone().to(cur.device))
        self._state = new
        lr = state.get("lr_override")
        self._lr_override = None if lr is None else list(lr)

    def value(self, name: str) -> torch.Tensor:
        return self._state[self.layout.index(name)]

    def to_module(self) -> torch.nn.Module:
        """A copy of the original model (its class, FP32) holding the current masters and
        buffers."""
        model = copy.deepcopy(self._model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                key = f"master.{name}"
                src = (self.value(key) if key in self.layout.names
                       else self.value(f"working.{name}"))
                p.copy_(src.to(p.dtype))
            for name, b in model.named_buffers():
                key = f"buffer.{name}"
                if key in self.layout.names:
                    b.copy_(self.value(key))
        return model

    # -- inspection ------------------------------------------------------------------------

    def explain(self, node: str | fx.Node) -> str:
        from .explain import explain_node

        return explain_node(self.graph_module, node)

    def report(self, measure: bool = False) -> TrainReport:
        """The core report of the forward, plus the training-only nodes and the state sizes."""
        from .report import build_report

        return build_train_report(self, build_report(self._program, self._model,
                                                     measure_calls=measure))


# --- building ----------------------------------------------------------------------------------


def compile_train_step(model: torch.nn.Module, loss_fn: Callable, example_inputs: Any,
                       example_targets: Any, *, optimizer: Any,
                       dtype: torch.dtype | None = None, loss_scale: Any = "default",
                       policy: Policy | None = None, max_grad_norm: float | None = None,
                       master_weights: bool = True) -> TrainStep:
    """Compile one mixed-precision training step of ``model`` into a single fx graph.

    Args:
        model: the FP32 model (left untouched; the step keeps its own state, see
            :meth:`TrainStep.to_module`).
        loss_fn: ``loss_fn(outputs, *targets) -> scalar``.
        example_inputs, example_targets: a tensor or tuple of tensors; the step is specialised
            to their shapes and dtypes.
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
    """
    if policy is None:
        policy = Policy(dtype=dtype if dtype is not None else torch.float16)
    elif dtype is not None and dtype != policy.dtype:
        raise TrainStepError(f"dtype={dtype} conflicts with policy.dtype={policy.dtype}")
    low = policy.dtype
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise TrainStepError(f"max_grad_norm must be positive, got {max_grad_norm}")
    if not callable(loss_fn):
        raise TrainStepError("loss_fn must be callable: loss_fn(outputs, *targets) -> scalar")
    ls = scaling.resolve(loss_scale, low)
    inputs, targets = _as_args(example_inputs), _as_args(example_targets)
    for where, group in (("example_inputs", inputs), ("example_targets", targets)):
        for i, t in enumerate(group):
            if not isinstance(t, torch.Tensor):
                raise TrainStepError(f"{where}[{i}] is a {type(t).__name__}; pass tensors")
    named = list(model.named_parameters())
    plan = optim.plan_for(optimizer, named)
    policy.check_pins(model)

    # the step trains: a model in eval mode is captured as after model.train(); a model already
    # in train mode keeps the modes of its submodules (e.g. a batch norm frozen with .eval())
    modes = module_modes(model)
    if not model.training:
        model.train()
    try:
        program = compile_program(model, inputs, {}, policy)
    finally:
        restore_modes(modes)
    fwd = working_copies.run(program.unlowered, program.captured.inputs, low)
    for n in fwd.gm.graph.nodes:  # survives the retrace: maps traced nodes back to records
        n.meta["custom"] = {"mp_name": n.name}
    params = dict(named)
    buffers = dict(model.named_buffers())
    keep_master = [fqn for fqn in params if master_weights or fqn not in fwd.working]

    # state, in layout order
    names: list[str] = []
    values: list[torch.Tensor] = []
    for fqn in keep_master:
        names.append(f"master.{fqn}")
        values.append(params[fqn].detach().to(F32).clone())
    for fqn in fwd.working:
        names.append(f"working.{fqn}")
        values.append(params[fqn].detach().to(low).clone())
    for fqn, gi in plan.group_of.items():
        for sname, t in optim.init_state(plan.groups[gi], params[fqn]).items():
            names.append(f"opt.{fqn}.{sname}")
            values.append(t)
    for fqn, b in buffers.items():
        names.append(f"buffer.{fqn}")
        values.append(b.detach().clone())
    dev = values[0].device if values else torch.device("cpu")
    names += ["scale", "growth_tracker", "step"]
    values += [torch.tensor(scaling.initial_scale(ls), dtype=F32, device=dev),
               torch.tensor(0, dtype=torch.int32, device=dev),
               torch.tensor(0.0, dtype=F32, device=dev)]
    layout = Layout(tuple(names))

    step_fn = _step_function(program, fwd, layout, plan, ls, low, master_weights,
                             max_grad_norm, loss_fn, len(inputs), keep_master)
    lrs = [torch.tensor(g.lr, dtype=torch.float64, device=dev) for g in plan.groups]
    example = [*values, *lrs, *inputs, *targets]
    try:
        with fx_traceback.preserve_node_meta():
            gm = make_fx(step_fn, tracing_mode="fake")(*example)
    except MPCompileError:
        raise
    except Exception as e:  # noqa: BLE001 - a loss_fn that cannot be traced, etc.
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainStepError(f"could not trace the training step: {type(e).__name__}: {msg}"
                             ) from e
    unlowered = _finish_graph(gm, program, fwd, layout, plan, len(lrs), len(inputs),
                              len(targets), max_grad_norm is not None)
    ctx = Context(policy, program.device_type, model, program.captured.inputs)
    gm = check(lower.run(unlowered, ctx), "lower")
    lr_source = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    return TrainStep(model=model, program=program, fwd=fwd, layout=layout, state=values,
                     plan=plan, loss_scale=ls, lr_source=lr_source, low=low,
                     master_weights=master_weights, max_grad_norm=max_grad_norm, gm=gm,
                     unlowered=unlowered,
                     batch_sig=_batch_signature(inputs, targets),
                     n_inputs=len(inputs), policy=policy)


def _step_function(program: Program, fwd, layout: Layout, plan: optim.Plan, ls, low,
                   master_weights: bool, max_grad_norm, loss_fn, n_inputs: int,
                   keep_master: list[str]):
    names = layout.names
    n_state, n_groups = len(names), len(plan.groups)
    trainable = list(plan.group_of)
    captured = program.captured
    scaled = ls is not None

    def step(*flat):
        st = dict(zip(names, flat[:n_state]))
        lrs = flat[n_state:n_state + n_groups]
        batch = flat[n_state + n_groups:]
        inputs, targets = batch[:n_inputs], batch[n_inputs:]
        with phase("inputs"):
            leaves: dict[str, list[torch.Tensor]] = defaultdict(list)

            def leaf(fqn: str, t: torch.Tensor) -> torch.Tensor:
                if fqn in plan.group_of:
                    t = t.detach().requires_grad_()
                    leaves[fqn].append(t)
                return t

            fp32_of = {fqn: (st[f"master.{fqn}"] if fqn in keep_master
                             else st[f"working.{fqn}"].to(F32)) for fqn in
                       {b.target for b in fwd.inputs if b.kind == "param"}}
            feed = []
            for b in fwd.inputs:
                if b.kind == "param":
                    feed.append(leaf(b.target, fp32_of[b.target]))
                elif b.kind == "working":
                    feed.append(leaf(b.target, st[f"working.{b.target}"]))
                elif b.kind == "buffer":
                    feed.append(st[f"buffer.{b.target}"])
                elif b.kind == "const":
                    feed.append(b.target)
                else:
                    feed.append(inputs[b.target])
        with torch.enable_grad():
            outs = fx.Interpreter(fwd.gm).run(*feed)
            new_buffers, user = {}, []
            for b, v in zip(captured.outputs, outs):
                if b.kind == "buffer":
                    new_buffers[b.target] = v.detach()
                else:
                    user.append(v)
            with phase("loss"):
                loss = loss_fn(captured.out_spec.unflatten(user), *targets)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.dim() != 0:
                shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss)
                raise TrainStepError(
                    f"loss_fn must return a scalar tensor, got {shape}: reduce it "
                    "(e.g. .mean())"
                )
            with phase("loss_scale"):
                scale = st["scale"]
                scaled_loss = loss.to(F32) * scale if scaled else loss.to(F32)
            wrt = [t for fqn in trainable for t in leaves[fqn]]
            handles = _hook_backward(scaled_loss.grad_fn) if scaled_loss.grad_fn else []
            try:
                with phase("backward"):
                    grads = torch.autograd.grad(scaled_loss, wrt, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
        by_leaf = dict(zip(map(id, wrt), grads))
        with torch.no_grad():
            g32: dict[str, torch.Tensor] = {}
            with phase("unscale"):
                inv = scale.to(torch.float64).reciprocal().to(F32) if scaled else None
                for fqn in trainable:
                    parts = [by_leaf[id(t)] for t in leaves[fqn] if by_leaf[id(t)] is not None]
                    if not parts:
                        continue  # no gradient reaches it: frozen, as torch.optim skips it
                    with phase("unscale", subject=fqn):
                        g = parts[0].to(F32)
                        for extra in parts[1:]:
                            g = g + extra.to(F32)
                        g32[fqn] = g * inv if scaled else g
            with phase("found_inf"):
                found = scaling.found_inf(list(g32.values())) if g32 else torch.zeros(
                    (), dtype=torch.bool, device=scale.device)
            norm = None
            if max_grad_norm is not None and g32:
                with phase("clip"):
                    norm = torch.linalg.vector_norm(torch.stack(
                        [torch.linalg.vector_norm(g, 2) for g in g32.values()]), 2)
                    coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
                    g32 = {k: g * coef for k, g in g32.items()}
            with phase("update", subject="step count"):
                step_now = st["step"] + 1
            scalars = {}
            for gi, spec in enumerate(plan.groups):
                with phase("update", subject=f"param group {gi}", spec=repr(spec)):
                    scalars[gi] = optim.group_scalars(spec, step_now, lrs[gi])
            new = dict(st)
            for fqn, g in g32.items():
                spec = plan.spec(fqn)
                with phase("update", subject=fqn, spec=repr(spec)):
                    p = fp32_of[fqn]
                    state = {s: st[f"opt.{fqn}.{s}"] for s in spec.state_names}
                    p_new, s_new = optim.update(spec, p, g, state,
                                                scalars[plan.group_of[fqn]])
                with phase("gate", subject=fqn):
                    p_new = torch.where(found, p, p_new)
                    for s, v in s_new.items():
                        new[f"opt.{fqn}.{s}"] = torch.where(found, st[f"opt.{fqn}.{s}"], v)
                if fqn in keep_master:
                    new[f"master.{fqn}"] = p_new
                    if fqn in fwd.working:
                        with phase("working_copy", subject=fqn):
                            new[f"working.{fqn}"] = p_new.to(low)
                else:  # master_weights=False: round the update into the low weights
                    with phase("working_copy", subject=fqn):
                        new[f"working.{fqn}"] = p_new.to(low)
            with phase("gate", subject="buffers and step count"):
                for fqn, v in new_buffers.items():
                    new[f"buffer.{fqn}"] = torch.where(found, st[f"buffer.{fqn}"], v)
                new["step"] = torch.where(found, st["step"], step_now)
            with phase("scale_update"):
                new["scale"], new["growth_tracker"] = scaling.update_scale(
                    ls, scale, st["growth_tracker"], found)
            with phase("outputs"):
                out = [new[k] for k in names]
                out += [loss.detach().to(F32), new["scale"], found]
                if norm is not None:
                    out.append(norm)
        return tuple(out)

    return step


def _finish_graph(gm: fx.GraphModule, program: Program, fwd, layout: Layout, plan, n_lrs: int,
                  n_inputs: int, n_targets: int, clip: bool) -> fx.GraphModule:
    """Drop autograd's no-op detaches, name the inputs, and give every node its record."""
    g = gm.graph
    for n in list(g.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.detach.default:
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
    placeholders = list(g.find_nodes(op="placeholder"))
    roles = ([("state", s) for s in layout.names]
             + [("lr", f"lr{i}") for i in range(n_lrs)]
             + [("input", f"input{i}") for i in range(n_inputs)]
             + [("target", f"target{i}") for i in range(n_targets)])
    for node, (role, name) in zip(placeholders, roles):
        node._rename(name.replace(".", "_"))
        node.target = node.name
        node.meta[MP] = NodeRecord("train_step", precision=val_dtype(node), decided_by="input",
                                   decision=f"step input: {role} {name}")
    fwd_records = {n.name: n.meta[MP] for n in fwd.gm.graph.nodes if MP in n.meta}
    seq_to_fwd: dict[int, str] = {}
    for n in g.nodes:
        c = n.meta.get("custom") or {}
        if "mp_name" in c and n.meta.get("seq_nr") is not None:
            seq_to_fwd.setdefault(n.meta["seq_nr"], c["mp_name"])
    for n in g.nodes:
        if n.op in ("placeholder", "output"):
            continue
        c = n.meta.get("custom") or {}
        out_dtype = val_dtype(n)
        if "mp_name" in c and c["mp_name"] in fwd_records:
            n.meta[MP] = fwd_records[c["mp_name"]]
            continue
        ph = c.get("mp_phase", "inputs")
        if ph == "backward":
            of = seq_to_fwd.get(c.get("mp_of"))
            src = fwd_records.get(of)
            what = (f"gradient of forward node {of} ({src.module or '<model>'})" if src
                    else "gradient accumulation/seed")
            n.meta[MP] = NodeRecord("backward", module=src.module if src else "",
                                    module_type=src.module_type if src else "",
                                    source=src.source if src else "",
                                    precision=out_dtype, decided_by="autograd",
                                    decision=f"{what}: {PHASES['backward']}")
            continue
        detail = PHASES.get(ph, ph)
        subject = c.get("subject", "")
        if subject:
            detail = f"{detail} [{subject}" + (f", {c['spec']}]" if c.get("spec") else "]")
        n.meta[MP] = NodeRecord(ph, precision=out_dtype, decided_by=ph, decision=detail,
                                subject=subject)
    g.output_node().meta[MP] = NodeRecord("train_step")
    gm.recompile()
    return check(gm, "train_step")


# --- report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainReport:
    """The core report of the forward plus what the training graph adds."""

    forward: Any  # inspect.Report
    kernels: tuple  # inspect.KernelInfo of the lowered training graph
    nodes_by_phase: dict[str, int]
    ops_by_phase: dict[str, dict[str, int]]
    updates_per_param: dict[str, int]
    casts: dict[str, int]  # phase -> cast nodes
    fp32_state_bytes: int
    low_state_bytes: int
    state_bytes_by_kind: dict[str, int]
    backward_precision: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["forward"] = self.forward.as_dict()
        return d

    def __str__(self) -> str:
        return f"{self.forward}\n\n{self.training_text()}"

    def training_text(self) -> str:
        """Only what the training graph adds to the forward report."""
        lines = ["training graph, nodes by phase:"]
        for ph, n in self.nodes_by_phase.items():
            lines.append(f"  {ph:<14}{n:>6}   " + ", ".join(
                f"{op.removeprefix('aten.')}×{k}" for op, k in
                sorted(self.ops_by_phase[ph].items(), key=lambda kv: -kv[1])[:6]))
        lines.append("casts in the training graph: " + ", ".join(
            f"{ph} {n}" for ph, n in self.casts.items()))
        lines.append("backward ops by precision: " + ", ".join(
            f"{op.removeprefix('aten.')}: " + "/".join(f"{k} {v}" for k, v in d.items())
            for op, d in self.backward_precision.items()))
        per = self.updates_per_param.values()
        lines.append(f"update nodes per parameter: min {min(per, default=0)}, max "
                     f"{max(per, default=0)} ({len(per)} parameters)")
        if self.kernels:
            lines.append(f"generated kernels in the training graph: {len(self.kernels)}")
            lines += [f"  {k}" for k in self.kernels]
        lines.append(f"state: {self.fp32_state_bytes:,} B in FP32, {self.low_state_bytes:,} B in "
                     "low precision (" + ", ".join(f"{k} {v:,} B" for k, v in
                                                   self.state_bytes_by_kind.items()) + ")")
        return "\n".join(lines)


_DOT_OPS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default",
            "aten.convolution_backward.default", "aten.convolution.default"}


def build_train_report(step: TrainStep, forward_report) -> TrainReport:
    by_phase: Counter = Counter()
    ops: dict = defaultdict(Counter)
    per_param: Counter = Counter()
    casts: Counter = Counter()
    bwd: dict = defaultdict(Counter)
    for n in step.unlowered.graph.nodes:
        if n.op != "call_function" or is_getitem(n):
            continue
        rec = record(n)
        ph = rec.created_by if rec.created_by in PHASES else "forward"
        by_phase[ph] += 1
        ops[ph][str(n.target)] += 1
        if is_cast(n):
            casts[ph] += 1
        if ph == "update" and rec.subject in step.plan.group_of:
            per_param[rec.subject] += 1
        if ph == "backward" and str(n.target) in _DOT_OPS:
            ins = {dtype_name(val_dtype(a)) for a in n.args if isinstance(a, fx.Node)
                   and val_dtype(a) is not None and val_dtype(a).is_floating_point}
            bwd[str(n.target)]["/".join(sorted(ins))] += 1
    kinds: Counter = Counter()
    fp32 = low = 0
    for name, t in zip(step.layout.names, step._state):
        nbytes = t.numel() * t.element_size()
        kinds[name.split(".")[0]] += nbytes
        if t.dtype == step.dtype and t.dtype is not F32:
            low += nbytes
        elif t.dtype is F32:
            fp32 += nbytes
    order = ["forward", *PHASES]
    from .report import kernel_infos

    return TrainReport(
        forward=forward_report, kernels=kernel_infos(step.graph_module),
        nodes_by_phase={k: by_phase[k] for k in order if by_phase[k]},
        ops_by_phase={k: dict(v) for k, v in ops.items()},
        updates_per_param=dict(per_param), casts=dict(casts), fp32_state_bytes=fp32,
        low_state_bytes=low, state_bytes_by_kind=dict(kinds),
        backward_precision={k: dict(v) for k, v in bwd.items()},
    )
