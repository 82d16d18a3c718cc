"""Data-parallel mixed-precision training with one compiled step per rank.

    torchrun --nproc-per-node 2 examples/ddp_train.py            # CPU, gloo
    torchrun --nproc-per-node 2 examples/ddp_train.py --cuda     # one GPU per rank, NCCL
    torchrun --nproc-per-node 2 examples/ddp_train.py --shard --save ckpt   # ZeRO-1, checkpoint

Each rank draws its own synthetic batches (a fixed random teacher MLP labels them). The step
averages the gradients over the ranks inside its graph (bucketed functional all-reduce, before
unscale), skips on every rank when any rank's gradients overflow, and reports the loss averaged
over the ranks; at the end every rank holds the same weights (checked below). ``--shard`` keeps
each rank's slice of the FP32 masters and optimizer state only (ZeRO-1); ``--save DIR`` writes a
checkpoint folder at the end (one file per rank + a manifest), ``--resume DIR`` starts from one.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import mpcompile
from mpcompile.examples import MLP


def synthetic_batch(step: int, rank: int, rows: int, device: torch.device):
    """This rank's batch for ``step``: random inputs, labels from a fixed teacher network."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(rows, 32, generator=g)
    teacher = torch.Generator().manual_seed(12345)
    w = torch.randn(32, 10, generator=teacher)
    return x.to(device), (x @ w).argmax(dim=1).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rows", type=int, default=64, help="batch rows per rank")
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    ap.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank")
    ap.add_argument("--backend", default="auto", help="mpcompile backend: auto, inductor, eager")
    ap.add_argument("--shard", action="store_true",
                    help="shard the FP32 masters and optimizer state across ranks (ZeRO-1)")
    ap.add_argument("--save", metavar="DIR", help="write a checkpoint folder at the end")
    ap.add_argument("--resume", metavar="DIR", help="load a checkpoint folder first")
    a = ap.parse_args()

    if a.cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if a.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if a.cuda else torch.device("cpu")
    try:
        torch.manual_seed(rank)  # different on purpose: rank 0's weights are broadcast
        model = MLP().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = synthetic_batch(0, rank, a.rows, device)
        step = mpcompile.compile_train_step(
            model, torch.nn.functional.cross_entropy, x, y, optimizer=opt,
            dtype=getattr(torch, a.dtype), backend=a.backend,  # process_group: the default
            shard_optimizer_state=a.shard)
        if a.resume:
            step.load(a.resume)  # every rank: its own file (its shard with --shard)
        if rank == 0:
            state = sum(step.state_bytes().values())
            print(f"rank 0: {step.data_parallel}, FP32 state "
                  f"{'sharded' if step.shards else 'replicated'}, {state} bytes of state here")
        for i in range(a.steps):
            r = step.step(*synthetic_batch(i, rank, a.rows, device))
            if rank == 0 and (i % 10 == 0 or i == a.steps - 1):
                print(f"step {i:3d}  loss {r.loss.item():.4f} (mean over {world} ranks)  "
                      f"scale {r.loss_scale.item():g}  skipped {bool(r.skipped)}")
        if rank == 0:
            print(f"the step ran on {step.execution}")
        if a.save:
            step.save(a.save)
            if rank == 0:
                print(f"checkpoint written to {a.save}/ (manifest.json + one file per rank)")
        # every rank holds the same masters (gathered from the shards with --shard): a checksum
        masters = step.masters()  # collective with --shard
        total = torch.stack([t.double().sum() for t in masters.values()]).sum()
        sums = [torch.zeros_like(total) for _ in range(world)]
        dist.all_gather(sums, total)
        if rank == 0:
            same = all(torch.equal(s, sums[0]) for s in sums)
            print(f"masters identical on all {world} ranks: {same}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
