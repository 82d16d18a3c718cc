"""Claim (a): mixed precision trains to FP32's accuracy (paper section 4.1, Table 1).

The digits CNN (:mod:`mpcompile.digits`) trained by :func:`mpcompile.digits.train` (the whole
step compiled by :func:`mpcompile.compile_train_step`) in FP32, FP16 (FP32 masters, dynamic loss
scaling) and BF16 (FP32 masters, no scaling), with the same hyperparameters, initial weights and
batch order per seed; test accuracy of the trained FP32 masters and of the mixed-precision
forward (what a deployed FP16/BF16 model predicts), mean and standard deviation over seeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import digits
from . import common

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABELS = {torch.float32: "FP32", torch.float16: "FP16 (masters + dynamic scale)",
          torch.bfloat16: "BF16 (masters)"}
PAPER = ("six ImageNet CNNs (AlexNet, VGG-D, GoogLeNet, Inception v2/v3, ResNet-50): mixed "
         "precision top-1 within 0.3 points of the FP32 baseline (Table 1)")


@dataclass(frozen=True)
class DtypeRuns:
    """The runs of one dtype, one per seed: test accuracy (percent) of the masters and of the
    mixed-precision forward; per-step losses; skipped steps."""

    dtype: torch.dtype
    seeds: tuple[int, ...]
    accuracy: tuple[float, ...]
    accuracy_mp: tuple[float, ...]
    losses: tuple[tuple[float, ...], ...]
    skips: tuple[int, ...]

    @property
    def label(self) -> str:
        return LABELS[self.dtype]

    @property
    def mean_std(self) -> tuple[float, float]:
        return common.mean_std(self.accuracy)


@dataclass(frozen=True)
class AccuracyResult:
    runs: tuple[DtypeRuns, ...]
    epochs: int
    lr: float
    batch_size: int

    def of(self, dtype: torch.dtype) -> DtypeRuns:
        for r in self.runs:
            if r.dtype == dtype:
                return r
        raise KeyError(dtype)

    def gap(self, dtype: torch.dtype) -> float:
        """Mean test accuracy of ``dtype`` minus FP32's, in points."""
        return self.of(dtype).mean_std[0] - self.of(torch.float32).mean_std[0]


def measure(seeds: tuple[int, ...] = (0, 1, 2, 3, 4), epochs: int = 10, lr: float = 0.05,
            batch_size: int = 64, progress: bool = False) -> AccuracyResult:
    data = digits.load()
    pbar = common.bar(len(seeds) * len(DTYPES), "(a) accuracy", progress)
    out = []
    try:
        for dtype in DTYPES:
            runs = []
            for seed in seeds:
                runs.append(digits.train(data, dtype, seed=seed, epochs=epochs, lr=lr,
                                         batch_size=batch_size))
                common.tick(pbar, dtype=LABELS[dtype].split()[0],
                            acc=f"{runs[-1].test_accuracy:.1f}")
            out.append(DtypeRuns(dtype, tuple(seeds), tuple(r.test_accuracy for r in runs),
                                 tuple(r.test_accuracy_mp for r in runs),
                                 tuple(r.losses for r in runs), tuple(r.skips for r in runs)))
    finally:
        common.close(pbar)
    return AccuracyResult(tuple(out), epochs, lr, batch_size)


def table(r: AccuracyResult) -> str:
    header = ["precision", "test acc. % per seed", "mean ± std", "vs FP32 (points)",
              "mixed-precision forward, mean", "skipped steps"]
    rows = []
    for d in r.runs:
        m, s = d.mean_std
        rows.append((d.label, " ".join(f"{a:.1f}" for a in d.accuracy), f"{m:.2f} ± {s:.2f}",
                     "-" if d.dtype == torch.float32 else f"{r.gap(d.dtype):+.2f}",
                     f"{common.mean_std(d.accuracy_mp)[0]:.2f}", sum(d.skips)))
    n = len(r.runs[0].losses[0])
    return (f"Digits CNN, SGD lr {r.lr} momentum 0.9, batch {r.batch_size}, {r.epochs} "
            f"epoch(s) = {n} steps, seeds {', '.join(map(str, r.runs[0].seeds))} (each seed: "
            "the same initial weights and batch order for every precision); 360 test images "
            "(one image = 0.28 points).\n\n" + common.markdown_table(header, rows))


def plot(r: AccuracyResult, path: Path) -> Path:
    plt = common.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    for d in r.runs:
        n = len(d.losses[0])
        mean = [sum(run[i] for run in d.losses) / len(d.losses) for i in range(n)]
        ax.plot(mean, lw=1, label=d.label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss, mean over seeds")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    names = [d.label.split()[0] for d in r.runs]
    means = [d.mean_std[0] for d in r.runs]
    stds = [d.mean_std[1] for d in r.runs]
    bx.bar(names, means, yerr=stds, capsize=6, color=["#444444", "#4477aa", "#228833"])
    lo = min(m - s for m, s in zip(means, stds))
    bx.set_ylim(max(0.0, lo - 5), 100)
    bx.set_ylabel("test accuracy % (mean ± std)")
    fig.suptitle("(a) FP32 vs FP16 vs BF16 on digits, same hyperparameters")
    return common.save_figure(fig, path)


def run(out_dir: Path, *, tiny: bool = False, progress: bool = False
        ) -> tuple[AccuracyResult, list[Path]]:
    """Measure (tiny: 2 seeds, 1 epoch; full: 5 seeds, 10 epochs) and write ``a.md``,
    ``a.png``."""
    result = measure(seeds=(0, 1) if tiny else (0, 1, 2, 3, 4), epochs=1 if tiny else 10,
                     progress=progress)
    md = f"# (a) Accuracy: FP32 vs FP16 vs BF16\n\nPaper: {PAPER}.\n\n" + table(result)
    return result, [common.write_text(out_dir / "a.md", md), plot(result, out_dir / "a.png")]
