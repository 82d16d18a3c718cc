"""The phases of a training step after backward, each a small pure function traced into the
step graph (Micikevicius et al. 2018; dynamic scaling as torch.amp.GradScaler).

    unscale -> found_inf -> [clip] -> update (FP32 master and state) -> gate -> working copy
    -> scale update

Nothing here mutates its arguments; the caller names the results.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import optim, scaling

F32 = torch.float32


def scale_loss(loss: torch.Tensor, scale: torch.Tensor, scaled: bool) -> torch.Tensor:
    """The loss in FP32, times S when loss scaling is on (what backward is seeded from)."""
    return loss.to(F32) * scale if scaled else loss.to(F32)


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1/S computed in float64, rounded once to float32 (GradScaler's reciprocal)."""
    return scale.to(torch.float64).reciprocal().to(F32)


def unscale(parts: Sequence[torch.Tensor], inv_scale: torch.Tensor | None) -> torch.Tensor:
    """One parameter's gradient in FP32: the sum of its parts (a parameter used twice gets two)
    widened to FP32 first, then times 1/S."""
    g = parts[0].to(F32)
    for extra in parts[1:]:
        g = g + extra.to(F32)
    return scaling.unscale(g, inv_scale) if inv_scale is not None else g


def found_inf(grads: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """bool 0-dim: some unscaled gradient holds an inf or NaN (False when nothing trains)."""
    if not grads:
        return torch.zeros((), dtype=torch.bool, device=device)
    return scaling.found_inf(list(grads))


def clip(grads: dict[str, torch.Tensor], max_norm: float
         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """torch.nn.utils.clip_grad_norm_'s rule on the unscaled gradients: (clipped, total norm)."""
    norm = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g, 2) for g in grads.values()]), 2)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {k: g * coef for k, g in grads.items()}, norm


def squared_norm(grads: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of squares of every element of ``grads`` (FP32 0-dim)."""
    if not grads:
        return torch.zeros((), dtype=F32, device=device)
    return torch.stack([torch.linalg.vector_norm(g, 2) ** 2 for g in grads]).sum()


def clip_by(grads: dict[str, torch.Tensor], shards: Sequence[torch.Tensor], max_norm: float,
            total_sq: torch.Tensor
            ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """:func:`clip` with the squared total norm given (sharded state: summed over the ranks):
    (clipped gradients, clipped shards, total norm)."""
    norm = total_sq.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {k: g * coef for k, g in grads.items()}, [s * coef for s in shards], norm


def grad_counts(groups: Sequence[Sequence[torch.Tensor]], extra_zeros: Sequence[int],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero elements, non-finite elements) of the unscaled gradients per parameter group, int64
    vectors; ``extra_zeros[g]`` is added to group g's zeros (elements of parameters no gradient
    reaches; negative: a shard's padding, zeros that are not gradients). On the device:
    nothing is read here."""
    zeros, bad = [], []
    for g, ts in enumerate(groups):
        z = torch.zeros((), dtype=torch.int64, device=device)
        n = torch.zeros((), dtype=torch.int64, device=device)
        for t in ts:
            z = z + (t == 0).sum()
            n = n + (~torch.isfinite(t)).sum()
        zeros.append(z + extra_zeros[g])
        bad.append(n)
    return torch.stack(zeros), torch.stack(bad)


def update(spec: optim.Spec, master: torch.Tensor, grad: torch.Tensor,
           state: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor]
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The optimizer's step on the FP32 master and FP32 state."""
    return optim.update(spec, master, grad, state, scalars)


def gate(found: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``old`` where the step is skipped, else ``new``: skipping changes no bit of state."""
    return torch.where(found, old, new)


def working_copy(master: torch.Tensor, low: torch.dtype) -> torch.Tensor:
    """The low-precision copy the next forward and backward read, rounded once."""
    return master.to(low)


def scale_update(ls: scaling.LossScale, scale: torch.Tensor, tracker: torch.Tensor,
                 found: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(new scale, new good-step counter)."""
    return scaling.update_scale(ls, scale, tracker, found)
