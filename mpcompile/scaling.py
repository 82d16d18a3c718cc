"""Loss scaling as graph ops (Micikevicius et al. 2018, section 3.2; dynamic scaling as in
torch.amp.GradScaler): scale, unscale in FP32, find non-finite gradients, update the scale.

Everything here is a pure function of tensors, traced into the training graph; no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import TrainStepError


@dataclass(frozen=True)
class DynamicLossScale:
    """Dynamic loss scaling: on a step with non-finite gradients the update is skipped and the
    scale multiplied by ``backoff_factor``; after ``growth_interval`` clean steps in a row it is
    multiplied by ``growth_factor`` (if the result is finite). Defaults are GradScaler's, plus a
    floor: the scale never drops below ``min_scale`` (1.0, as DeepSpeed's ``min_loss_scale``), so
    a run of non-finite batches cannot drive it to 0 and skip every later step. Scales are
    checked as the float32 the step stores them in."""

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float | None = 1.0
    max_scale: float | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise TrainStepError(f"DynamicLossScale: {msg}")

        if not _positive_float32(self.init_scale):
            bad(f"init_scale must be positive and finite as a float32, got {self.init_scale}")
        if not self.growth_factor > 1:
            bad(f"growth_factor must be > 1, got {self.growth_factor}")
        if not 0 < self.backoff_factor < 1:
            bad(f"backoff_factor must be in (0, 1), got {self.backoff_factor}")
        if not (isinstance(self.growth_interval, int) and self.growth_interval >= 1):
            bad(f"growth_interval must be an int >= 1, got {self.growth_interval}")
        lo, hi = self.min_scale, self.max_scale
        for name, v in (("min_scale", lo), ("max_scale", hi)):
            if v is not None and not _positive_float32(v):
                bad(f"{name} must be positive and finite as a float32 (or None), got {v}")
        if lo is not None and hi is not None and lo > hi:
            bad(f"min_scale {lo} > max_scale {hi}")
        if lo is not None and not self.init_scale >= lo:
            bad(f"init_scale {self.init_scale} is below min_scale {lo}")


@dataclass(frozen=True)
class StaticLossScale:
    scale: float

    def __post_init__(self) -> None:
        if not _positive_float32(self.scale):
            raise TrainStepError(
                f"loss_scale must be positive and finite as a float32, got {self.scale}")


LossScale = DynamicLossScale | StaticLossScale | None


def _positive_float32(x: object) -> bool:
    """Positive and finite once stored as the float32 the step keeps scales in (1e39 is inf
    there, 1e-50 is 0)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    v = float(torch.tensor(float(x), dtype=torch.float32))
    return v > 0 and math.isfinite(v)


def resolve(loss_scale: object, low: torch.dtype) -> LossScale:
    """``"dynamic"`` | float | None | DynamicLossScale -> a LossScale; ``"default"`` is dynamic
    for float16 and None for bfloat16/float32 (BF16 has FP32's exponent range)."""
    if isinstance(loss_scale, str):
        if loss_scale == "default":
            return DynamicLossScale() if low is torch.float16 else None
        if loss_scale == "dynamic":
            return DynamicLossScale()
        raise TrainStepError(
            f"loss_scale={loss_scale!r}: use 'dynamic', a number, None or DynamicLossScale(...)"
        )
    if loss_scale is None or isinstance(loss_scale, DynamicLossScale):
        return loss_scale
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
        return StaticLossScale(float(loss_scale))
    raise TrainStepError(
        f"loss_scale={loss_scale!r}: use 'dynamic', a number, None or DynamicLossScale(...)"
    )


def initial_scale(ls: LossScale) -> float:
    if isinstance(ls, DynamicLossScale):
        return ls.init_scale
    if isinstance(ls, StaticLossScale):
        return ls.scale
    return 1.0


def unscale(grad: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """The gradient in FP32, divided by the scale (as GradScaler: times 1/scale)."""
    return grad.to(torch.float32) * inv_scale


def found_inf(grads: list[torch.Tensor]) -> torch.Tensor:
    """A bool 0-dim tensor: does any gradient hold an inf or NaN?

    The largest magnitude of a tensor (``vector_norm(g, inf)``, one reduction per gradient, no
    temporary) is inf when an element is and NaN when an element is (max propagates NaN), so
    "the largest of them is not finite" is exactly "some element is not finite". (A cheaper
    ``isnan(sum(0 * g))`` is wrong under a compiler: Inductor folds ``0 * g`` to 0.)"""
    top = torch.stack([torch.linalg.vector_norm(g, float("inf")) for g in grads]).amax(0)
    return ~torch.isfinite(top)


def update_scale(ls: LossScale, scale: torch.Tensor, tracker: torch.Tensor,
                 found: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(new scale, new good-step counter), GradScaler's rule plus optional min/max clamps."""
    if not isinstance(ls, DynamicLossScale):
        return scale, tracker
    successful = tracker + 1
    grow = successful >= ls.growth_interval
    grown = scale * ls.growth_factor
    grown = torch.where(torch.isinf(grown), scale, grown)  # positive: only +inf possible
    new_scale = torch.where(found, scale * ls.backoff_factor, torch.where(grow, grown, scale))
    if ls.min_scale is not None or ls.max_scale is not None:
        new_scale = new_scale.clamp(min=ls.min_scale, max=ls.max_scale)
    new_tracker = torch.where(found | grow, torch.zeros_like(tracker), successful)
    return new_scale, new_tracker
