"""Data-parallel step time and per-rank state on CPU (gloo): the same MLP step on 1 process, on
2 ranks (replicated FP32 state) and on 2 ranks with sharded FP32 state (ZeRO-1,
``shard_optimizer_state=True``), each process on one thread, so the difference is the in-graph
communication rather than a change in threads per matmul.

    python benchmarks/distributed_speed.py [--steps 10] [--rows 64] [--backend auto]
                                           [--optimizer sgd|adam]

Prints a Markdown table: per-rank step time (median of ``--steps`` after 3 warm-up steps), rows
per second over all ranks, the collectives per step, the bytes of the step's state on one rank
by kind (FP32 masters, FP32 optimizer state, low-precision working copies), and the ratios to
1 process. A 2-core machine runs both ranks at once, one per core.
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


def run(rank: int, world: int, store: str, args: argparse.Namespace, out: str,
        shard: bool = False) -> None:
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
        opt = (torch.optim.Adam(model.parameters(), lr=1e-4) if args.optimizer == "adam"
               else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
        step = mpcompile.compile_train_step(
            model, nn.functional.cross_entropy, x, y, dtype=torch.bfloat16, optimizer=opt,
            backend=args.backend, shard_optimizer_state=shard)
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
        floor = _collectives(grad_elems, world) if world > 1 else {}
        if rank == 0:
            Path(out).write_text(json.dumps({
                "world": world, "median_s": statistics.median(times), "compile_s": compile_s,
                "grad_elems": grad_elems, "execution": str(step.execution),
                "state": step.state_bytes(), "shard": shard, "floor": floor,
                "data_parallel": str(step.data_parallel)}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _collectives(numel: int, world: int) -> dict[str, float]:
    """The floor: eager gloo collectives alone on a flat BF16 buffer of the gradients' size
    (median of 5, ms): all_reduce (the replicated step) vs reduce_scatter + all_gather (the
    sharded step)."""
    x = torch.randn(numel - numel % world).to(torch.bfloat16)
    part, full = x.new_empty(x.numel() // world), torch.empty_like(x)

    def median_ms(fn) -> float:
        times = []
        for _ in range(5):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    return {"all_reduce": median_ms(lambda: dist.all_reduce(x)),
            "reduce_scatter": median_ms(lambda: dist.reduce_scatter_tensor(part, x)),
            "all_gather": median_ms(lambda: dist.all_gather_into_tensor(full, part))}


def measure(world: int, args: argparse.Namespace, shard: bool = False) -> dict:
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
            tmp.start_processes(run, args=(world, store, args, out, shard), nprocs=world,
                                start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=64, help="batch rows per rank")
    ap.add_argument("--backend", default="auto", help="mpcompile backend: auto, inductor, eager")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    args = ap.parse_args()
    runs = [measure(1, args), measure(2, args), measure(2, args, shard=True)]
    one = runs[0]
    millions = one["grad_elems"] / 1e6
    opt = "Adam" if args.optimizer == "adam" else "SGD momentum"
    print(f"MLP {'→'.join(map(str, SIZES))}, BF16, {opt}, {args.rows} rows per rank, "
          f"1 thread per process, {one['execution']}\n")
    print("| processes | FP32 state | step time per rank | rows/s (all ranks) | collectives | "
          "masters / rank | optimizer state / rank | working copies / rank | compile |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    for r in runs:
        rows_s = r["world"] * args.rows / r["median_s"]
        comm = ("none" if r["world"] == 1 else
                f"reduce-scatter + all-gather of {millions:.1f} M elements" if r["shard"]
                else f"all-reduce of {millions:.1f} M elements")
        st = r["state"]
        print(f"| {r['world']} | {'sharded' if r['shard'] else 'replicated'} | "
              f"{1000 * r['median_s']:.1f} ms | {rows_s:.0f} | {comm} | "
              f"{mib(st.get('master', 0))} | {mib(st.get('opt', 0))} | "
              f"{mib(st.get('working', 0))} | {r['compile_s']:.1f} s |")
    two, zero = runs[1], runs[2]
    fp32 = lambda r: r["state"].get("master", 0) + r["state"].get("opt", 0)  # noqa: E731
    print(f"\n2 ranks / 1 process: step time {two['median_s'] / one['median_s']:.2f}x "
          f"replicated, {zero['median_s'] / one['median_s']:.2f}x sharded; throughput "
          f"{2 * one['median_s'] / two['median_s']:.2f}x / "
          f"{2 * one['median_s'] / zero['median_s']:.2f}x ({two['data_parallel']})")
    f = two["floor"]
    print(f"the floor, gloo collectives alone on {millions:.1f} M BF16 elements: all_reduce "
          f"{f['all_reduce']:.1f} ms; reduce_scatter {f['reduce_scatter']:.1f} ms + all_gather "
          f"{f['all_gather']:.1f} ms = {f['reduce_scatter'] + f['all_gather']:.1f} ms")
    model = 4 * one["grad_elems"]
    total = lambda r: sum(r["state"].values()) + (model if r["shard"] else 0)  # noqa: E731
    print(f"FP32 state (masters + optimizer state) per rank, sharded / replicated: "
          f"{fp32(zero) / fp32(two):.3f}. With the model's own FP32 parameters "
          f"({mib(model)}: the replicated step's masters; beside a sharded step they stay "
          "allocated, as the step keeps the model for to_module and sync_model), per rank: "
          f"{mib(total(two))} replicated, {mib(total(zero))} sharded "
          f"({total(zero) / total(two):.2f}x)")

if __name__ == "__main__":
    main()
