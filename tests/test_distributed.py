"""Data-parallel training steps: 2 ranks on CPU (gloo), spawned by the tests.

Each test spawns 2 processes (torch.multiprocessing, a FileStore in tmp_path, a process-group
timeout), which write their results (or their error) to files; the parent compares them with a
single-process step it runs itself. Every spawn is bounded: a hang fails the test.

Oracle of the identical-masters test: ``compile_train_step`` on one process, on the
concatenation of the two ranks' batches (the mean loss over 32 rows = the mean over ranks of
the 16-row means, the batches being the same size). The ranks' gradients are rounded to FP16
on each rank, divided by 2 and summed in FP16 (as DDP on FP16 gradients), the single process
rounds the 32-row gradient once: so the trajectories agree within a few u, not bit for bit.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mpcompile
from mpcompile import ExportError, TrainStepError
from mpcompile.dtypes import unit_roundoff
from mpcompile.examples import EXAMPLES, batch
from mpcompile.train.distributed import DataParallel, differences, plan_buckets

F16 = torch.float16
EX = EXAMPLES["mlp"]
STEPS = 10
SGD = dict(lr=0.05, momentum=0.9)


# -- the spawned side ---------------------------------------------------------------------------

def _worker(rank: int, tmp: str, name: str, pg_timeout: float, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=pg_timeout))
    t0 = time.monotonic()
    try:
        out = {"result": globals()[name](rank, *args)}
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out = {"error": f"{type(e).__name__}: {e}"}
    out["seconds"] = time.monotonic() - t0
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    if "error" not in out:
        dist.destroy_process_group()
    # no interpreter teardown: a process group left with a failed collective may abort in its
    # destructor, and the result is already written
    os._exit(0)


def _rank_batch(rank: int, i: int):
    return batch(EX, seed=100 * i + rank)


def _compile(rank: int, model, n_rows: int = 16, **kw):
    x, y = _rank_batch(rank, 0)
    opt = torch.optim.SGD(model.parameters(), **SGD)
    return mpcompile.compile_train_step(model, EX.loss, (x[0][:n_rows],), y[:n_rows],
                                        optimizer=opt, dtype=F16, **kw)


def _train(rank: int, backend: str, reduce_dtype):
    model = EX.build().train()
    if rank == 1:  # a different start: the step must begin from rank 0's weights (as DDP)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
    step = _compile(rank, model, backend=backend, grad_reduce_dtype=reduce_dtype,
                    bucket_cap_mb=1408 / 2**20)  # 3 buckets: [fc1.w], [fc1.b, fc2.w], [fc2.b]
    losses = [step.step(*_rank_batch(rank, i)).loss.item() for i in range(STEPS)]
    return {"losses": losses, "state": dict(step.state_dict()), "execution": str(step.execution),
            "report": step.report().training_text(), "dp": str(step.data_parallel),
            "collectives": _collectives(step.graph_module),
            "explain": step.explain(next(n for n in step.graph_module.graph.nodes
                                         if "all_reduce" in str(n.target)))}


def _collectives(gm) -> list[tuple[str, str, str]]:
    """(phase, reduce op, what the result feeds) per all_reduce node of the step graph."""
    from mpcompile.records import record

    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and "all_reduce" in str(n.target):
            users = [u for w in n.users for u in w.users] or list(n.users)
            out.append((record(n).created_by, n.args[1], ",".join(sorted(u.name for u in users))))
    return out


def _overflow(rank: int):
    step = _compile(rank, EX.build().train(), backend="eager")
    first = step.step(*_rank_batch(rank, 0))
    before = {k: v.clone() for k, v in step.state_dict().items() if torch.is_tensor(v)}
    x, y = _rank_batch(rank, 1)
    if rank == 1:
        x[0][3, 5] = float("inf")
    r = step.step(x, y)
    after = step.state_dict()
    moved = ("scale", "growth_tracker")  # the scale backs off, the clean-step count resets
    untouched = [k for k, v in before.items() if k not in moved and torch.equal(v, after[k])]
    try:
        mpcompile.export_onnx(step)
        export = "exported"
    except ExportError as e:
        export = str(e)
    try:  # stopping at one rank's first inf/NaN would strand the others in a collective
        mpcompile.localize_overflow(step, x, y)
        localize = "ran"
    except TrainStepError as e:
        localize = str(e)
    return {"localize": localize, "skipped": [bool(first.skipped), bool(r.skipped)],
            "untouched": untouched,
            "names": [k for k in before if k not in moved],
            "scale": [before["scale"].item(), after["scale"].item()],
            "growth": [before["growth_tracker"].item(), after["growth_tracker"].item()],
            "export": export}


def _batch_norm(rank: int, backend: str):
    cnn = EXAMPLES["cnn"]
    model = cnn.build().train()
    x, y = batch(cnn, seed=rank)
    step = mpcompile.compile_train_step(model, cnn.loss, x, y, dtype=F16, backend=backend,
                                        optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    for i in range(3):
        step.step(*batch(cnn, seed=10 * i + rank))
    assert str(step.execution).startswith(backend), step.execution
    return {k: v for k, v in step.state_dict().items() if torch.is_tensor(v)}


def _mismatched_compile(rank: int):
    _compile(rank, EX.build().train(), n_rows=16 if rank == 0 else 8, backend="eager")
    return "compiled"


def _refused_on_one_rank(rank: int):
    _compile(rank, EX.build().train(), backend="eager", max_grad_norm=-1.0 if rank else None)
    return "compiled"


def _mismatched_step(rank: int, linger: float):
    step = _compile(rank, EX.build().train(), backend="eager")
    step.step(*_rank_batch(rank, 0))
    x, y = _rank_batch(rank, 1)
    if rank == 1:
        x, y = (x[0][:8],), y[:8]
    try:
        step.step(x, y)
    except Exception:
        if rank == 1:  # keep the group alive: rank 0 must fail by the group's timeout
            time.sleep(linger)
        raise
    return "stepped"


class _Twice(torch.nn.Module):
    """A weight read by three matmuls (as a tied embedding / LM head reads one weight twice):
    one working-copy input, whose gradient autograd accumulates over the three uses."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(24, 16) * 0.2)
        self.head = torch.nn.Linear(24, 7)

    def forward(self, x):
        h = torch.relu(x @ self.w.t())  # [n, 24]
        h = torch.relu((h @ self.w) @ self.w.t())  # w twice more
        return self.head(h)


def _example(name: str):
    if name != "twice":
        return EXAMPLES[name]
    from mpcompile.examples import Example

    return Example("twice", _Twice, lambda g: (torch.randn(16, 16, generator=g),),
                   lambda g: torch.randint(0, 7, (16,), generator=g),
                   torch.nn.functional.cross_entropy)


def _optimizer(kind: str, model):
    """Adam with weight decay, or SGD (Nesterov momentum) with two param groups that differ in
    lr and weight decay."""
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01)
    params = list(model.parameters())
    half = len(params) // 2
    return torch.optim.SGD([{"params": params[:half]},
                            {"params": params[half:], "lr": 0.01, "weight_decay": 1e-4}],
                           lr=0.05, momentum=0.9, nesterov=True)


def _zero(rank: int, example: str, dtype_name: str, backend: str, clip, opt: str = "adam",
          cap: float = 0.05):
    """The same 10 steps (an inf batch on rank 1 at step 4) replicated and with sharded FP32
    state, from the same start: losses, skips, masters, working copies, state bytes."""
    ex = _example(example)
    dtype = getattr(torch, dtype_name)
    runs = {}
    for shard in (False, True):
        torch.manual_seed(0)
        model = ex.build().train()
        x, y = batch(ex, seed=rank)
        step = mpcompile.compile_train_step(
            model, ex.loss, x, y, dtype=dtype, backend=backend, max_grad_norm=clip,
            optimizer=_optimizer(opt, model), shard_optimizer_state=shard, bucket_cap_mb=cap,
            grad_stats=True)
        losses, skipped, counts = [], [], []
        for i in range(STEPS):
            x, y = batch(ex, seed=100 * i + rank)
            if i == 4 and rank == 1 and x[0].is_floating_point():  # (not token ids)
                x = tuple(t.clone() for t in x)
                x[0].view(-1)[3] = float("inf")
            r = step.step(x, y)
            losses.append(r.loss.item())
            skipped.append(bool(r.skipped))
            counts.append((r.grad_zeros.tolist(), r.grad_nonfinite.tolist()))
        runs[shard] = {"counts": counts,
            "losses": losses, "skipped": skipped, "masters": step.masters(),
            "working": {k: v.clone() for k, v in step.state_dict().items()
                        if k.startswith("working.")},
            "bytes": step.state_bytes(), "scale": step.value("scale").item(),
            "sharded": list(step.shards.sharded) if step.shards else [],
            "padding": ([step.shards.padding(g) for g in step.shards.groups]
                        if step.shards else []),
            "model": {k: v.detach().clone() for k, v in step.to_module().state_dict().items()},
            "collectives": sorted({str(n.target) for n in step.graph_module.graph.nodes
                                   if "_c10d_functional" in str(n.target)}),
        }
    return runs


def _adam_step(rank: int, shard: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = EX.build().train()
    x, y = _rank_batch(rank, 0)
    return mpcompile.compile_train_step(
        model, EX.loss, x, y, dtype=F16, backend="eager", shard_optimizer_state=shard,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), bucket_cap_mb=0.05)


def _ckpt_straight(rank: int, folder: str, shard: bool):
    """10 steps, saving after the 5th (saving changes nothing)."""
    step = _adam_step(rank, shard)
    losses = []
    for i in range(STEPS):
        losses.append(step.step(*_rank_batch(rank, i)).loss.item())
        if i in (3, 4):  # twice into one folder: the second save replaces the first
            step.save(folder)
            at_save = {k: v.clone() for k, v in step.masters().items()}
    return {"losses": losses[5:], "masters": step.masters(), "state": step.state_dict(),
            "at_save": at_save}


def _ckpt_resume(rank: int, folder: str, shard: bool):
    """A new pair of processes, another start (seed 1): load, then steps 6-10."""
    step = _adam_step(rank, shard, seed=1)
    step.load(folder)
    losses = [step.step(*_rank_batch(rank, i)).loss.item() for i in range(5, STEPS)]
    return {"losses": losses, "masters": step.masters(), "state": step.state_dict()}


def _ckpt_refused(rank: int, folder: str, shard: bool, cap: float = 0.05):
    """Loading a damaged folder (or one of another shard plan): every rank raises, no rank's
    state changes."""
    torch.manual_seed(1)
    model = EX.build().train()
    x, y = _rank_batch(rank, 0)
    step = mpcompile.compile_train_step(
        model, EX.loss, x, y, dtype=F16, backend="eager", shard_optimizer_state=shard,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), bucket_cap_mb=cap)
    before = {k: v.clone() for k, v in step.state_dict().items() if torch.is_tensor(v)}
    try:
        step.load(folder)
        error = None
    except mpcompile.CheckpointError as e:
        error = str(e)
    after = step.state_dict()
    return {"error": error, "unchanged": all(torch.equal(v, after[k]) for k, v in before.items())}


# -- the parent side ----------------------------------------------------------------------------

def _spawn(tmp_path, name: str, *args, pg_timeout: float = 60, limit: float = 150) -> list:
    """Run ``name(rank, *args)`` on 2 gloo ranks; each rank's {"result"} or {"error"}."""
    ctx = mp.start_processes(_worker, args=(str(tmp_path), name, pg_timeout, args), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{name}: the ranks did not finish within {limit} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _single_process_reference():
    model = EX.build().train()
    opt = torch.optim.SGD(model.parameters(), **SGD)

    def both(i):
        (x0,), y0 = _rank_batch(0, i)
        (x1,), y1 = _rank_batch(1, i)
        return (torch.cat([x0, x1]),), torch.cat([y0, y1])

    step = mpcompile.compile_train_step(model, EX.loss, *both(0), optimizer=opt, dtype=F16,
                                        backend="eager")
    losses = [step.step(*both(i)).loss.item() for i in range(STEPS)]
    return losses, step.state_dict()


def _check_training(outs):
    assert [o.get("error") for o in outs] == [None, None]
    r0, r1 = outs[0]["result"], outs[1]["result"]
    assert r0["dp"] == "data-parallel over 2 ranks (gloo)"
    assert "data-parallel over 2 ranks (gloo)" in r0["report"]
    assert "grad_all_reduce" in r0["report"]
    assert "grad_all_reduce" in r0["explain"] and "over 2 ranks (gloo)" in r0["explain"]
    # identical on both ranks, bit for bit: the same averaged gradients, the same updates
    for k, v in r0["state"].items():
        if torch.is_tensor(v):
            assert torch.equal(v, r1["state"][k]), k
    assert r0["losses"] == r1["losses"]
    # and within 2 u of one process on the concatenated batch
    losses, ref = _single_process_reference()
    u = unit_roundoff(F16)
    init = dict(EX.build().named_parameters())
    for fqn, p0 in init.items():
        ours, theirs = r0["state"][f"master.{fqn}"], ref[f"master.{fqn}"]
        err = (ours - theirs).norm() / (theirs - p0.detach()).norm()
        assert err <= 2 * u, (fqn, err / u)
    for a, b in zip(r0["losses"], losses):
        assert abs(a - b) <= 2 * u * abs(b), (a, b)
    return r0


def test_ranks_with_different_batches_end_identical_and_match_one_process(tmp_path):
    r0 = _check_training(_spawn(tmp_path, "_train", "eager", None))
    assert r0["execution"].startswith("eager")
    # the collectives are in the step graph: one all-reduce per gradient bucket (1408 B caps
    # split the MLP's FP16 gradients into 3), the skip flag's MAX, the loss's mean
    phases = [(ph, op) for ph, op, _ in r0["collectives"]]
    assert phases.count(("grad_all_reduce", "sum")) == 3
    assert ("found_inf", "max") in phases and ("outputs", "sum") in phases


@pytest.mark.slow
@pytest.mark.parametrize("backend,reduce_dtype", [("inductor", None), ("eager", torch.float32)])
def test_data_parallel_under_inductor_and_fp32_reduction(tmp_path, backend, reduce_dtype):
    r0 = _check_training(_spawn(tmp_path, "_train", backend, reduce_dtype, limit=400))
    assert r0["execution"].startswith("inductor" if backend == "inductor" else "eager")


def test_an_overflow_on_one_rank_skips_the_step_on_both(tmp_path):
    outs = _spawn(tmp_path, "_overflow")
    assert [o.get("error") for o in outs] == [None, None]
    for o in outs:
        r = o["result"]
        assert r["skipped"] == [False, True]
        assert r["untouched"] == r["names"]  # every piece of state bit-identical
        assert r["scale"] == [2.0**16, 2.0**15]
        assert r["growth"] == [1, 0]
        assert "data-parallel over 2 ranks (gloo)" in r["export"]
        assert "one process" in r["localize"] and "collectives" in r["localize"]


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_batch_norm_statistics_are_rank_0s_on_every_rank(tmp_path, backend):
    outs = _spawn(tmp_path, "_batch_norm", backend, limit=400)
    assert [o.get("error") for o in outs] == [None, None]
    s0, s1 = outs[0]["result"], outs[1]["result"]
    buffers = [k for k in s0 if k.startswith("buffer.")]
    assert "buffer.bn1.running_mean" in buffers and "buffer.bn1.num_batches_tracked" in buffers
    init = dict(EXAMPLES["cnn"].build().named_buffers())
    for k, v in s0.items():  # masters, optimizer state and buffers: the same on both ranks
        assert torch.equal(v, s1[k]), k
    assert not torch.equal(s0["buffer.bn1.running_mean"], init["bn1.running_mean"])
    assert s0["buffer.bn1.num_batches_tracked"].item() == 3


def test_mismatched_batch_shapes_raise_on_both_ranks(tmp_path):
    outs = _spawn(tmp_path, "_mismatched_compile", pg_timeout=30, limit=60)
    for o in outs:
        assert o["error"].startswith("TrainStepError"), o
        assert "rank 1's batch (inputs[0] float16[8, 32]" not in o["error"]  # inputs are FP32
        assert "rank 1's batch (inputs[0] float32[8, 32]" in o["error"], o["error"]
        assert "differs from rank 0's (inputs[0] float32[16, 32]" in o["error"]
        assert o["seconds"] < 20  # raised at once, not after the process group's timeout


def test_arguments_refused_on_one_rank_raise_on_both(tmp_path):
    outs = _spawn(tmp_path, "_refused_on_one_rank", pg_timeout=30, limit=60)
    assert outs[1]["error"] == "TrainStepError: max_grad_norm must be positive, got -1.0"
    assert outs[0]["error"] == (
        "TrainStepError: compile_train_step: rank 1 could not compile the step (TrainStepError: "
        "max_grad_norm must be positive, got -1.0). Every rank of the data-parallel over 2 "
        "ranks (gloo) must compile the same step")
    assert outs[0]["seconds"] < 20  # at once, not after the process group's timeout


@pytest.mark.slow
@pytest.mark.parametrize("linger", [0, 30])
def test_a_mismatched_batch_at_step_time_fails_both_ranks_without_a_hang(tmp_path, linger):
    outs = _spawn(tmp_path, "_mismatched_step", linger, pg_timeout=10, limit=150)
    assert outs[1]["error"].startswith("SignatureError")  # refused before any collective
    # rank 0's all-reduce fails: at once when rank 1 exits, else at the group's timeout
    assert outs[0]["error"].startswith("RuntimeError"), outs[0]
    if linger:  # rank 1 is still alive: rank 0 gave up by the group's timeout (10 s)
        assert "Timed out" in outs[0]["error"], outs[0]
        assert outs[0]["seconds"] < outs[1]["seconds"]


# -- in this process ----------------------------------------------------------------------------

def test_buckets_by_dtype_up_to_the_cap():
    f16, f32 = torch.float16, torch.float32
    items = [(10, f16), (10, f32), (10, f16), (30, f16), (1000, f32), (1, f32)]
    # 40 B caps: f16 items of 20 B pair up; a 60 B item gets its own; f32 40 B each
    assert plan_buckets(items, 40) == [[0, 2], [1], [3], [4], [5]]
    assert plan_buckets(items, 10**9) == [[0, 2, 3], [1, 4, 5]]


def test_fingerprint_differences_name_rank_and_field():
    prints = [{"batch": "inputs[0] float32[16, 32]", "dtype": "torch.float16"},
              {"batch": "inputs[0] float32[8, 32]", "dtype": "torch.float16"}]
    assert differences(prints) == ["rank 1's batch (inputs[0] float32[8, 32]) differs from "
                                   "rank 0's (inputs[0] float32[16, 32])"]
    assert differences([prints[0], dict(prints[0])]) == []


def test_bad_data_parallel_options():
    with pytest.raises(TrainStepError, match="torch.float32"):
        DataParallel(None, 0, 2, "gloo", reduce_dtype=torch.bfloat16)
    with pytest.raises(TrainStepError, match="bucket_cap_mb"):
        DataParallel(None, 0, 2, "gloo", bucket_cap_mb=0)
    if not dist.is_initialized():  # one process: the options are still checked
        with pytest.raises(TrainStepError, match="not initialised"):
            _compile(0, EX.build(), process_group=object())
        with pytest.raises(TrainStepError, match="bucket_cap_mb"):
            _compile(0, EX.build(), bucket_cap_mb=-1)


@pytest.mark.parametrize("example,dtype,backend,clip,opt,cap", [
    ("mlp", "float16", "eager", None, "adam", 0.05),
    ("mlp", "bfloat16", "eager", None, "adam", 0.05),
    # two param groups, SGD momentum, a bucket per parameter, an odd-sized bias (padding)
    ("lstm", "float16", "eager", None, "sgd", 0.001),
    ("twice", "float16", "eager", None, "adam", 0.05),  # one weight read by three matmuls
    pytest.param("transformer", "float16", "inductor", None, "adam", 0.05,
                 marks=pytest.mark.slow),
    pytest.param("mlp", "float16", "eager", 1.0, "adam", 0.05, marks=pytest.mark.slow),
])
def test_sharded_state_trains_as_the_replicated_step(tmp_path, example, dtype, backend, clip,
                                                     opt, cap):
    outs = _spawn(tmp_path, "_zero", example, dtype, backend, clip, opt, cap, limit=300)
    assert [o.get("error") for o in outs] == [None, None]
    for r in (0, 1):
        rep, zero = outs[r]["result"][False], outs[r]["result"][True]
        assert zero["sharded"], "nothing was sharded"
        assert any("reduce_scatter" in c for c in zero["collectives"])
        assert any("all_gather" in c for c in zero["collectives"])
        assert not any("reduce_scatter" in c for c in rep["collectives"])
        # both ranks skip step 5 (rank 1's inf batch) in both runs
        if example in ("mlp", "twice"):
            assert rep["skipped"][4] and zero["skipped"][4], (rep["skipped"], zero["skipped"])
        if dtype == "bfloat16":
            assert rep["skipped"] == zero["skipped"]
        exact = clip is None  # with clipping the total norm is summed in another order
        for name in rep["masters"]:
            a, b = rep["masters"][name], zero["masters"][name]
            if exact:
                assert torch.equal(a, b), (r, name, (a - b).abs().max())
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for name in rep["working"]:
            if exact:
                assert torch.equal(rep["working"][name], zero["working"][name]), name
        # grad_stats: the shards' counts summed over the ranks (padding excluded) equal the
        # replicated step's counts of the whole gradients
        if exact:
            assert rep["counts"] == zero["counts"], (rep["counts"], zero["counts"])
        if example in ("mlp", "twice"):
            assert sum(rep["counts"][4][1]) > 0 and sum(rep["counts"][3][1]) == 0
        if exact:  # the inf batch's loss is NaN in both
            torch.testing.assert_close(torch.tensor(rep["losses"]), torch.tensor(zero["losses"]),
                                       rtol=0, atol=0, equal_nan=True)
        assert rep["scale"] == zero["scale"]
        # to_module gathers the masters (a collective) into a copy of the model
        for k, v in zero["model"].items():
            if exact:
                assert torch.equal(v, rep["model"][k]), k
        # per-rank FP32 state: the sharded parameters' masters and Adam moments halve (up to
        # one padding element per bucket); the replicated ones (FP32 uses) stay whole
        n_sh = sum(rep["masters"][f].numel() for f in zero["sharded"])
        n_all = sum(t.numel() for t in rep["masters"].values())
        per_opt = 8 if opt == "adam" else 4  # Adam's two moments, SGD's momentum buffer
        for s, per in (("master", 4), ("opt", per_opt)):
            kept = rep["bytes"][s] - per * n_sh  # the replicated parameters' share
            shard = zero["bytes"][s] - kept
            assert per * n_sh / 2 <= shard <= per * (n_sh / 2 + 64), (s, shard, per * n_sh)
        if example == "twice":
            assert "w" in zero["sharded"]
        if example == "mlp":  # every parameter is sharded: the FP32 state halves
            assert n_sh == n_all
            ratio = (zero["bytes"]["master"] + zero["bytes"]["opt"]) / (
                rep["bytes"]["master"] + rep["bytes"]["opt"])
            assert 0.5 <= ratio <= 0.501, ratio
        assert zero["bytes"]["working"] == rep["bytes"]["working"]
    if example == "lstm":  # fc.bias (5 elements) is padded to 6: rank 1's slice holds the pad
        assert sum(outs[1]["result"][True]["padding"]) > 0
        assert len(outs[1]["result"][True]["padding"]) == 2  # both param groups sharded
    # the ranks agree with each other
    assert outs[0]["result"][True]["skipped"] == outs[1]["result"][True]["skipped"]
    torch.testing.assert_close(torch.tensor(outs[0]["result"][True]["losses"]),
                               torch.tensor(outs[1]["result"][True]["losses"]), rtol=0, atol=0,
                               equal_nan=True)
    for name, v in outs[0]["result"][True]["masters"].items():
        assert torch.equal(v, outs[1]["result"][True]["masters"][name]), name


def test_sharding_needs_data_parallel_and_masters():
    model = EX.build().train()
    x, y = batch(EX)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainStepError, match="one process"):
        mpcompile.compile_train_step(model, EX.loss, x, y, optimizer=opt,
                                     shard_optimizer_state=True)
    with pytest.raises(TrainStepError, match="True or False"):
        mpcompile.compile_train_step(model, EX.loss, x, y, optimizer=opt,
                                     shard_optimizer_state="yes")


def test_shard_plan_pads_buckets_to_the_world_size():
    from mpcompile.train.distributed import plan_shards

    dp = DataParallel(None, 1, 2, "gloo", bucket_cap_mb=24 / 2**20)  # 12 FP16 elements
    sp = plan_shards(dp, {"a": 0, "b": 0, "c": 1}, {"a": (3, 3), "b": (5,), "c": (7,)},
                     ["a", "b", "c"], F16)
    assert [(b.group, [s.fqn for s in b.segments], b.padded) for b in sp.buckets] == [
        (0, ["a"], 10), (0, ["b"], 6), (1, ["c"], 8)]
    full = {"a": torch.arange(9.).view(3, 3), "b": torch.arange(5.) + 9, "c": torch.arange(7.)}
    # rank 1 owns the second half of each padded bucket
    assert sp.shard(0, full).tolist() == [5, 6, 7, 8, 0, 12, 13, 0]
    assert sp.shard(1, full).tolist() == [4, 5, 6, 0]
    # grad_stats subtracts the padding zeros of this rank's slices
    assert (sp.padding(0), sp.padding(1)) == (2, 1)
    rank0 = plan_shards(DataParallel(None, 0, 2, "gloo", bucket_cap_mb=24 / 2**20),
                        {"a": 0, "b": 0, "c": 1}, {"a": (3, 3), "b": (5,), "c": (7,)},
                        ["a", "b", "c"], F16)
    assert (rank0.padding(0), rank0.padding(1)) == (0, 0)
    assert rank0.shard(0, full).tolist() == [0, 1, 2, 3, 4, 9, 10, 11]


@pytest.mark.parametrize("shard", [True, False])
def test_checkpoint_at_step_5_resumes_bit_exactly_in_new_processes(tmp_path, shard):
    folder = str(tmp_path / "ckpt")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = _spawn(tmp_path / "a", "_ckpt_straight", folder, shard)
    assert [o.get("error") for o in straight] == [None, None]
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    # the first save's files were removed once the second save's manifest was in place
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(
        ["manifest.json", *manifest["files"]])
    assert manifest["world_size"] == 2 and manifest["sharded"] is shard
    assert [f.split("-")[0] for f in manifest["files"]] == ["rank0", "rank1"]
    assert manifest["step"] == 5
    resumed = _spawn(tmp_path / "b", "_ckpt_resume", folder, shard)
    assert [o.get("error") for o in resumed] == [None, None]
    for r in (0, 1):
        a, b = straight[r]["result"], resumed[r]["result"]
        assert a["losses"] == b["losses"]
        for k, v in a["state"].items():
            if torch.is_tensor(v):
                assert torch.equal(v, b["state"][k]), (r, k)
        for k, v in a["masters"].items():
            assert torch.equal(v, b["masters"][k]), (r, k)
    # another world size: one process
    one = _adam_step(0, False, seed=1)
    if shard:
        with pytest.raises(mpcompile.CheckpointError, match="written by 2 ranks with sharded"):
            one.load(folder)
    else:  # replicated: every rank's file holds the same state, one process resumes from it
        one.load(folder)
        for k, v in straight[0]["result"]["at_save"].items():
            assert torch.equal(one.masters()[k], v), k


def test_a_damaged_rank_file_refuses_the_load_on_every_rank(tmp_path):
    folder = tmp_path / "ckpt"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    outs = _spawn(tmp_path / "a", "_ckpt_straight", str(folder), True)
    assert [o.get("error") for o in outs] == [None, None]
    # the same shapes (1381 elements per slice), another shard plan (one bucket per
    # parameter instead of one for all four: other elements in each slice)
    (tmp_path / "c").mkdir()
    outs = _spawn(tmp_path / "c", "_ckpt_refused", str(folder), True, 0.001)
    for r in (0, 1):
        res = outs[r]["result"]
        assert res["unchanged"], r
        assert "sharded another way" in res["error"], res["error"]
    files = json.loads((folder / "manifest.json").read_text())["files"]
    data = bytearray((folder / files[1]).read_bytes())
    data[-10] ^= 0xFF
    (folder / files[1]).write_bytes(bytes(data))
    outs = _spawn(tmp_path / "b", "_ckpt_refused", str(folder), True)
    for r in (0, 1):
        res = outs[r]["result"]
        assert res["unchanged"], r
        assert "rank 1:" in res["error"] and "corrupted" in res["error"], res["error"]
