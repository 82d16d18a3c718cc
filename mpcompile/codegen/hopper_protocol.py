"""The Hopper kernel's mbarrier pipeline protocol, as data.

A :class:`Protocol` says what the producer thread and the consumer warpgroups of ``hopper.py``
do to hand the ring of shared-memory stages back and forth: the mbarriers with their init counts
(``full[stage]``, completed by the producer's ``arrive.expect_tx`` plus the TMA unit's
``complete_tx`` bytes; ``empty[stage]``, completed by the consumers' releases), the producer's
steps for each k-tile, the consumers' steps for each k-tile and after a tile's last one (the
drain). Both roles walk the persistent tile sequence (:func:`tile_ids`) and one ring: the stage
advances after every k-tile, across tiles, and the phase bit flips when it wraps.

The renderer (``hopper.py``) turns every step into C++: the init counts, the wait parities
(``phase ^ flip``), the ``expect_tx`` byte count, the ``wgmma.wait_group`` depth, which stage a
release arrives on (the k-tile ``lag`` behind) and which threads arrive all come from here. The
NumPy model (``hopper_model.py``) executes the same steps literally with its mbarrier model, under
several interleavings of producer, TMA unit and consumers, and raises on a deadlock, a stage read
before its TMA data landed, a stage overwritten while a wgmma may still read it, an over-arrival
or a phase that completes without every releasing thread (a wrong init count).

mbarrier semantics (PTX ISA 9.7.13.15): a phase completes when its pending arrival count reaches
zero and its transaction count is zero; ``try_wait.parity p`` succeeds once the phase of parity
``p`` has completed, i.e. while the current phase's parity differs from ``p`` (so on a fresh
barrier, in phase 0, a wait for parity 1 passes at once). ``wgmma.wait_group n`` (9.7.15.7) waits
until all but the ``n`` most recent committed wgmma groups are complete: only then may their
shared memory be overwritten.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import KernelError

WARPGROUP = 128
WARP = 32


class ProtocolError(KernelError, ValueError):
    """A protocol description that is malformed (names the step); semantic faults (deadlocks,
    races, wrong counts) are for the model to find, not refused here."""


class Op(str, enum.Enum):
    WAIT = "wait"  # mbarrier.try_wait.parity on bar[stage], parity = phase ^ n
    EXPECT_TX = "expect_tx"  # mbarrier.arrive.expect_tx on bar[stage]: one arrival, n bytes
    LOAD = "load"  # the k-tile's TMA boxes into the stage, complete_tx on bar[stage]
    FENCE = "fence"  # wgmma.fence (before the first wgmma touching the accumulators)
    MMA = "mma"  # the k-tile's wgmmas on the stage's descriptors
    COMMIT = "commit"  # wgmma.commit_group
    WAIT_GROUP = "wait_group"  # wgmma.wait_group n
    RELEASE = "release"  # arrive on bar[stage of k-tile i - n], once per `unit` of threads
    ADVANCE = "advance"  # next ring stage; the phase bit flips on the wrap
    STORE = "store"  # the epilogue: from registers (n = 0) or staged through the stage n back


# Who arrives in a RELEASE: threads per arrival (the lowest-numbered thread of each group).
UNITS = {"thread": 1, "warp": WARP, "warpgroup": WARPGROUP}

_BARRIER_OPS = (Op.WAIT, Op.EXPECT_TX, Op.LOAD, Op.RELEASE)


@dataclass(frozen=True)
class Barrier:
    """One mbarrier per ring stage, initialised with ``count`` expected arrivals per phase."""

    name: str
    count: int

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ProtocolError(f"barrier name {self.name!r} must be an identifier")
        if not 1 <= self.count < 2 ** 20:
            raise ProtocolError(f"barrier {self.name}: init count {self.count} must be in "
                                "1..2^20-1 (mbarrier.init)")


@dataclass(frozen=True)
class Step:
    """One step: ``bar`` names the barrier (WAIT, EXPECT_TX, LOAD, RELEASE); ``n`` is the parity
    flip (WAIT: 0 or 1), the byte count (EXPECT_TX), the groups left in flight (WAIT_GROUP) or
    the release lag in k-tiles (RELEASE), or 0 / the lag of the stage the epilogue stages its
    output through (STORE); ``unit`` says which threads arrive (RELEASE)."""

    op: Op
    bar: str = ""
    n: int = 0
    unit: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", Op(self.op))
        if (self.op in _BARRIER_OPS) != bool(self.bar):
            raise ProtocolError(f"protocol step {self.op.value}: a barrier is "
                                + ("required" if self.op in _BARRIER_OPS else "not allowed"))
        if self.n < 0 or (self.op is Op.WAIT and self.n not in (0, 1)):
            raise ProtocolError(f"protocol step {self.op.value} {self.bar}: n={self.n} out of "
                                "range (WAIT: parity flip 0 or 1; others >= 0)")
        if (self.op is Op.RELEASE) != bool(self.unit) or (self.unit and self.unit not in UNITS):
            raise ProtocolError(f"protocol step {self.op.value}: unit {self.unit!r}: a RELEASE "
                                f"names one of {sorted(UNITS)}, other steps none")


@dataclass(frozen=True)
class Protocol:
    """The pipeline of ``stages`` ring buffers between one producer thread and ``consumers``
    warpgroups. ``producer`` runs for every k-tile ``i`` of every tile; ``consumer`` likewise;
    ``drain`` and then ``epilogue`` once per tile after its last k-tile, with ``i = k_tiles``.
    A RELEASE of lag ``n`` at step ``i`` arrives for k-tile ``i - n`` of the tile, if it
    exists; a staged STORE reuses the stage of k-tile ``i - n``, which must not be released
    before it."""

    stages: int
    consumers: int
    barriers: tuple[Barrier, ...]
    producer: tuple[Step, ...]
    consumer: tuple[Step, ...]
    drain: tuple[Step, ...]
    epilogue: tuple[Step, ...] = (Step(Op.STORE),)

    def __post_init__(self) -> None:
        for part in ("barriers", "producer", "consumer", "drain", "epilogue"):
            object.__setattr__(self, part, tuple(getattr(self, part)))
        if self.stages < 1 or self.consumers < 1:
            raise ProtocolError(f"protocol: stages={self.stages}, consumers={self.consumers} "
                                "must be >= 1")
        names = [b.name for b in self.barriers]
        if len(set(names)) != len(names):
            raise ProtocolError(f"protocol: barrier names {names} repeat")
        for role in ("producer", "consumer", "drain", "epilogue"):
            for s in getattr(self, role):
                if s.bar and s.bar not in names:
                    raise ProtocolError(f"protocol {role} step {s.op.value}: no barrier "
                                        f"{s.bar!r} (have {names})")
        for role, once in (("producer", (Op.LOAD, Op.ADVANCE)), ("consumer", (Op.MMA, Op.ADVANCE))):
            for op in once:
                if sum(s.op is op for s in getattr(self, role)) != 1:
                    raise ProtocolError(f"protocol {role}: needs exactly one {op.value} step "
                                        "per k-tile")
        bad = [s.op.value for s in self.drain if s.op in (Op.LOAD, Op.MMA, Op.ADVANCE, Op.WAIT,
                                                           Op.STORE)]
        bad += [s.op.value for s in self.epilogue if s.op not in (Op.STORE, Op.RELEASE)]
        if bad:
            raise ProtocolError(f"protocol drain / epilogue: {bad} not allowed after the k-loop")
        if [s.op for s in self.epilogue].count(Op.STORE) != 1 or any(
                s.op is Op.STORE for s in (*self.producer, *self.consumer)):
            raise ProtocolError("protocol: the epilogue stores once per tile (one STORE step, "
                                "in the epilogue only)")

    def barrier(self, name: str) -> Barrier:
        return next(b for b in self.barriers if b.name == name)

    def index(self, name: str) -> int:
        """Position of barrier ``name``: its mbarriers lie at ``8 * (index * stages + stage)``
        bytes after the barrier area's start."""
        return [b.name for b in self.barriers].index(name)

    @classmethod
    def for_ring(cls, stages: int, consumers: int, stage_bytes: int, in_flight: int = 1,
                 staged: bool = False) -> Protocol:
        """The kernel's protocol. Producer, per k-tile: wait until the consumers released the
        stage's previous contents (``empty``, parity ``phase ^ 1``: passes at once in the
        first lap), announce ``stage_bytes`` on ``full`` with its one arrival, issue the TMA
        loads, advance. Consumers: wait for the data (``full``, parity ``phase``), fence, issue
        the wgmmas, commit, keep ``in_flight`` groups in flight (``wait_group in_flight``),
        release the stage of the k-tile ``in_flight`` back (which that wait retired: one
        arrival per warp), advance; after a tile's last k-tile retire everything and release
        the stages not yet released, oldest first. Needs ``stages > in_flight``, or the
        consumers wait for a stage they have not released (the model finds the deadlock).
        ``staged``: the epilogue stages its output through the last k-tile's stage, released
        only after it (the producer may refill every other stage meanwhile)."""
        last = 1 if staged else 0
        return cls(
            stages=stages, consumers=consumers,
            barriers=(Barrier("full", 1), Barrier("empty", consumers * WARPGROUP // WARP)),
            producer=(Step(Op.WAIT, "empty", 1), Step(Op.EXPECT_TX, "full", stage_bytes),
                      Step(Op.LOAD, "full"), Step(Op.ADVANCE)),
            consumer=(Step(Op.WAIT, "full", 0), Step(Op.FENCE), Step(Op.MMA), Step(Op.COMMIT),
                      Step(Op.WAIT_GROUP, n=in_flight),
                      Step(Op.RELEASE, "empty", in_flight, "warp"), Step(Op.ADVANCE)),
            drain=(Step(Op.WAIT_GROUP, n=0),
                   *(Step(Op.RELEASE, "empty", lag, "warp")
                     for lag in range(in_flight, last, -1))),
            epilogue=(Step(Op.STORE, n=last),
                      *((Step(Op.RELEASE, "empty", 1, "warp"),) if staged else ())))


def tile_ids(cta: int, ctas: int, total: int) -> range:
    """The output tiles CTA ``cta`` of a persistent grid of ``ctas`` walks (both roles): the
    kernel's ``for (tile = blockIdx.x; tile < total; tile += gridDim.x)``."""
    return range(cta, total, ctas)


def ring_after(stage: int, phase: int, stages: int) -> tuple[int, int]:
    """ADVANCE: the next stage; the phase bit flips when the ring wraps."""
    return (0, phase ^ 1) if stage + 1 == stages else (stage + 1, phase)


def stage_back(stage: int, lag: int, stages: int) -> int:
    """The ring stage ``lag`` k-tiles before ``stage`` (the stage counter runs on across tiles)."""
    return (stage - lag) % stages


__all__ = ["UNITS", "Barrier", "Op", "Protocol", "ProtocolError", "Step", "ring_after",
           "stage_back", "tile_ids"]
