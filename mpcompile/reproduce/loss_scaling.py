"""Claim (c): loss scaling rescues a model whose gradients underflow FP16 (paper section 3.2,
Figure 3: most of SSD's activation gradients lie below FP16's smallest subnormal, 2^-24).

The model: the digits CNN (:mod:`mpcompile.digits`) with its loss multiplied by ``SMALL``
(2^-20), so every gradient is 2^20 times smaller than usual, and SGD's learning rate multiplied
by 2^20 so that in FP32 the training is exactly the usual one. Then:

- the numerics profiler (:func:`mpcompile.numerics.profile`, FP32 steps) gives the Figure-3
  histogram of the activation gradients and the fraction of nonzero gradients that FP16 flushes
  to zero or overflows at each static scale, and its recommended scale range;
- the compiled FP16 step (FP32 masters) trains with ``loss_scale`` = each static scale and
  ``"dynamic"``, beside an eager FP32 torch run over the same batches (the oracle). Each run's
  verdict is computed from what happened: skipped steps, whether any weight moved, how its last
  losses and test accuracy compare with FP32's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import digits
from . import common, training

SMALL = 2.0**-20
OVERSIZED = 2.0**40  # S * max|g| far above 65504: every step overflows
SCALES: tuple[Any, ...] = (1.0, 8.0, 2.0**10, 2.0**15, OVERSIZED, "dynamic")
LR = 0.05  # the effective learning rate (the optimizer's is LR / SMALL)
MOMENTUM = 0.9
PAPER = ("SSD trained in FP16 without loss scaling diverges (most of its activation gradients "
         "lie below FP16's smallest subnormal, 2^-24, Figure 3); a loss scale of 8 recovers "
         "it (section 3.2)")


@dataclass(frozen=True)
class ScaleRun:
    """One loss scale: what the profiler predicts (FP16, activation and weight gradients) and
    what training did."""

    scale: Any  # a float (static) or "dynamic"
    flushed_activation_grads: float | None  # None for "dynamic" (the scale changes)
    flushed_weight_grads: float | None
    overflowed_grads: float | None
    curve: training.Curve
    moved: float  # fraction of the parameters' elements that changed in training
    verdict: str

    @property
    def label(self) -> str:
        return "dynamic" if self.scale == "dynamic" else f"S={common.fmt_pow2(self.scale)}"


@dataclass(frozen=True)
class LossScalingResult:
    runs: tuple[ScaleRun, ...]
    fp32: training.Curve
    recommended: tuple[float, float]  # the profiler's (low, high) FP16 scale range
    profile: Any  # the NumericsProfile
    epochs: int

    def run(self, scale: Any) -> ScaleRun:
        for r in self.runs:
            if r.scale == scale:
                return r
        raise KeyError(scale)


def moved_fraction(seed: int, trained: torch.nn.Module) -> float:
    """Fraction of parameter elements of ``trained`` that differ from ``digits.build_cnn(seed)``."""
    init = dict(digits.build_cnn(seed).named_parameters())
    changed = total = 0
    for name, p in trained.named_parameters():
        changed += int((p.detach() != init[name].detach()).sum())
        total += p.numel()
    return changed / total


def verdict(curve: training.Curve, fp32: training.Curve, moved: float) -> str:
    """What a run did, in words, from its numbers: ``skips (overflow)`` (over half skipped),
    ``stalls`` (no weight moved), ``matches FP32`` (test accuracy within 2 points and last
    losses within 25 % of FP32's), ``diverges`` (last losses above the first), else
    ``trains, lags FP32``."""
    n = max(1, len(curve.losses) // 10)
    if curve.skips > len(curve.skipped) / 2:
        return "skips (overflow)"
    if moved == 0:
        return "stalls: no weight moved"
    last, ref = curve.mean_loss(last=n), fp32.mean_loss(last=n)
    if abs(curve.test_accuracy - fp32.test_accuracy) <= 2 and last <= 1.25 * ref + 0.02:
        return "matches FP32"
    if last > curve.mean_loss(first=n):
        return "diverges"
    return "trains, lags FP32"


def measure(epochs: int = 5, seed: int = 0, scales: tuple = SCALES, profile_steps: int = 3,
            progress: bool = False) -> LossScalingResult:
    from ..numerics import profile

    data = digits.load()
    static = tuple(s for s in scales if s != "dynamic")
    pbar = common.bar(len(scales) + 2, "(c) scaling", progress)
    try:
        x, y = data.x_train[:64], data.y_train[:64]
        prof = profile(digits.build_cnn(seed), x, y, training.scaled_loss(SMALL),
                       steps=profile_steps, lr=LR / SMALL, loss_scales=static)
        common.tick(pbar, what="profile")
        lo, hi = prof.recommended_scale(torch.float16)
        fp32 = training.eager_fp32(data, seed=seed, epochs=epochs, lr=LR / SMALL,
                                   momentum=MOMENTUM, loss_factor=SMALL)
        common.tick(pbar, what="fp32")
        runs = []
        for s in scales:
            curve = training.compiled(data, "dynamic" if s == "dynamic" else f"S={s:g}",
                                      seed=seed, epochs=epochs, lr=LR / SMALL,
                                      momentum=MOMENTUM, loss_scale=s, loss_factor=SMALL)
            moved = moved_fraction(seed, curve.model)
            st = s != "dynamic"
            runs.append(ScaleRun(
                s,
                prof.flushed(torch.float16, s, "activation_grad") if st else None,
                prof.flushed(torch.float16, s, "weight_grad") if st else None,
                prof.overflowed(torch.float16, s, ("activation_grad", "weight_grad"))
                if st else None,
                curve, moved, verdict(curve, fp32, moved)))
            common.tick(pbar, what=runs[-1].label)
    finally:
        common.close(pbar)
    return LossScalingResult(tuple(runs), fp32, (lo, hi), prof, epochs)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def table(r: LossScalingResult) -> str:
    n = max(1, len(r.fp32.losses) // 10)
    header = ["loss scale", "FP16-flushed act. grads", "FP16-flushed weight grads",
              "overflowed grads", "skipped steps", "weights moved", "first loss", "last loss",
              "test acc. %", "verdict"]
    rows = [("FP32 (eager torch)", "-", "-", "-", 0, "-", f"{r.fp32.mean_loss(first=n):.3f}",
             f"{r.fp32.mean_loss(last=n):.3f}", f"{r.fp32.test_accuracy:.1f}", "reference")]
    rows += [(run.label, _pct(run.flushed_activation_grads), _pct(run.flushed_weight_grads),
              _pct(run.overflowed_grads), f"{run.curve.skips}/{len(run.curve.skipped)}",
              f"{100 * run.moved:.1f} %", f"{run.curve.mean_loss(first=n):.3f}",
              f"{run.curve.mean_loss(last=n):.3f}", f"{run.curve.test_accuracy:.1f}",
              run.verdict) for run in r.runs]
    lo, hi = r.recommended
    return (f"Digits CNN, loss x 2^{_log2(SMALL)}, SGD (effective lr {LR}, momentum "
            f"{MOMENTUM}), {r.epochs} epoch(s) = {len(r.fp32.losses)} steps, FP16 with FP32 "
            f"masters. Flushed/overflowed: the profiler ({r.profile.steps} FP32 steps), "
            f"fraction of nonzero gradients that become 0/inf in FP16 at that scale. "
            f"First/last loss: mean of the first/last {n} steps (cross-entropy, the x2^"
            f"{_log2(SMALL)} undone). Profiler's recommended FP16 scale range: "
            f"{common.fmt_pow2(lo)} .. {common.fmt_pow2(hi)}.\n\n"
            + common.markdown_table(header, rows))


def _log2(x: float) -> int:
    return int(math.log2(x))


def plot_losses(r: LossScalingResult, path: Path) -> Path:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(r.fp32.losses, color="black", lw=2, label="FP32 (eager torch)")
    for run in r.runs:
        ax.plot(run.curve.losses, lw=1, label=f"{run.label}: {run.verdict}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"(c) loss x 2^{_log2(SMALL)}: FP16 training at each loss scale")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return common.save_figure(fig, path)


def run(out_dir: Path, *, tiny: bool = False, progress: bool = False
        ) -> tuple[LossScalingResult, list[Path]]:
    """Measure (tiny: 1 epoch, 1 profiled step; full: 5 epochs, 3) and write ``c.md``,
    ``c_histogram.png`` (Figure 3: activation gradients at S=1) and ``c_loss.png``."""
    result = measure(epochs=1 if tiny else 5, profile_steps=1 if tiny else 3, progress=progress)
    md = (f"# (c) Loss scaling\n\nPaper: {PAPER}.\n\n" + table(result)
          + "\n" + result.profile.text(top=5).replace("\n", "\n    ").join(["\n    ", "\n"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    hist = Path(result.profile.plot(out_dir / "c_histogram.png", "activation_grad",
                                    torch.float16, 1.0))
    return result, [common.write_text(out_dir / "c.md", md), hist,
                    plot_losses(result, out_dir / "c_loss.png")]
