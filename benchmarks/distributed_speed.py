"""Data-parallel step time on CPU (gloo): the same MLP step on 1 process and on 2 ranks, each
process on one thread, so the difference is the in-graph gradient all-reduce (and the found-inf
MAX and loss mean) rather than a change in threads per matmul.

    python benchmarks/distributed_speed.py [--steps 10] [--rows 64] [--backend auto]

Prints a Markdown table: per-rank step time (median of ``--steps`` after 3 warm-up steps), rows
per second over all ranks, the gradient elements all-reduced per step, and the ratio 2 ranks /
1 rank. A 2-core machine runs both ranks at once, one per core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mpcompile  # noqa: E402

SIZES = (1024, 4096, 4096, 1000)  # the MLP of benchmarks/speed.py


def build() -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(SIZES, SIZES[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def run(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world)
    try:
        torch.manual_seed(0)
        model = build()
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.rows, SIZES[0], generator=g)
        y = torch.randint(0, SIZES[-1], (args.rows,), generator=g)
        step = mpcompile.compile_train_step(
            model, nn.functional.cross_entropy, x, y, dtype=torch.bfloat16,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
            backend=args.backend)
        t0 = time.perf_counter()
        step.step(x, y)  # compiles
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(3 + args.steps):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            step.step(x, y)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        grad_elems = sum(p.numel() for p in model.parameters())
        if rank == 0:
            Path(out).write_text(json.dumps({
                "world": world, "median_s": statistics.median(times), "compile_s": compile_s,
                "grad_elems": grad_elems, "execution": str(step.execution),
                "data_parallel": str(step.data_parallel)}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out, store = os.path.join(d, "result.json"), os.path.join(d, "store")
        if world == 1:
            ctx = tmp.get_context("spawn")
            p = ctx.Process(target=run, args=(0, 1, store, args, out))
            p.start()
            p.join()
            if p.exitcode:
                raise SystemExit(f"the 1-process run failed (exit {p.exitcode})")
        else:
            tmp.start_processes(run, args=(world, store, args, out), nprocs=world,
                                start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=64, help="batch rows per rank")
    ap.add_argument("--backend", default="auto", help="mpcompile backend: auto, inductor, eager")
    args = ap.parse_args()
    one, two = measure(1, args), measure(2, args)
    millions = one["grad_elems"] / 1e6
    print(f"MLP {'→'.join(map(str, SIZES))}, BF16, SGD momentum, {args.rows} rows per rank, "
          f"1 thread per process, {one['execution']}\n")
    print("| processes | step time per rank | rows/s (all ranks) | gradients all-reduced | "
          "compile |")
    print("|---|---:|---:|---:|---:|")
    for r in (one, two):
        rows_s = r["world"] * args.rows / r["median_s"]
        reduced = f"{millions:.1f} M elements" if r["world"] > 1 else "none"
        print(f"| {r['world']} | {1000 * r['median_s']:.1f} ms | {rows_s:.0f} | {reduced} | "
              f"{r['compile_s']:.1f} s |")
    print(f"\n2 ranks / 1 process: step time {two['median_s'] / one['median_s']:.2f}x, "
          f"throughput {2 * one['median_s'] / two['median_s']:.2f}x "
          f"({two['data_parallel']})")


if __name__ == "__main__":
    main()
