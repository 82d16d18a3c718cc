"""The training step's state: what each entry is, its name, its initial value.

The state is one flat list of tensors, the step graph's first inputs and first outputs, in the
order of :class:`StateLayout`. Names are ``<kind>.<parameter or buffer FQN>[.<slot>]``:
``master.fc.weight``, ``working.fc.weight``, ``opt.fc.weight.exp_avg``,
``buffer.bn.running_mean``, and ``scale``, ``growth_tracker``, ``step``. With sharded FP32 state
(ZeRO-1) the masters and optimizer state of the sharded parameters are one flat tensor per
optimizer group instead, this rank's slice: ``master.@shard.group0``,
``opt.@shard.group0.exp_avg`` (see ``distributed.ShardPlan``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import optim, scaling
from ..errors import TrainStepError
from . import distributed

F32 = torch.float32

# what the step graph returns after the new state, in order (grad_norm only with clipping,
# grad_zeros and grad_nonfinite only with grad_stats=True)
OUTPUTS = ("loss", "loss_scale", "skipped", "grad_norm", "grad_zeros", "grad_nonfinite")


def outputs(clipping: bool, grad_stats: bool) -> tuple[str, ...]:
    """The names of the step graph's outputs after the new state."""
    return tuple(n for n in OUTPUTS if (n != "grad_norm" or clipping)
                 and (n not in ("grad_zeros", "grad_nonfinite") or grad_stats))


class StateKind(str, enum.Enum):
    MASTER = "master"  # FP32 master weight
    WORKING = "working"  # low-precision working copy the forward reads
    OPT = "opt"  # FP32 optimizer state (momentum, exp_avg, ...)
    BUFFER = "buffer"  # a model buffer (batch-norm statistics)
    SCALE = "scale"  # the loss scale
    GROWTH = "growth_tracker"  # clean steps since the last scale change
    STEP = "step"  # optimizer steps taken

    def __str__(self) -> str:
        return self.value


_SCALARS = (StateKind.SCALE, StateKind.GROWTH, StateKind.STEP)


def key(kind: StateKind, fqn: str = "", slot: str = "") -> str:
    """The state name of ``kind`` for parameter/buffer ``fqn`` (and optimizer ``slot``)."""
    if kind in _SCALARS:
        return kind.value
    return f"{kind.value}.{fqn}" + (f".{slot}" if slot else "")


@dataclass(frozen=True)
class StateLayout:
    """The flat order of the step's state, and what each entry is."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise TrainStepError(f"state names repeat: {self.names}")

    def index(self, name: str) -> int:
        return self.names.index(name)

    def kind(self, name: str) -> StateKind:
        return StateKind(name if name in {k.value for k in _SCALARS} else name.split(".")[0])

    def of_kind(self, kind: StateKind) -> dict[str, str]:
        """FQN -> state name of every entry of ``kind`` (optimizer slots keep their suffix)."""
        prefix = f"{kind.value}."
        return {n.removeprefix(prefix): n for n in self.names if n.startswith(prefix)}

    def __contains__(self, name: object) -> bool:
        return name in self.names


def build(model: torch.nn.Module, plan: optim.Plan, working: Sequence[str],
          keep_master: Sequence[str], low: torch.dtype,
          loss_scale: scaling.LossScale, shards: distributed.ShardPlan | None = None
          ) -> tuple[StateLayout, list[torch.Tensor]]:
    """The layout and the initial state: FP32 masters, working copies rounded from them,
    zero optimizer state, the buffers, the initial scale and zero counters.

    An FP32 parameter *is* its master (the state tensor shares its storage) and a buffer is
    its own state entry: the step updates them in place, so the model trains as under
    torch.optim and no second FP32 copy of the weights is held.

    With ``shards``, the sharded parameters' masters and optimizer state are this rank's flat
    slices per group (cut from the model's parameters); their working copies stay whole."""
    params = dict(model.named_parameters())
    names: list[str] = []
    values: list[torch.Tensor] = []

    def add(name: str, value: torch.Tensor) -> None:
        names.append(name)
        values.append(value)

    sharded = set(shards.sharded) if shards is not None else set()
    for fqn in keep_master:
        if fqn not in sharded:
            add(key(StateKind.MASTER, fqn), _shared(params[fqn], F32))
    flat = {g: shards.shard(g, params) for g in shards.groups} if shards is not None else {}
    for g, t in flat.items():
        add(key(StateKind.MASTER, distributed.shard_fqn(g)), t)
    for fqn in working:
        add(key(StateKind.WORKING, fqn), params[fqn].detach().to(low).clone())
    for fqn, gi in plan.group_of.items():
        if fqn in sharded:
            continue
        for slot, t in optim.init_state(plan.groups[gi], params[fqn]).items():
            add(key(StateKind.OPT, fqn, slot), t)
    for g, t in flat.items():
        for slot, z in optim.init_state(plan.groups[g], t).items():
            add(key(StateKind.OPT, distributed.shard_fqn(g), slot), z)
    for fqn, b in model.named_buffers():
        add(key(StateKind.BUFFER, fqn), _shared(b, b.dtype))
    dev = values[0].device if values else torch.device("cpu")
    add(key(StateKind.SCALE), torch.tensor(scaling.initial_scale(loss_scale), dtype=F32,
                                           device=dev))
    add(key(StateKind.GROWTH), torch.tensor(0, dtype=torch.int32, device=dev))
    add(key(StateKind.STEP), torch.tensor(0, dtype=torch.int64, device=dev))  # exact past 2^24
    return StateLayout(tuple(names)), values


def _shared(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` itself (its storage, without autograd) when it already is a contiguous ``dtype``
    tensor, else a converted copy."""
    d = t.detach()
    if d.dtype == dtype and d.is_contiguous():
        return d
    return d.to(dtype).contiguous().clone()
