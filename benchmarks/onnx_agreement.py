"""The exported training step in onnxruntime (CPU) next to TrainStep, in one run, per model and
dtype: mpcompile's own first-step gradient error against float64 (eps), the worst loss and state
differences after N steps, and the median step time of each runtime.

    python benchmarks/onnx_agreement.py [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import mpcompile
from mpcompile.examples import EXAMPLES, batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_export import gradient_error  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--models", nargs="*", default=["mlp", "cnn", "transformer"])
    args = p.parse_args()
    print(f"torch {torch.__version__}; onnxruntime CPU provider\n")
    head = (f"{'model':<12}{'dtype':<10}{'eps':>9}{'loss':>10}{'masters':>10}{'opt':>10}"
            f"{'buffers':>10}{'export s':>9}{'step ms':>9}{'ort ms':>8}")
    print(head + "\n" + "-" * len(head))
    for name in args.models:
        ex = EXAMPLES[name]
        for low in (torch.float16, torch.bfloat16, torch.float32):
            model = ex.build().train()
            step = mpcompile.compile_train_step(
                model, ex.loss, *batch(ex), dtype=low, optimizer=torch.optim.SGD(
                    model.parameters(), lr=0.05, momentum=0.9))
            t0 = time.perf_counter()
            onx = mpcompile.export_onnx(step)
            export_s = time.perf_counter() - t0
            trainer = mpcompile.OrtTrainer(onx)
            loss, t_ours, t_ort = 0.0, [], []
            for i in range(args.steps):
                b = batch(ex, seed=i)
                t = time.perf_counter()
                got = trainer.step(*b)
                t_ort.append(time.perf_counter() - t)
                t = time.perf_counter()
                want = step.step(*b)
                want.loss.item()
                t_ours.append(time.perf_counter() - t)
                loss = max(loss, abs(got.loss - want.loss.item()) / abs(want.loss.item()))
            ours = trainer.state_dict()
            init = {f"master.{n}": p.detach() for n, p in ex.build().named_parameters()}
            worst = {"master": 0.0, "opt": 0.0, "buffer": 0.0}
            for key, w in step.state_dict().items():
                kind = key.split(".")[0]
                if kind not in worst or not w.is_floating_point():
                    continue
                g = ours[key].double()
                w = w.double()
                if key in init:
                    g, w = g - init[key], w - init[key]
                worst[kind] = max(worst[kind], ((g - w).norm() / w.norm().clamp(min=1e-12))
                                  .item())
            eps = gradient_error(ex, low) if low is not torch.float32 else 0.0
            print(f"{name:<12}{str(low).removeprefix('torch.'):<10}{eps:>9.1e}{loss:>10.1e}"
                  f"{worst['master']:>10.1e}{worst['opt']:>10.1e}{worst['buffer']:>10.1e}"
                  f"{export_s:>9.1f}{statistics.median(t_ours) * 1e3:>9.2f}"
                  f"{statistics.median(t_ort) * 1e3:>8.2f}")


if __name__ == "__main__":
    main()
