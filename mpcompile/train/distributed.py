"""Data parallelism inside the step graph, on torch.distributed (the design's "Scale-out").

    resolve             process_group=... -> a DataParallel spec (or None: one process)
    check_same          compile time: all-gather a fingerprint of the compile arguments; any
                        difference raises TrainStepError on every rank (no hang in a collective)
    broadcast_model     compile time: rank 0's parameters and buffers on every rank (as DDP)
    average_gradients   traced: the gradients, bucketed into flat buffers by dtype (DDP's
                        25 MB), divided by the world size, one functional all_reduce(sum) per
                        bucket, split back -- before unscale, as DDP + GradScaler
    agree_found_inf     traced: all_reduce(max) of the skip flag, so every rank skips together
    global_mean         traced: the reported loss averaged over ranks
    from_rank0          traced: the new buffers (batch-norm statistics) are rank 0's on every
                        rank, as DDP's broadcast_buffers

Sharded FP32 state (ZeRO stage 1, ``shard_optimizer_state=True``):

    plan_shards         compile time: the parameters the forward reads only as low-precision
                        working copies, per optimizer group, in flat buckets padded to a multiple
                        of the world size; rank r owns slice r of every bucket
    reduce_scatter_gradients   traced: per bucket, the gradients flattened, divided by the
                        world size, one functional reduce_scatter(sum): this rank's slice of
                        the averaged gradient
    gather_working      traced: the new low-precision working copies of a group's shard,
                        all-gathered per bucket and split back into parameters
    gather_masters      eager, collective: the full FP32 masters (to_module, sync_model)

The collectives are torch's functional collectives (``_c10d_functional.all_reduce`` +
``wait_tensor`` in the traced graph), so the step stays one graph that eager and Inductor run.

Assumption of the loss average: every rank's loss is its own batch's mean and all batches have
the same size (the fingerprint checks shapes), so the mean over ranks is the mean over the
concatenated batch, and the averaged gradient is its gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..dtypes import dtype_name
from ..errors import TrainStepError

F32 = torch.float32


@dataclass(frozen=True)
class DataParallel:
    """Which ranks the step averages over, and how its gradients are reduced."""

    group: Any  # torch.distributed.ProcessGroup
    rank: int  # this process's rank in the group
    world_size: int
    backend: str  # "gloo", "nccl", ...
    bucket_cap_mb: float = 25.0  # flat buffers up to this many MiB (DDP's default)
    reduce_dtype: torch.dtype | None = None  # None: the gradients' own dtype (as DDP)

    def __post_init__(self) -> None:
        _check_options(self.bucket_cap_mb, self.reduce_dtype)
        if not (self.world_size >= 2 and 0 <= self.rank < self.world_size):
            raise TrainStepError(f"rank {self.rank} of {self.world_size}: a data-parallel step "
                                 "needs at least 2 ranks")

    @property
    def cap_bytes(self) -> int:
        return max(1, int(self.bucket_cap_mb * 2**20))

    def __str__(self) -> str:
        return f"data-parallel over {self.world_size} ranks ({self.backend})"


def _check_options(bucket_cap_mb: float, reduce_dtype: torch.dtype | None) -> None:
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) \
            or not bucket_cap_mb > 0:
        raise TrainStepError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
    if reduce_dtype not in (None, F32):
        raise TrainStepError(
            f"grad_reduce_dtype={reduce_dtype}: give None (reduce the gradients in their own "
            "dtype, as DDP) or torch.float32")


def resolve(process_group: Any, bucket_cap_mb: float = 25.0,
            reduce_dtype: torch.dtype | None = None) -> DataParallel | None:
    """The data-parallel spec for ``process_group`` (None: torch.distributed's default group
    when it is initialised), or None when the step runs on one process (no group, or a group of
    one rank: nothing to average). The options are checked either way."""
    _check_options(bucket_cap_mb, reduce_dtype)
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    elif not (dist.is_available() and dist.is_initialized()):
        raise TrainStepError("process_group was given but torch.distributed is not initialised: "
                             "call torch.distributed.init_process_group first")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TrainStepError(f"process_group must be a torch.distributed.ProcessGroup, got "
                             f"{type(process_group).__name__}")
    world = dist.get_world_size(process_group)
    if world < 2:
        return None
    return DataParallel(process_group, dist.get_rank(process_group), world,
                        str(dist.get_backend(process_group)), bucket_cap_mb, reduce_dtype)


# -- compile time --------------------------------------------------------------------------

def fingerprint(model: torch.nn.Module, fields: dict[str, Any]) -> dict[str, str]:
    """What every rank must agree on, as strings: the model's structure (class, parameter and
    buffer names, shapes, dtypes) and the compile arguments in ``fields``."""
    def tensors(named) -> str:
        return ", ".join(f"{n} {dtype_name(t.dtype)}{list(t.shape)}" for n, t in named)

    out = {"model": f"{type(model).__qualname__}({tensors(model.named_parameters())}; "
                    f"buffers: {tensors(model.named_buffers())})"}
    out.update({k: str(v) for k, v in fields.items()})
    return out


def differences(prints: Sequence[dict[str, str]]) -> list[str]:
    """One line per (rank, field) that differs from rank 0's fingerprint."""
    first = prints[0]
    lines = []
    for r, p in enumerate(prints[1:], start=1):
        for k in sorted(set(first) | set(p)):
            if first.get(k) != p.get(k):
                lines.append(f"rank {r}'s {k} ({p.get(k)}) differs from rank 0's "
                             f"({first.get(k)})")
    return lines


def check_same(dp: DataParallel, prints: dict[str, str]) -> None:
    """All-gather every rank's fingerprint; a difference, or a rank whose arguments were
    refused (:func:`share_failure`), raises the same TrainStepError on every rank (each sees
    all of them), so no rank goes on to wait in a collective alone."""
    gathered = gather_objects(dp, (prints, None))
    failed = [(r, why) for r, (_, why) in enumerate(gathered) if why is not None]
    if failed:
        raise TrainStepError(
            "compile_train_step: " + "; ".join(f"rank {r} could not compile the step ({why})"
                                               for r, why in failed)
            + f". Every rank of the {dp} must compile the same step")
    diff = differences([p for p, _ in gathered])
    if diff:
        raise TrainStepError(
            f"compile_train_step: the ranks of the {dp} compiled different steps: "
            + "; ".join(diff) + ". Every rank must compile the same model with the same "
            "arguments and the same batch shapes")


def share_failure(dp: DataParallel, error: BaseException) -> None:
    """This rank's compile arguments were refused: take part in :func:`check_same`'s
    all-gather with the error instead of a fingerprint (the caller then raises it)."""
    gather_objects(dp, (None, f"{type(error).__name__}: {error}"))


def gather_objects(dp: DataParallel, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order (eager all_gather_object)."""
    gathered: list[Any] = [None] * dp.world_size
    dist.all_gather_object(gathered, obj, group=dp.group)
    return gathered


def broadcast_model(dp: DataParallel, model: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's model, in place (DDP does the
    same when it wraps a model), so all ranks start from the same masters."""
    src = dist.get_global_rank(dp.group, 0)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            dist.broadcast(t.data, src=src, group=dp.group)


# -- traced into the step -------------------------------------------------------------------

def plan_buckets(items: Sequence[tuple[int, torch.dtype]], cap_bytes: int) -> list[list[int]]:
    """Indices of ``items`` (numel, dtype) grouped into buckets: one dtype per bucket, in
    order, each up to ``cap_bytes`` (an item larger than the cap gets a bucket of its own)."""
    buckets: list[list[int]] = []
    open_: dict[torch.dtype, tuple[list[int], int]] = {}
    for i, (numel, dtype) in enumerate(items):
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        cur = open_.get(dtype)
        if cur is None or cur[1] + nbytes > cap_bytes:
            cur = ([], 0)
            buckets.append(cur[0])
        cur[0].append(i)
        open_[dtype] = (cur[0], cur[1] + nbytes)
    return buckets


def _all_reduce(t: torch.Tensor, op: str, dp: DataParallel) -> torch.Tensor:
    from torch.distributed import _functional_collectives as fc

    return fc.all_reduce(t, op, dp.group)


def average_gradients(dp: DataParallel, grads: dict[str, list[torch.Tensor]]
                      ) -> dict[str, list[torch.Tensor]]:
    """Every gradient part averaged over the ranks (in ``reduce_dtype`` or its own dtype):
    flat buffers by dtype up to the bucket cap, each divided by the world size (before the sum,
    as DDP) and all-reduced with one functional collective, then split back."""
    parts = [(fqn, i, t if dp.reduce_dtype is None else t.to(dp.reduce_dtype))
             for fqn, ts in grads.items() for i, t in enumerate(ts)]
    out: dict[str, list[Any]] = {fqn: [None] * len(ts) for fqn, ts in grads.items()}
    for idx in plan_buckets([(t.numel(), t.dtype) for _, _, t in parts], dp.cap_bytes):
        flat = torch.cat([parts[i][2].reshape(-1) for i in idx]) / dp.world_size
        flat = _all_reduce(flat, "sum", dp)
        for i, piece in zip(idx, flat.split([parts[i][2].numel() for i in idx])):
            fqn, k, t = parts[i]
            out[fqn][k] = piece.view(t.shape)
    return out


def agree_found_inf(dp: DataParallel, found: torch.Tensor) -> torch.Tensor:
    """bool 0-dim: some rank found a non-finite gradient (all_reduce max of the flags)."""
    return _all_reduce(found.to(F32), "max", dp) > 0


def global_mean(dp: DataParallel, loss: torch.Tensor) -> torch.Tensor:
    """The FP32 loss averaged over the ranks (equal batch sizes: the concatenated mean)."""
    return _all_reduce(loss.to(F32), "sum", dp) / dp.world_size


def from_rank0(dp: DataParallel, t: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of ``t`` on every rank (a functional broadcast from group rank 0)."""
    from torch.distributed import _functional_collectives as fc

    return fc.broadcast(t, 0, dp.group)


# -- sharded FP32 state (ZeRO-1) --------------------------------------------------------------

SHARD_PREFIX = "@shard"  # no parameter FQN holds "@": the state names cannot collide


def shard_fqn(group: int) -> str:
    """The pseudo-FQN of optimizer group ``group``'s shard in state names
    (``master.@shard.group0``, ``opt.@shard.group0.exp_avg``)."""
    return f"{SHARD_PREFIX}.group{group}"


@dataclass(frozen=True)
class Segment:
    """One parameter's place in a bucket's flat buffer."""

    fqn: str
    offset: int  # elements from the bucket's start
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Bucket:
    """Parameters of one optimizer group flattened together, padded to ``padded`` elements (a
    multiple of the world size); every rank owns ``padded // world_size`` of them."""

    group: int
    segments: tuple[Segment, ...]
    padded: int

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.segments)


@dataclass(frozen=True)
class ShardPlan:
    """Which parameters are sharded and how: buckets per optimizer group, in order. This rank's
    shard of group g is the concatenation of its slices of g's buckets."""

    world_size: int
    rank: int
    buckets: tuple[Bucket, ...]

    def __post_init__(self) -> None:
        for b in self.buckets:
            if b.padded % self.world_size or b.padded < b.numel:
                raise TrainStepError(f"bucket of group {b.group} padded to {b.padded} elements "
                                     f"for {b.numel}: not a multiple of {self.world_size}")

    @property
    def sharded(self) -> tuple[str, ...]:
        return tuple(s.fqn for b in self.buckets for s in b.segments)

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(sorted({b.group for b in self.buckets}))

    def of_group(self, group: int) -> tuple[Bucket, ...]:
        return tuple(b for b in self.buckets if b.group == group)

    def slice_numel(self, bucket: Bucket) -> int:
        return bucket.padded // self.world_size

    def shard_numel(self, group: int) -> int:
        return sum(self.slice_numel(b) for b in self.of_group(group))

    def padding(self, group: int) -> int:
        """Padding elements (not parameters) in this rank's shard of group ``group``."""
        pad = 0
        for b in self.of_group(group):
            n = self.slice_numel(b)
            lo, hi = self.rank * n, (self.rank + 1) * n
            pad += max(0, hi - max(lo, b.numel))
        return pad

    def shard(self, group: int, full: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This rank's FP32 shard of group ``group``, cut from the full tensors (compile time)."""
        pieces = []
        for b in self.of_group(group):
            flat = _flatten(b, {s.fqn: full[s.fqn].detach().to(F32) for s in b.segments}, F32)
            n = self.slice_numel(b)
            pieces.append(flat[self.rank * n:(self.rank + 1) * n])
        return torch.cat(pieces).clone()


def plan_shards(dp: DataParallel, group_of: Mapping[str, int],
                shapes: Mapping[str, tuple[int, ...]], sharded: Sequence[str],
                grad_dtype: torch.dtype) -> ShardPlan:
    """Buckets of the ``sharded`` parameters: per optimizer group, in ``group_of``'s order, up to
    the bucket cap (counted in ``grad_dtype``, the dtype the gradients are reduced in), each
    padded to a multiple of the world size."""
    elt = torch.empty((), dtype=grad_dtype).element_size()
    wanted = set(sharded)
    buckets: list[Bucket] = []
    n_groups = max(group_of.values(), default=-1) + 1
    for g in range(n_groups):
        fqns = [f for f, gi in group_of.items() if gi == g and f in wanted]
        for idx in plan_buckets([(math.prod(shapes[f]), grad_dtype) for f in fqns],
                                max(dp.cap_bytes, elt)):
            segs, off = [], 0
            for i in idx:
                segs.append(Segment(fqns[i], off, tuple(shapes[fqns[i]])))
                off += math.prod(shapes[fqns[i]])
            padded = -(-off // dp.world_size) * dp.world_size
            buckets.append(Bucket(g, tuple(segs), padded))
    return ShardPlan(dp.world_size, dp.rank, tuple(buckets))


def _flatten(bucket: Bucket, tensors: Mapping[str, torch.Tensor],
             dtype: torch.dtype) -> torch.Tensor:
    """The bucket's flat buffer in ``dtype``: each segment's tensor, then zero padding."""
    pieces = [tensors[s.fqn].reshape(-1).to(dtype) for s in bucket.segments]
    if bucket.padded > bucket.numel:
        pieces.append(pieces[0].new_zeros(bucket.padded - bucket.numel))
    return torch.cat(pieces)


def _reduce_scatter(t: torch.Tensor, dp: DataParallel) -> torch.Tensor:
    from torch.distributed import _functional_collectives as fc

    fn = getattr(fc, "reduce_scatter_single", None) or fc.reduce_scatter_tensor
    return fn(t, "sum", 0, dp.group)


def _all_gather(t: torch.Tensor, dp: DataParallel) -> torch.Tensor:
    from torch.distributed import _functional_collectives as fc

    fn = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
    return fn(t, 0, dp.group)


def reduce_scatter_gradients(dp: DataParallel, sp: ShardPlan,
                             grads: Mapping[str, Sequence[torch.Tensor]]
                             ) -> dict[int, torch.Tensor]:
    """Per optimizer group, this rank's shard of the averaged gradient (in ``reduce_dtype`` or
    the gradients' own dtype): each bucket flattened, divided by the world size and
    reduce-scattered -- the same arithmetic per element as :func:`average_gradients`, on
    1/world_size of the elements -- and the group's slices concatenated.

    A sharded parameter is read only as its working copy, so its gradient is one tensor
    (autograd sums repeated uses), in the low precision."""
    out: dict[int, list[torch.Tensor]] = {}
    for b in sp.buckets:
        missing = [s.fqn for s in b.segments if not grads.get(s.fqn)]
        if missing:
            raise TrainStepError(
                f"shard_optimizer_state=True: no gradient reaches parameter(s) {missing}; "
                "freeze them (requires_grad=False) before compiling, or use the replicated "
                "step (shard_optimizer_state=False), which skips them as torch.optim does")
        (first,) = grads[b.segments[0].fqn]
        dtype = dp.reduce_dtype or first.dtype
        flat = _flatten(b, {s.fqn: _one(grads[s.fqn], s.fqn) for s in b.segments}, dtype)
        out.setdefault(b.group, []).append(_reduce_scatter(flat / dp.world_size, dp))
    return {g: torch.cat(slices) for g, slices in out.items()}


def _one(parts: Sequence[torch.Tensor], fqn: str) -> torch.Tensor:
    if len(parts) != 1:  # _only_working picks parameters with one input: a bug if not
        raise TrainStepError(f"sharded parameter {fqn} has {len(parts)} gradient inputs; "
                             "a sharded parameter is read only as its working copy")
    return parts[0]


def gather_working(dp: DataParallel, sp: ShardPlan, group: int, shard: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """The full tensors of group ``group``'s parameters, from every rank's ``shard`` (the new
    low-precision working copies): one functional all_gather per bucket, split back."""
    out, start = {}, 0
    for b in sp.of_group(group):
        n = sp.slice_numel(b)
        full = _all_gather(shard[start:start + n], dp)
        start += n
        for s in b.segments:
            out[s.fqn] = full[s.offset:s.offset + s.numel].view(s.shape)
    return out


def all_reduce_sum(dp: DataParallel, t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (traced)."""
    return _all_reduce(t, "sum", dp)


def gather_masters(dp: DataParallel, sp: ShardPlan, shards: Mapping[int, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """The full FP32 masters of the sharded parameters, gathered from every rank's shards
    (eager; a collective: every rank must call it)."""
    out, offsets = {}, dict.fromkeys(shards, 0)
    for b in sp.buckets:
        n = sp.slice_numel(b)
        mine = shards[b.group][offsets[b.group]:offsets[b.group] + n].contiguous()
        offsets[b.group] += n
        full = mine.new_empty(b.padded)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(full, mine, group=dp.group)
        for s in b.segments:
            out[s.fqn] = full[s.offset:s.offset + s.numel].view(s.shape).clone()
    return out
