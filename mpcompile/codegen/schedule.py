"""The software pipeline of a kernel's main loop, as data.

A :class:`Schedule` lists what the block does, in order: wait for ``cp.async`` groups, barrier,
issue the copies of a k-tile into its shared-memory stage, commit the group, compute a k-tile. The
renderer turns each event into one C++ statement; the NumPy model (``model.py``) executes the
same events literally, moving the data through a ring of stage buffers, and a :class:`Pipeline`
tracks what the hardware would let go wrong without a word: a stage read before its copies
completed (and were made visible to every thread by a barrier), or a stage overwritten while
warps may still read it. So a wrong wait count or a missing barrier fails a model run, not only
a source snapshot.

``cp.async`` semantics (PTX ISA, "cp.async.wait_group"): ``commit_group`` closes the copies
issued since the previous commit into a group; ``wait_group N`` waits until all but the ``N``
most recent committed groups are complete, for the issuing thread. Another thread sees the data
only after a barrier that follows the completion. Plain (synchronous) shared-memory stores
complete at once and also need the barrier.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import KernelError


class ModelCheckError(KernelError, AssertionError):
    """The model found what the hardware would not report: colliding copies, a misaligned
    ldmatrix address, a fragment layout that misses or repeats an element, a double store, a
    stage read before its copies completed, or a stage overwritten while being read."""


class Op(str, enum.Enum):
    WAIT = "wait"  # cp.async.wait_group n
    BARRIER = "barrier"  # __syncthreads()
    LOAD = "load"  # issue the copies of k-tile (i + n) into stage (i + n) % stages
    COMMIT = "commit"  # cp.async.commit_group
    COMPUTE = "compute"  # ldmatrix + mma.sync on k-tile (i + n) from its stage


@dataclass(frozen=True)
class Event:
    op: Op
    n: int = 0  # WAIT: groups left in flight; LOAD/COMPUTE: k-tile offset from the step index

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", Op(self.op))
        if self.n < 0:
            raise KernelError(f"schedule event {self.op.value} {self.n}: n must be >= 0")


@dataclass(frozen=True)
class Schedule:
    """``prologue`` runs for step i in 0..depth-1, ``body`` for step i = kt in 0..k_tiles-1,
    ``drain`` once after the loop (with i = k_tiles). Loads and computes of a k-tile at or
    beyond k_tiles are skipped (a commit still closes an empty group, as in the kernel)."""

    stages: int
    depth: int
    prologue: tuple[Event, ...]
    body: tuple[Event, ...]
    drain: tuple[Event, ...]

    def __post_init__(self) -> None:
        for part in ("prologue", "body", "drain"):
            object.__setattr__(self, part, tuple(getattr(self, part)))
        if self.stages < 2 or not 0 <= self.depth < self.stages:
            raise KernelError(f"schedule: stages={self.stages}, depth={self.depth}: need "
                              "stages >= 2 and 0 <= depth < stages")
        computes = [e for e in self.body if e.op is Op.COMPUTE]
        if len(computes) != 1:
            raise KernelError("schedule: the loop body must compute exactly one k-tile")

    @classmethod
    def for_stages(cls, stages: int, smem_epilogue: bool = False) -> Schedule:
        """The multistage pipeline: ``stages - 1`` k-tiles in flight before the loop; each step
        waits for its own tile (all but the ``stages - 2`` newest groups), barriers (the tile is
        visible to all, and every warp has finished computing the stage the step refills), issues
        the tile ``stages - 1`` ahead into that stage, commits, and computes. The drain waits for
        every group and, when the epilogue reuses shared memory, barriers before it does."""
        depth = stages - 1
        return cls(
            stages=stages, depth=depth,
            prologue=(Event(Op.LOAD), Event(Op.COMMIT)),
            body=(Event(Op.WAIT, stages - 2), Event(Op.BARRIER), Event(Op.LOAD, depth),
                  Event(Op.COMMIT), Event(Op.COMPUTE)),
            drain=(Event(Op.WAIT, 0), *((Event(Op.BARRIER),) if smem_epilogue else ())))


class Pipeline:
    """The state of the stage ring while a schedule executes: which k-tile each stage holds, the
    ``cp.async`` group of its copies, whether a barrier has made them visible, and whether warps
    may still be reading it. Each method raises :class:`ModelCheckError` on a race."""

    def __init__(self, stages: int, name: str = "kernel"):
        self.name = name
        self.stages = stages
        self.tile = [None] * stages  # k-tile held by each stage
        self.group = [None] * stages  # the group id of its copies (None: synchronous / none)
        self.visible = [True] * stages  # completed and made visible by a barrier since
        self.reading = [False] * stages  # computed since the last barrier
        self.pending: list[int] = []  # group ids committed and not yet complete, oldest first
        self.open: list[int] = []  # stages whose copies were issued since the last commit
        self.next_group = 0
        self.complete_unseen: set[int] = set()  # stages complete, awaiting a barrier

    def load(self, stage: int, tile: int, asynchronous: bool) -> None:
        if self.reading[stage]:
            raise ModelCheckError(
                f"{self.name}: stage {stage} overwritten while being read (k-tile {tile} "
                f"issued into it before a barrier after k-tile {self.tile[stage]}'s compute)")
        if stage in self.open or (self.group[stage] is not None
                                  and self.group[stage] in self.pending):
            raise ModelCheckError(f"{self.name}: stage {stage} refilled with k-tile {tile} "
                                  "while its previous copies are still in flight")
        self.tile[stage], self.visible[stage] = tile, False
        if asynchronous:
            self.group[stage] = None
            self.open.append(stage)
        else:
            self.group[stage] = None
            self.complete_unseen.add(stage)

    def commit(self) -> None:
        gid = self.next_group
        self.next_group += 1
        for s in self.open:
            self.group[s] = gid
        self.open = []
        self.pending.append(gid)

    def wait(self, n: int) -> None:
        """cp.async.wait_group n: all but the n most recent committed groups are complete."""
        done = self.pending[: max(0, len(self.pending) - n)]
        self.pending = self.pending[len(done):]
        for s in range(self.stages):
            if self.group[s] in done:
                self.complete_unseen.add(s)

    def barrier(self) -> None:
        for s in self.complete_unseen:
            self.visible[s] = True
        self.complete_unseen = set()
        self.reading = [False] * self.stages

    def read(self, stage: int, tile: int) -> None:
        if self.tile[stage] != tile or not self.visible[stage]:
            raise ModelCheckError(
                f"{self.name}: stage {stage} read for k-tile {tile} before its copies "
                "completed (or before a barrier made them visible to every warp)"
                + ("" if self.tile[stage] == tile else f"; it holds k-tile {self.tile[stage]}"))
        self.reading[stage] = True

    def quiescent(self, reuse: bool) -> None:
        """After the drain: nothing may still be in flight (the epilogue and the block's exit
        must not race with copies), and when the epilogue ``reuse``-s the ring's shared memory,
        no warp may still be reading a stage."""
        if self.open or self.pending:
            raise ModelCheckError(f"{self.name}: copies still in flight after the main loop")
        if reuse and any(self.reading):
            raise ModelCheckError(f"{self.name}: shared memory reused by the epilogue while "
                                  "warps may still read a stage (no barrier after the loop)")


def execute(schedule: Schedule, k_tiles: int, load, compute, asynchronous: bool = True,
            reuse: bool = True, name: str = "kernel") -> Pipeline:
    """Run ``schedule`` over ``k_tiles`` k-tiles: ``load(stage, tile)`` fills a stage buffer,
    ``compute(stage, tile)`` consumes one; the pipeline state is checked at every event.
    ``reuse``: the epilogue then writes the ring's shared memory."""
    pipe = Pipeline(schedule.stages, name)

    def run(events, i: int) -> None:
        for e in events:
            if e.op is Op.WAIT:
                pipe.wait(e.n)
            elif e.op is Op.BARRIER:
                pipe.barrier()
            elif e.op is Op.COMMIT:
                pipe.commit()
            elif i + e.n < k_tiles:  # LOAD / COMPUTE of an existing k-tile
                tile = i + e.n
                stage = tile % schedule.stages
                if e.op is Op.LOAD:
                    pipe.load(stage, tile, asynchronous)
                    load(stage, tile)
                else:
                    pipe.read(stage, tile)
                    compute(stage, tile)

    for i in range(schedule.depth):
        run(schedule.prologue, i)
    for kt in range(k_tiles):
        run(schedule.body, kt)
    run(schedule.drain, k_tiles)
    pipe.quiescent(reuse)
    return pipe


__all__ = ["Event", "ModelCheckError", "Op", "Pipeline", "Schedule", "execute"]
