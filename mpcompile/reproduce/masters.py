"""Claim (b): FP32 master weights (paper section 3.1). Without them an update smaller than half
an FP16 ulp of its weight (about 2^-12 of the weight) is rounded away.

The digits CNN trained with plain SGD (update = lr x gradient) by the compiled step in FP16
(dynamic loss scaling), with FP32 masters and with ``master_weights=False`` (the optimizer's
FP32 result rounded straight into the FP16 weights), at several learning rates, beside an eager
FP32 torch run. After every step the lost updates are counted among the weights that have an
FP16 working copy: a weight is *lost* when the FP32 update ``lr * g`` is nonzero (``g``: torch
autograd's FP32 gradient at the weights the step started from, on the same batch) but the
weight the optimizer holds (the FP32 master, or the FP16 weight without masters) did not
change."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import digits
from ..train.layout import StateKind, key
from . import common, training

FULL_LRS = (1e-1, 1e-2, 1e-3, 1e-4)
PAPER = ("Mandarin speech model: training with FP16 weights and no FP32 master copy lost 80 % "
         "relative accuracy; an update below 2^-24 is zero in FP16, and one below 2^-11 of "
         "its weight is swamped (section 3.1)")


@dataclass(frozen=True)
class LrRun:
    """One learning rate: the FP32 oracle and the compiled FP16 step with and without
    masters; the lost-update fraction of each FP16 run, over all steps together."""

    lr: float
    fp32: training.Curve
    masters: training.Curve
    no_masters: training.Curve
    lost_masters: float
    lost_no_masters: float

    def relative_accuracy_loss(self) -> float:
        """1 - (accuracy without masters / FP32's): the paper's metric."""
        return 1 - self.no_masters.test_accuracy / self.fp32.test_accuracy


@dataclass(frozen=True)
class MastersResult:
    runs: tuple[LrRun, ...]
    epochs: int
    observe_every: int = 1

    def at(self, lr: float) -> LrRun:
        for r in self.runs:
            if r.lr == lr:
                return r
        raise KeyError(lr)


def lost_updates(seed: int, lr: float):
    """An ``observe`` callback for :func:`training.compiled`: (lost, nonzero) counts of one step
    (see the module docstring)."""
    reference = digits.build_cnn(seed).train()

    def observe(step, before, x, y) -> tuple[int, int]:
        names = step.layout.names
        held = {}
        with torch.no_grad():
            for fqn, p in reference.named_parameters():
                master, working = key(StateKind.MASTER, fqn), key(StateKind.WORKING, fqn)
                src = master if master in names else working
                p.copy_(before[names.index(src)].float())
                if working in names:
                    held[fqn] = src
        reference.zero_grad(set_to_none=True)
        digits.loss_fn(reference(x), y).backward()
        lost = nonzero = 0
        for fqn, p in reference.named_parameters():
            if fqn not in held:
                continue
            i = names.index(held[fqn])
            moving = (lr * p.grad) != 0
            unchanged = before[i] == step.state[i]
            nonzero += int(moving.sum())
            lost += int((moving & unchanged).sum())
        return lost, nonzero

    return observe


def _fraction(curve: training.Curve) -> float:
    lost = sum(a for a, _ in curve.observed)
    nonzero = sum(b for _, b in curve.observed)
    return lost / nonzero if nonzero else 0.0


def measure(lrs: tuple[float, ...] = FULL_LRS, epochs: int = 50, seed: int = 0,
            observe_every: int = 1, progress: bool = False) -> MastersResult:
    """Train at each learning rate (FP32 oracle, masters, no masters) and count lost updates
    on every ``observe_every``-th step."""
    data = digits.load()
    pbar = common.bar(3 * len(lrs), "(b) masters", progress)
    runs = []
    try:
        for lr in lrs:
            fp32 = training.eager_fp32(data, seed=seed, epochs=epochs, lr=lr, pbar=pbar)
            curves = [training.compiled(data, label, seed=seed, epochs=epochs, lr=lr,
                                        master_weights=mw, observe=lost_updates(seed, lr),
                                        observe_every=observe_every, pbar=pbar)
                      for label, mw in (("FP32 masters", True), ("no masters", False))]
            runs.append(LrRun(lr, fp32, *curves, _fraction(curves[0]), _fraction(curves[1])))
    finally:
        common.close(pbar)
    return MastersResult(tuple(runs), epochs, observe_every)


def table(r: MastersResult) -> str:
    n = max(1, len(r.runs[0].fp32.losses) // 10)
    header = ["lr", "lost updates: masters", "lost updates: no masters",
              "last loss FP32 / masters / no masters", "test acc. % FP32 / masters / no masters",
              "relative acc. loss without masters"]
    rows = [(f"{x.lr:g}", f"{100 * x.lost_masters:.2f} %", f"{100 * x.lost_no_masters:.1f} %",
             " / ".join(f"{c.mean_loss(last=n):.3f}" for c in (x.fp32, x.masters, x.no_masters)),
             " / ".join(f"{c.test_accuracy:.1f}" for c in (x.fp32, x.masters, x.no_masters)),
             f"{100 * x.relative_accuracy_loss():.1f} %") for x in r.runs]
    every = "every step" if r.observe_every == 1 else f"every {r.observe_every}th step"
    return (f"Digits CNN, plain SGD, batch 64, {r.epochs} epoch(s) = "
            f"{len(r.runs[0].fp32.losses)} steps, FP16 with dynamic loss scaling. Lost updates "
            f"(counted on {every}): fraction of the (weight, step) pairs with a nonzero FP32 "
            "update whose weight did not change, over the weights with an FP16 working copy. "
            f"Last loss: mean of the last {n} steps. "
            "Relative accuracy loss: 1 - acc(no masters) / acc(FP32).\n\n"
            + common.markdown_table(header, rows))


def plot(r: MastersResult, path: Path) -> Path:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(r.runs), figsize=(3.2 * len(r.runs), 3.4), sharey=True,
                             squeeze=False)
    for ax, x in zip(axes[0], r.runs):
        ax.plot(x.fp32.losses, color="black", lw=1.5, label="FP32 (eager torch)")
        ax.plot(x.masters.losses, lw=1, label="FP16, FP32 masters")
        ax.plot(x.no_masters.losses, lw=1, label="FP16, no masters")
        ax.set_title(f"lr {x.lr:g}: lost {100 * x.lost_no_masters:.0f} % vs "
                     f"{100 * x.lost_masters:.1f} %", fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("(b) FP32 master weights vs FP16 weights only (plain SGD)")
    return common.save_figure(fig, path)


def run(out_dir: Path, *, tiny: bool = False, progress: bool = False
        ) -> tuple[MastersResult, list[Path]]:
    """Measure (tiny: lr 1e-1 and 1e-3, 1 epoch, every step counted; full: 1e-1..1e-4, 50
    epochs, lost updates counted on every 5th step) and write ``b.md``, ``b.png``."""
    result = (measure((1e-1, 1e-3), epochs=1, progress=progress) if tiny else
              measure(FULL_LRS, epochs=50, observe_every=5, progress=progress))
    md = f"# (b) FP32 master weights\n\nPaper: {PAPER}.\n\n" + table(result)
    return result, [common.write_text(out_dir / "b.md", md), plot(result, out_dir / "b.png")]
