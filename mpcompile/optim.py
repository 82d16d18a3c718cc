"""Optimizers of the compiled training step: specs (frozen, validated) and their update math.

The update functions run inside the traced training step on FP32 masters and FP32 state. They
follow torch.optim's single-tensor formulas op for op (``torch.optim.SGD`` / ``Adam`` / ``AdamW``
with ``foreach=False``), so an all-FP32 step matches torch to rounding. Two deliberate
differences: the learning rate is a graph input (a float64 0-dim tensor, so changing it needs no
recompilation), and a step whose gradients are not finite leaves parameters, state and the step
count untouched (the caller gates the results with ``where``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import TrainStepError


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise TrainStepError(msg)


@dataclass(frozen=True)
class SGD:
    """``torch.optim.SGD``: momentum, dampening, nesterov, weight decay."""

    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _check(_finite(self.lr) and self.lr >= 0, f"SGD: invalid lr {self.lr}")
        _check(self.momentum >= 0, f"SGD: invalid momentum {self.momentum}")
        _check(self.weight_decay >= 0, f"SGD: invalid weight_decay {self.weight_decay}")
        _check(not self.nesterov or (self.momentum > 0 and self.dampening == 0),
               "SGD: nesterov momentum requires a momentum and zero dampening")

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum != 0 else ()


@dataclass(frozen=True)
class Adam:
    """``torch.optim.Adam`` (L2 weight decay added to the gradient)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check(_finite(self.lr) and self.lr >= 0, f"{name}: invalid lr {self.lr}")
        _check(self.eps >= 0, f"{name}: invalid eps {self.eps}")
        _check(all(0 <= b < 1 for b in self.betas), f"{name}: invalid betas {self.betas}")
        _check(self.weight_decay >= 0, f"{name}: invalid weight_decay {self.weight_decay}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class AdamW(Adam):
    """``torch.optim.AdamW`` (decoupled weight decay)."""

    weight_decay: float = 1e-2
    decoupled: bool = field(default=True, repr=False)


Spec = SGD | Adam | AdamW


@dataclass(frozen=True)
class Plan:
    """Which group each trainable parameter is in, and each group's spec."""

    groups: tuple[Spec, ...]
    group_of: dict[str, int]  # parameter FQN -> group index

    def spec(self, fqn: str) -> Spec:
        return self.groups[self.group_of[fqn]]


# Every key a torch optimizer's param group may hold, and what the compiled step does with it:
# honoured (read into the spec), free (an implementation choice with the same results: foreach
# runs the same formulas, checked bit for bit by tests/test_reliability.py), or only its default
# accepted (anything else is refused, naming the option). A key not listed here (an option a
# newer torch adds) is refused too, so nothing is silently ignored.
_HONOURED = {
    "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
    "Adam": ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay"),
    "AdamW": ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay"),
}
_FREE = ("params", "foreach", "initial_lr")  # initial_lr: set by LR schedulers
_DEFAULT_ONLY = {"maximize": False, "amsgrad": False, "differentiable": False, "fused": None,
                 "capturable": False}


def plan_for(optimizer: object, named_params: Sequence[tuple[str, torch.nn.Parameter]]) -> Plan:
    """A :class:`Plan` from a torch optimizer built on the model's parameters, or from one of
    this module's specs (then every trainable parameter is in one group)."""
    trainable = [(n, p) for n, p in named_params if p.requires_grad]
    if isinstance(optimizer, (SGD, Adam, AdamW)):
        return Plan((optimizer,), {n: 0 for n, _ in trainable})
    kinds = {torch.optim.SGD: SGD, torch.optim.Adam: Adam, torch.optim.AdamW: AdamW}
    kind = kinds.get(type(optimizer))
    if kind is None:
        raise TrainStepError(
            f"optimizer {type(optimizer).__name__} is not supported by compile_train_step; use "
            "torch.optim.SGD, Adam or AdamW (or mpcompile.optim.SGD/Adam/AdamW)"
        )
    name_of = {id(p): n for n, p in named_params}
    groups: list[Spec] = []
    group_of: dict[str, int] = {}
    for gi, g in enumerate(optimizer.param_groups):
        _check_options(type(optimizer).__name__, gi, g)
        if kind is SGD:
            spec = SGD(lr=g["lr"], momentum=g["momentum"], dampening=g["dampening"],
                       nesterov=g["nesterov"], weight_decay=g["weight_decay"])
        else:
            decoupled = bool(g.get("decoupled_weight_decay", kind is AdamW))
            spec = (AdamW if decoupled else Adam)(
                lr=g["lr"], betas=tuple(g["betas"]), eps=g["eps"],
                weight_decay=g["weight_decay"])
        groups.append(spec)
        for p in g["params"]:
            if not p.requires_grad:
                continue  # frozen: torch.optim skips a parameter without a gradient
            if id(p) not in name_of:
                raise TrainStepError(
                    f"the optimizer's param group {gi} holds a tensor of shape "
                    f"{tuple(p.shape)} that is not a parameter of the model: build the "
                    "optimizer on model.parameters()"
                )
            group_of[name_of[id(p)]] = gi
    missing = [n for n, _ in trainable if n not in group_of]
    if missing:
        raise TrainStepError(
            f"parameters {missing} require grad but are not in the optimizer: add them, or set "
            "requires_grad=False to freeze them"
        )
    for g in optimizer.param_groups:
        for p in g["params"]:
            if optimizer.state.get(p):
                raise TrainStepError(
                    f"{type(optimizer).__name__} already has state for {name_of[id(p)]}: "
                    "compile the step from a fresh optimizer (resume with TrainStep.load)"
                )
    return Plan(tuple(groups), group_of)


def _check_options(kind: str, gi: int, group: dict) -> None:
    """Refuse any option of a param group the compiled step does not honour exactly."""
    for key, value in group.items():
        if key in _HONOURED[kind] or key in _FREE:
            if key == "lr" and isinstance(value, torch.Tensor):
                raise TrainStepError(f"param group {gi}: a tensor lr is not supported; use a "
                                     "float (the step takes the lr as a graph input anyway)")
            continue
        if key in _DEFAULT_ONLY and value == _DEFAULT_ONLY[key]:
            continue
        why = ("selects torch's fused kernel, whose rounding differs from the formulas the "
               "compiled step reproduces" if key == "fused" else
               "is not implemented by the compiled step")
        raise TrainStepError(
            f"{kind}({key}={value!r}) {why} (param group {gi}); remove the option or train "
            "with torch.optim directly")


def init_state(spec: Spec, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """FP32 optimizer state for one parameter (zeros, as torch creates it)."""
    return {name: torch.zeros_like(param, dtype=torch.float32) for name in spec.state_names}


def group_scalars(spec: Spec, step: torch.Tensor, lr: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 0-dim quantities one param group's update needs, computed once per group.

    ``step`` is the float32 count *including* this step (1 on the first); ``lr`` a float64
    0-dim tensor. Scalars are computed in float64 and rounded to float32 where torch passes a
    Python float (a double) to a float32 kernel."""
    if isinstance(spec, SGD):
        return {"neg_lr": lr.neg().to(torch.float32), "first": step == 1}
    beta1, beta2 = spec.betas
    step64 = step.to(torch.float64)
    bias_correction1 = 1 - torch.pow(beta1, step64)
    bias_correction2 = 1 - torch.pow(beta2, step64)
    out = {"neg_step_size": (-(lr / bias_correction1)).to(torch.float32),
           "bias_correction2_sqrt": bias_correction2.sqrt().to(torch.float32)}
    if spec.decoupled and spec.weight_decay != 0:
        out["decay"] = (1 - lr * spec.weight_decay).to(torch.float32)
    return out


def update(spec: Spec, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor],
           scalars: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step on an FP32 master ``p`` with FP32 gradient ``g``; returns the new
    parameter and state (nothing is modified in place)."""
    if isinstance(spec, SGD):
        return _sgd(spec, p, g, state, scalars)
    return _adam(spec, p, g, state, scalars)


def _sgd(spec: SGD, p, g, state, sc):
    if spec.weight_decay != 0:
        g = g.add(p, alpha=spec.weight_decay)
    new_state = {}
    if spec.momentum != 0:
        # torch starts the buffer as a copy of the first gradient, then mul/add
        later = state["momentum_buffer"].mul(spec.momentum).add(g, alpha=1 - spec.dampening)
        buf = torch.where(sc["first"], g, later)
        new_state["momentum_buffer"] = buf
        g = g.add(buf, alpha=spec.momentum) if spec.nesterov else buf
    # torch's p.add_(g, alpha=-lr) is one fused multiply-add; addcmul with the lr tensor is the
    # same single rounding, with lr a graph input
    return torch.addcmul(p, g, sc["neg_lr"]), new_state


def _adam(spec: Adam, p, g, state, sc):
    beta1, beta2 = spec.betas
    if spec.weight_decay != 0:
        if spec.decoupled:
            p = p * sc["decay"]
        else:
            g = g.add(p, alpha=spec.weight_decay)
    exp_avg = state["exp_avg"].lerp(g, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"].mul(beta2).addcmul(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / sc["bias_correction2_sqrt"]).add(spec.eps)
    # addcdiv(p, m, d, value=-step_size) computes p + (value * m) / d
    new_p = p + (sc["neg_step_size"] * exp_avg) / denom
    return new_p, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
