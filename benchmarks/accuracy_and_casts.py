"""Side by side, in one run, per test model and low dtype:

- relative error of mpcompile's output against the FP32 model (and in units of u),
- cast bytes of one forward + backward, measured with a TorchDispatchMode, for mpcompile
  (min-cut), the local strategy and torch.autocast, and mpcompile's ratio to each,
- median wall time of one training step (forward, loss, backward, SGD) for FP32,
  torch.autocast (+ GradScaler for FP16), mpcompile.convert (+ GradScaler) and
  mpcompile.compile_train_step (the whole step as one graph), and the ratios to autocast.

    python benchmarks/accuracy_and_casts.py [--models cnn transformer] [--steps 20]

Wall times on a shared 2-core machine are noisy: read the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import mpcompile
from mpcompile.dtypes import unit_roundoff
from mpcompile.examples import EXAMPLES, batch, eager_step

U = {d: unit_roundoff(d) for d in (torch.float16, torch.bfloat16)}


def _logits(out):
    if isinstance(out, dict):
        return out["logits"]
    return getattr(out, "logits", out)


def step_time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:] or times)


def trainer(model, loss_fn, x, kw, y, low=None, autocast=False):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=low is torch.float16)

    return lambda: eager_step(model, opt, scaler, loss_fn, x, y, kw,
                              autocast=low if autocast else None)


def compiled_trainer(model, loss_fn, x, kw, y, low):
    if kw:  # compile_train_step takes positional inputs; bind the keyword ones
        inner, names = model, list(kw)

        class Positional(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, *args):
                return self.inner(**dict(zip(names, args)))

        model, x = Positional(), tuple(kw.values())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step = mpcompile.compile_train_step(model, loss_fn, x, y, optimizer=opt, dtype=low)
    return lambda: step.step(x, y)


def cases(names):
    for name in names:
        if name == "bert":
            import sys
            from pathlib import Path

            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from models_hf import bert

            model, kw, y = bert()
            yield "bert", (lambda m=model: copy.deepcopy(m)), (), kw, y, (
                lambda o, t: torch.nn.functional.cross_entropy(o.logits, t))
        else:
            ex = EXAMPLES[name]
            x, y = batch(ex)
            yield name, ex.build, x, {}, y, ex.loss


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="*", default=[*sorted(EXAMPLES), "bert"])
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    head = (f"{'model':<12}{'dtype':<10}{'rel err':>9}{'/u':>6}"
            f"{'min-cut B':>12}{'local B':>12}{'autocast B':>12}{'mc/local':>9}{'mc/ac':>7}"
            f"{'fp32 ms':>9}{'ac ms':>8}{'mp ms':>8}{'step ms':>8}{'mp/ac':>7}{'step/ac':>8}")
    print(head)
    print("-" * len(head))
    for name, build, x, kw, y, loss_fn in cases(args.models):
        for low in (torch.float16, torch.bfloat16):
            ref = build().eval()
            mp = mpcompile.convert(build().eval(), x, example_kwargs=kw, dtype=low)
            with torch.no_grad():
                a, b = _logits(mp(*x, **kw)), _logits(ref(*x, **kw))
            err = ((a.double() - b.double()).norm() / b.double().norm()).item()
            mp.train()
            rep = mp.report()
            m = rep.measured
            mc = m["mpcompile (min-cut)"].total_bytes
            lo = m["local strategy"].total_bytes
            ac = m["torch.autocast"].total_bytes if "torch.autocast" in m else None
            t_fp32 = step_time(trainer(build().train(), loss_fn, x, kw, y), args.steps)
            try:
                t_ac = step_time(trainer(build().train(), loss_fn, x, kw, y, low, True),
                                 args.steps)
            except RuntimeError:
                t_ac = float("nan")
            t_mp = step_time(trainer(mp, loss_fn, x, kw, y, low), args.steps)
            t_st = step_time(compiled_trainer(build().train(), loss_fn, x, kw, y, low),
                             args.steps)
            ac_s = f"{ac:>12,}" if ac is not None else f"{'fails':>12}"
            ratio = f"{mc / ac:>7.2f}" if ac else f"{'-':>7}"
            print(f"{name:<12}{str(low).removeprefix('torch.'):<10}{err:>9.2e}"
                  f"{err / U[low]:>6.2f}{mc:>12,}{lo:>12,}{ac_s}{mc / lo:>9.2f}{ratio}"
                  f"{t_fp32 * 1e3:>9.2f}{t_ac * 1e3:>8.2f}{t_mp * 1e3:>8.2f}"
                  f"{t_st * 1e3:>8.2f}{t_mp / t_ac:>7.2f}{t_st / t_ac:>8.2f}")


if __name__ == "__main__":
    main()
