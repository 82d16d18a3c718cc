"""A NumPy model of the Hopper kernel (``hopper.py``): TMA boxes, the swizzled shared memory,
wgmma descriptors, accumulator registers, the epilogue and the stores, for every CTA of the
persistent grid, plus the producer/consumer mbarrier protocol.

It runs the same functions the renderer emits (``wgmma.py``, ``OperandPlan``, the tensor-map
arguments of ``runtime.tma``), and checks on the way what the hardware would not report:

- TMA (``cp.async.bulk.tensor``, CUDA driver API ``CU_TENSOR_MAP_SWIZZLE_128B``): each box
  element lands in a distinct shared-memory slot of its stage, out-of-bounds elements as zeros;
- wgmma (PTX ISA 9.7.15.5.1.2, canonical layouts and the matrix descriptor format): every
  descriptor is decoded from its 64 bits and every operand element read through the canonical
  layout + 128B swizzle must be a slot this stage's TMA wrote (not stale, not another stage);
- the accumulator fragment (PTX ISA 9.7.15.5.1.1.1, Figure 149): the 128 threads' registers
  hold each element of the m64nN result exactly once, and each output element is stored once;
- the mbarrier protocol (PTX ISA 9.7.13.15, mbarrier phases and ``try_wait.parity``): the
  producer, the TMA unit and the consumers run as coroutines executing the steps of the same
  :class:`~.hopper_protocol.Protocol` the renderer emits, under several interleavings
  (:data:`POLICIES`); a consumer must find in a stage exactly the k-tile it expects, no TMA load
  may land in a stage an unretired wgmma group may still read, every barrier phase must
  complete on exactly its releasing threads and announced bytes, and nothing may deadlock
  (:func:`check_protocol` runs the protocol alone on ragged tile / k-tile counts).

The result is compared with a float64 matmul in the tests, on ragged shapes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..dtypes import FLOAT32, info
from ..errors import KernelError
from . import wgmma as wg
from .epilogue import OPS, Operands, round_to
from .hopper import (
    HopperConfig,
    OperandPlan,
    check,
    operand_plan,
    protocol_for,
    staging_base,
    tiles,
)
from .hopper_protocol import (
    UNITS,
    WARPGROUP,
    Op,
    Protocol,
    ring_after,
    stage_back,
    tile_ids,
)
from .spec import KernelSpec


class HopperModelError(KernelError, AssertionError):
    """The model found a layout or protocol fault (names it)."""


# -- data path --------------------------------------------------------------------------------


class SharedMemory:
    """Byte-addressed shared memory of one CTA holding 16-bit values (as float64), with the
    generation of the TMA write that filled each slot."""

    def __init__(self, size: int):
        self.values = np.full(size // wg.ELEM_BYTES, np.nan)
        self.tag = np.full(size // wg.ELEM_BYTES, -1, dtype=np.int64)

    def tma_load(self, args, mem: np.ndarray, dst: int, coords: tuple[int, int],
                 tag: int) -> None:
        """One 2-D TMA box into ``dst`` (1024-byte aligned), zeros out of bounds."""
        if dst % wg.SWIZZLE_ATOM_BYTES:
            raise HopperModelError(f"TMA destination {dst:#x} not 1024-byte aligned (128B swizzle)")
        inner, outer = np.meshgrid(np.arange(args.box[0]), np.arange(args.box[1]), indexing="ij")
        gi, go = coords[0] + inner, coords[1] + outer
        inside = (gi < args.dims[0]) & (go < args.dims[1]) & (gi >= 0) & (go >= 0)
        vals = np.where(inside, mem[np.where(inside, args.offset(gi, go), 0)], 0.0)
        slot = (dst + wg.tma_box_offset(inner, outer)) // wg.ELEM_BYTES
        if len(np.unique(slot)) != slot.size:
            raise HopperModelError("TMA box elements collide in shared memory")
        if slot.max() >= self.values.size:
            raise HopperModelError("TMA box runs past the end of shared memory")
        self.values[slot] = vals
        self.tag[slot] = tag

    def read_operand(self, desc: int, rows: int, k_major: bool, tag: int) -> np.ndarray:
        """The ``rows x 16`` operand (rows along M or N, 16 along K) wgmma reads through
        ``desc``; every element must come from the TMA write tagged ``tag``."""
        mn, k = np.meshgrid(np.arange(rows), np.arange(16), indexing="ij")
        addr = wg.operand_address(desc, mn, k, k_major)
        if (addr % wg.ELEM_BYTES).any():
            raise HopperModelError("wgmma operand address not 2-byte aligned")
        slot = addr // wg.ELEM_BYTES
        if slot.max() >= self.values.size or (self.tag[slot] != tag).any():
            raise HopperModelError(f"wgmma descriptor {desc:#x} reads shared memory that this "
                                   "stage's TMA loads did not write")
        if len(np.unique(slot)) != slot.size:
            raise HopperModelError(f"wgmma descriptor {desc:#x} reads one slot twice")
        return self.values[slot]


def _descriptor(plan: OperandPlan, stage_addr: int, row0: int, ks: int) -> int:
    """The descriptor the kernel builds: constant fields | encoded start address."""
    return plan.desc_constant | wg.encode_field(stage_addr + plan.desc_offset(row0, ks))


def _registers(d: np.ndarray) -> np.ndarray:
    """Distribute an m64nN result to the 128 threads' registers (Figure 149), checking each
    element is held exactly once."""
    n_regs = d.shape[1] // 2
    t, i = np.meshgrid(np.arange(wg.WARPGROUP), np.arange(n_regs), indexing="ij")
    row, col = wg.acc_coords(t, i)
    seen = np.zeros(d.shape, dtype=int)
    np.add.at(seen, (row, col), 1)
    if not (seen == 1).all():
        raise HopperModelError("accumulator fragment layout does not cover m64nN exactly once")
    return d[row, col]


# -- pipeline protocol --------------------------------------------------------------------------


class MBarrier:
    """An mbarrier of one ring stage: expected arrivals per phase, pending transaction bytes,
    the phase bit. Each arrival names who arrives and for which k-tile (``tag``); when a phase
    completes, ``arrivers`` (if given) must each have arrived exactly once, all for one k-tile:
    an init count below the number of releasing threads completes a phase early, which the
    hardware would not report."""

    def __init__(self, count: int, name: str = "mbarrier", arrivers=None):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0
        self.name = name
        self.arrivers = None if arrivers is None else sorted(arrivers, key=str)
        self.arrivals: list[tuple] = []  # (who, tag) in the current phase

    def arrive(self, tx: int = 0, who=None, tag=None) -> None:
        self.tx += tx
        self.pending -= 1
        self.arrivals.append((who, tag))
        if self.pending < 0:
            raise HopperModelError(f"{self.name}: more arrivals than its count {self.count}")
        self._maybe_complete()

    def complete_tx(self, nbytes: int, tag=None) -> None:
        self.tx -= nbytes
        if self.tx < 0:
            raise HopperModelError(f"{self.name}: TMA completed more bytes than expect_tx "
                                   f"announced (k-tile {tag}): the expect_tx byte count is low")
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if self.pending or self.tx:
            return
        whos = sorted((w for w, _ in self.arrivals), key=str)
        tags = {t for _, t in self.arrivals}
        if self.arrivers is not None and whos != self.arrivers:
            missing = [w for w in self.arrivers if w not in whos]
            raise HopperModelError(
                f"{self.name}: a phase completed on {len(whos)} arrivals (init count "
                f"{self.count}) without {missing or 'the right arrivals'}: the count must be "
                f"the {len(self.arrivers)} threads that release it")
        if len(tags) > 1:
            raise HopperModelError(f"{self.name}: one phase collected arrivals for k-tiles "
                                   f"{sorted(tags, key=str)}: releases of different stages' "
                                   "contents mixed (wrong count or release index)")
        self.phase ^= 1
        self.pending = self.count
        self.arrivals = []

    def ready(self, parity: int) -> bool:
        """``try_wait.parity``: true once the phase with that parity has completed."""
        return self.phase != parity


class Ring:
    """What each stage of the shared-memory ring holds (k-tile tags), the TMA boxes in flight,
    and the consumers' wgmma groups that may still read a stage; raises on a stage read before
    its data landed and on a stage overwritten while a wgmma may still read it."""

    def __init__(self, stages: int, consumers: int):
        self.held = [None] * stages  # tag of the k-tile whose boxes all landed (None: landing)
        # per stage and consumer: wgmmas issued on it and not yet retired
        self.readers = [[0] * consumers for _ in range(stages)]
        self.tma: list[tuple] = []  # queued boxes: (stage, tag, barrier, bytes, land, last)

    def land(self) -> None:
        stage, tag, bar, nbytes, land, last = self.tma.pop(0)
        busy = [cw for cw, n in enumerate(self.readers[stage]) if n]
        if busy:
            raise HopperModelError(
                f"stage {stage} overwritten by k-tile {tag}'s TMA load while the wgmmas of "
                f"consumer warpgroup {busy[0]} may still read it (released before "
                "wgmma.wait_group retired them, or read before the data landed)")
        self.held[stage] = None
        if land is not None:
            land()
        if last:
            self.held[stage] = tag
        bar.complete_tx(nbytes, tag)

    def read(self, stage: int, tag) -> None:
        if self.held[stage] != tag:
            raise HopperModelError(
                f"stage {stage} read for k-tile {tag} but it holds "
                f"{'a partly landed k-tile' if self.held[stage] is None else self.held[stage]}: "
                "a consumer passed its wait before the TMA data landed (wrong parity or count)")


class Cta:
    """One CTA's shared state: the ring and its mbarriers (one per protocol barrier and stage)."""

    def __init__(self, protocol: Protocol):
        self.p = protocol
        self.ring = Ring(protocol.stages, protocol.consumers)
        arrivers = _arrivers(protocol)
        self.bars = {b.name: [MBarrier(b.count, f"{b.name}[{s}]", arrivers[b.name])
                              for s in range(protocol.stages)] for b in protocol.barriers}


def _arrivers(p: Protocol) -> dict[str, list]:
    """Who arrives on each barrier in one phase, from the steps: the producer's expect_tx, or
    each consumer warpgroup's releasing threads."""
    out: dict[str, list] = {b.name: [] for b in p.barriers}
    for s in p.producer:
        if s.op is Op.EXPECT_TX and "producer" not in out[s.bar]:
            out[s.bar].append("producer")
    for s in (*p.consumer, *p.drain, *p.epilogue):
        if s.op is Op.RELEASE:
            whos = [(cw, u) for cw in range(p.consumers)
                    for u in range(WARPGROUP // UNITS[s.unit])]
            out[s.bar] += [w for w in whos if w not in out[s.bar]]
    return {k: (v or None) for k, v in out.items()}


def _producer(cta: Cta, tiles: list[int], k_tiles: int, boxes):
    """The producer thread: the protocol's producer steps for every k-tile of every tile.
    ``boxes(tile, kt, stage)`` lists the k-tile's TMA boxes as (bytes, land function or None)."""
    p, stage, phase = cta.p, 0, 0
    for tile in tiles:
        for kt in range(k_tiles):
            tag = tile * k_tiles + kt
            for s in p.producer:
                if s.op is Op.WAIT:
                    while not cta.bars[s.bar][stage].ready(phase ^ s.n):
                        yield False
                elif s.op is Op.EXPECT_TX:
                    cta.bars[s.bar][stage].arrive(tx=s.n, who="producer", tag=tag)
                elif s.op is Op.LOAD:
                    bx = boxes(tile, kt, stage)
                    for j, (nbytes, land) in enumerate(bx):
                        cta.ring.tma.append((stage, tag, cta.bars[s.bar][stage], nbytes, land,
                                             j == len(bx) - 1))
                elif s.op is Op.ADVANCE:
                    stage, phase = ring_after(stage, phase, p.stages)
                else:
                    raise HopperModelError(f"producer step {s.op.value}: the producer thread "
                                           "issues no wgmma")
                yield True


def _tma(cta: Cta, producer_done):
    """The TMA unit: lands one queued box per turn (data, then complete_tx on its barrier)."""
    while cta.ring.tma or not producer_done():
        if cta.ring.tma:
            cta.ring.land()
            yield True
        else:
            yield False


class _Consumer:
    """The registers and wgmma state of one consumer warpgroup while it runs the protocol."""

    def __init__(self, cta: Cta, cw: int, k_tiles: int, mma):
        self.cta, self.cw, self.k_tiles, self.mma = cta, cw, k_tiles, mma
        self.stage, self.phase, self.tile, self.acc = 0, 0, 0, None
        self.fenced, self.open, self.in_flight = False, [], []

    def retire(self, keep: int) -> None:
        """wgmma.wait_group ``keep``: the older groups complete; their reads happen now."""
        ring = self.cta.ring
        while len(self.in_flight) > keep:
            for stage, tag in self.in_flight.pop(0):
                ring.read(stage, tag)
                if self.acc is not None:
                    self.mma(self.cw, self.acc, stage, tag)
                ring.readers[stage][self.cw] -= 1

    def steps(self, seq, i: int):
        """Execute protocol steps at k-tile position ``i`` of the current tile."""
        cta, cw, advanced = self.cta, self.cw, False
        for s in seq:
            if s.op is Op.WAIT:
                while not cta.bars[s.bar][self.stage].ready(self.phase ^ s.n):
                    yield False
            elif s.op is Op.FENCE:
                self.fenced = True
            elif s.op is Op.MMA:
                if not self.fenced:
                    raise HopperModelError(f"consumer {cw}: wgmma issued on accumulators "
                                           "written since the last wgmma.fence")
                self.open.append((self.stage, self.tile * self.k_tiles + i))
                cta.ring.readers[self.stage][cw] += 1
            elif s.op is Op.COMMIT:
                if self.open:
                    self.in_flight.append(self.open)
                    self.open = []
            elif s.op is Op.WAIT_GROUP:
                self.retire(s.n)
            elif s.op is Op.RELEASE:  # the k-tile s.n before position i (+1 once advanced)
                pos = i + advanced
                if pos >= s.n:
                    target = stage_back(self.stage, s.n, cta.p.stages)
                    for u in range(WARPGROUP // UNITS[s.unit]):
                        cta.bars[s.bar][target].arrive(
                            who=(cw, u), tag=self.tile * self.k_tiles + pos - s.n)
            elif s.op is Op.ADVANCE:
                self.stage, self.phase = ring_after(self.stage, self.phase, cta.p.stages)
                advanced = True
            elif s.op is Op.STORE:
                if self.open or self.in_flight:
                    raise HopperModelError(
                        f"consumer {cw}: the epilogue reads the accumulators while wgmma groups "
                        "are in flight (the drain must wait_group 0)")
                if s.n:  # staged through the stage of k-tile i - n, held until its release
                    yield from self.staged(s.n, i + advanced)
            else:
                raise HopperModelError(f"consumer step {s.op.value}: only the producer loads")
            yield True

    def staged(self, lag: int, pos: int):
        """The staged epilogue writes its output into the stage of k-tile ``pos - lag`` and reads
        it back: that stage must still hold the k-tile (not released and refilled) and must
        not be refilled until the reads are done (other tasks run in between)."""
        ring, stages = self.cta.ring, self.cta.p.stages
        if pos < lag:
            raise HopperModelError(f"consumer {self.cw}: the epilogue stages through the stage "
                                   f"{lag} k-tile(s) back, but the tile has {pos}")
        target, tag = stage_back(self.stage, lag, stages), self.tile * self.k_tiles + pos - lag
        if ring.held[target] != tag:
            raise HopperModelError(
                f"consumer {self.cw}: the epilogue stages its output in stage {target}, which "
                f"holds {ring.held[target]}, not k-tile {tag}: it was released before the "
                "epilogue (the producer refilled it)")
        ring.readers[target][self.cw] += 1
        yield True  # writes, bar.sync, 16-byte reads: the stage is in use meanwhile
        ring.readers[target][self.cw] -= 1


def _consumer(cta: Cta, cw: int, tiles: list[int], k_tiles: int, new_acc, mma, epilogue):
    """Consumer warpgroup ``cw``: the protocol's consumer steps for every k-tile and its drain
    after each tile. A committed wgmma group reads its stage while in flight; the model performs
    the read (``mma(cw, acc, stage, tag)``) when ``wgmma.wait_group`` retires it, and the ring
    refuses a TMA load into a stage that an unretired group may still read.
    With ``new_acc`` (a zero accumulator maker) it computes: ``epilogue(tile, acc)`` runs
    after the drain."""
    c = _Consumer(cta, cw, k_tiles, mma)
    for tile in tiles:
        c.tile, c.fenced = tile, False  # zeroing the accumulators needs a fence before wgmma
        c.acc = None if new_acc is None else new_acc()
        for kt in range(k_tiles):
            yield from c.steps(cta.p.consumer, kt)
        yield from c.steps(cta.p.drain, k_tiles)  # the stage counter is at k-tile k_tiles
        yield from c.steps(cta.p.epilogue, k_tiles)
        if c.open or c.in_flight:
            raise HopperModelError(f"consumer {cw}: the epilogue reads the accumulators while "
                                   "wgmma groups are in flight (the drain must wait_group 0)")
        if c.acc is not None:
            epilogue(tile, c.acc)
        yield True


# Interleavings the model tries: whether consumers take their turn before the producer and the
# TMA unit, which tasks run until blocked (greedy), and which run only in a round where nothing
# else moved (lazy: the TMA unit lands data as late as possible).
POLICIES = {
    "round_robin": (False, (), ()),
    "eager_producer": (False, ("producer", "tma"), ()),
    "lazy_tma": (False, (), ("tma",)),
    "eager_consumers": (True, ("consumer",), ("tma",)),
}


def _run(tasks: dict, policy: str) -> None:
    """Run the named coroutines to completion under ``policy``; a round in which no task can
    move means they wait on each other forever (the GPU would spin in try_wait)."""
    consumers_first, greedy, lazy = POLICIES[policy]
    order = list(tasks)
    if consumers_first:
        order = [n for n in order if n.startswith("consumer")][::-1] + \
            [n for n in order if not n.startswith("consumer")]
    live = dict(tasks)

    def step(name: str) -> bool:
        moved = False
        while True:
            try:
                m = next(live[name])
            except StopIteration:
                del live[name]
                return True
            moved |= m
            if not (m and name.startswith(greedy)):
                return moved

    while live:
        moved = False
        for name in order:
            if name in live and not name.startswith(lazy):
                moved |= step(name)
        for name in order if not moved else ():
            if name in live and name.startswith(lazy):
                moved |= step(name)
        if not moved:
            raise HopperModelError(
                f"deadlock ({policy} interleaving): {sorted(live)} all wait on mbarriers that "
                "can no longer complete (wrong parity, init count, release or expect_tx)")


def run_cta(protocol: Protocol, tiles: list[int], k_tiles: int, boxes, policy: str = "round_robin",
            new_acc=None, mma=None, epilogue=None) -> Cta:
    """One CTA's producer, TMA unit and consumers executing ``protocol`` over ``tiles`` with
    ``k_tiles`` k-tiles each, under interleaving ``policy``. ``boxes(tile, kt, stage)`` lists the
    TMA boxes of a k-tile as (bytes, function that lands the data or None). Without ``new_acc``
    only the protocol runs (k-tile tags, no values); with it, ``mma(cw, acc, stage, tag)`` and
    ``epilogue(cw, tile, acc)`` compute."""
    cta = Cta(protocol)
    done = []

    def producer():
        yield from _producer(cta, tiles, k_tiles, boxes)
        done.append(True)

    tasks = {"producer": producer(), "tma": _tma(cta, lambda: bool(done))}
    for cw in range(protocol.consumers):
        ep = None if epilogue is None else (lambda tile, acc, cw=cw: epilogue(cw, tile, acc))
        tasks[f"consumer{cw}"] = _consumer(cta, cw, tiles, k_tiles, new_acc, mma, ep)
    _run(tasks, policy)
    return cta


def check_protocol(protocol: Protocol, k_tiles: int, tiles: int, box_bytes: tuple[int, ...],
                   policies=None) -> None:
    """Run ``protocol`` without data on one CTA with ``tiles`` tiles of ``k_tiles`` k-tiles each,
    every k-tile loaded as TMA boxes of ``box_bytes`` (what the hardware delivers, whatever the
    protocol announces), under every interleaving in ``POLICIES``: raises
    :class:`HopperModelError` on a deadlock, a race or a miscounted barrier."""
    for policy in policies or POLICIES:
        run_cta(protocol, list(range(tiles)), k_tiles,
                lambda tile, kt, stage: [(n, None) for n in box_bytes], policy)


# -- the kernel ---------------------------------------------------------------------------------


def _run_cta(spec, config, protocol, plans, args, a, b, tile_ids, policy="round_robin"):
    """Run one CTA of the kernel: the protocol with the data path; its accumulators."""
    smem = SharedMemory(config.smem_bytes)
    k_tiles = -(-spec.k // config.bk)
    tm, tn = tiles(spec, config)
    b0 = config.stages * plans[0].stage_bytes
    stage_base = {"a": lambda s: s * plans[0].stage_bytes,
                  "b": lambda s: b0 + s * plans[1].stage_bytes}
    a_plan, b_plan = plans
    mems = {"a": a, "b": b}

    def boxes(tile, kt, stage):
        mb, nb = (int(x) for x in wg.tile_coords(tile, tm, tn, config.group_m))
        out = []
        for plan, mn0 in ((a_plan, mb * config.bm), (b_plan, nb * config.bn)):
            for j in range(plan.boxes):
                dst = stage_base[plan.operand](stage) + j * plan.box_bytes
                coords = plan.load_coords(mn0, kt * config.bk, j)
                out.append((args[plan.operand].box_bytes,
                            lambda p=plan, d=dst, c=coords, t=tile * k_tiles + kt:
                            smem.tma_load(args[p.operand], mems[p.operand], d, c, t)))
        return out

    def mma(cw, acc, stage, tag):
        """The k-tile's wgmmas of consumer ``cw``, through the descriptors the kernel builds."""
        for ks in range(config.bk // 16):
            db = _descriptor(b_plan, stage_base["b"](stage), 0, ks)
            bt = smem.read_operand(db, config.bn, b_plan.k_major, tag)  # [n][k]
            for r in range(config.m_repeats):
                row0 = cw * config.rows_per_consumer + r * 64
                da = _descriptor(a_plan, stage_base["a"](stage), row0, ks)
                acc[r] += smem.read_operand(da, 64, a_plan.k_major, tag) @ bt.T

    outs = [[] for _ in range(config.consumers)]

    def epilogue(cw, tile, acc):
        for r in range(config.m_repeats):
            outs[cw].append((tile, r, _registers(acc[r])))

    run_cta(protocol, tile_ids, k_tiles, boxes, policy,
            new_acc=lambda: np.zeros((config.m_repeats, 64, config.bn)), mma=mma,
            epilogue=epilogue)
    return outs




def _conflict_free(addr: np.ndarray, nbytes: int, what: str) -> None:
    """Shared-memory bank check of one warp instruction (``addr[32]``, ``nbytes`` per lane): the
    lanes served together (all 32 for 4 bytes, half-warps for 8, quarter-warps for 16) must
    touch 32 distinct banks, else the access replays."""
    group = 32 * 4 // nbytes
    for g in range(0, 32, group):
        words = (addr[g:g + group, None] + np.arange(0, nbytes, 4)) // 4
        if len(np.unique(words % 32)) != words.size:
            raise HopperModelError(f"staged epilogue: {what} has shared-memory bank conflicts")


def _a_bytes_read(spec, config, cw) -> np.ndarray:
    """Byte offsets in a stage's A buffer that consumer ``cw``'s wgmma descriptors read."""
    plan = operand_plan(spec, config, "a")
    mn, k = np.meshgrid(np.arange(64), np.arange(16), indexing="ij")
    return np.concatenate([
        wg.operand_address(_descriptor(plan, 0, cw * config.rows_per_consumer + r * 64, ks),
                           mn, k, plan.k_major).ravel()
        for r in range(config.m_repeats) for ks in range(config.bk // 16)])


def _staged_store(spec, config, cw, row0, col0, vals, out, written) -> None:
    """The staged epilogue of one m64 block (``vals[thread, register]``, epilogue applied) whose
    top-left output element is (``row0``, ``col0``): chunk by chunk, the threads' pair writes
    into the 128B-swizzled staging buffer (each slot exactly once, inside the consumer's part of
    the stage's A buffer, free of bank conflicts), then the 16-byte reads (each slot exactly
    once, 16-byte aligned, elements contiguous, free of bank conflicts) and the global stores
    with the kernel's bounds."""
    ob = info(spec.epilogue.out).torch.itemsize
    cols, vec = wg.SWIZZLE_BYTES // ob, wg.STORE_BYTES // ob
    base = staging_base(config, cw)  # within the stage's A buffer
    if base + wg.STAGING_BYTES > config.a_stage_bytes:
        raise HopperModelError(f"consumer {cw}'s staging buffer runs past the stage's A buffer")
    for other in range(config.consumers):  # whose wgmmas may still read the stage meanwhile
        read = _a_bytes_read(spec, config, other)
        if other != cw and ((read >= base) & (read < base + wg.STAGING_BYTES)).any():
            raise HopperModelError(
                f"consumer {cw} stages its output over A rows that consumer {other}'s wgmmas "
                "read (it may still be in its main loop on that stage)")
    t, i = np.meshgrid(np.arange(wg.WARPGROUP), np.arange(config.bn // 2), indexing="ij")
    rt, ct = wg.acc_coords(t, i)
    thread = np.arange(wg.WARPGROUP)
    for j in range(config.bn // cols):
        sel = (i >= j * cols // 2) & (i < (j + 1) * cols // 2)  # the kernel's register range
        if not ((ct[sel] >= j * cols) & (ct[sel] < (j + 1) * cols)).all():
            raise HopperModelError("staged epilogue: a chunk's registers hold other columns")
        off = wg.staging_offset(rt[sel], ct[sel] - j * cols, ob)
        if (off % ob).any() or off.max() >= wg.STAGING_BYTES:
            raise HopperModelError("staged epilogue: a write misaligned or outside the chunk")
        buf = np.full(wg.STAGING_BYTES // ob, np.nan)
        seen = np.zeros(buf.size, dtype=int)
        np.add.at(seen, off // ob, 1)
        if (seen != 1).any():
            raise HopperModelError("staged epilogue: the fragment writes collide or leave holes")
        buf[off // ob] = vals[sel]
        pairs = wg.staging_offset(rt[:, ::2], ct[:, ::2] - j * cols, ob)  # one store per pair
        for w in range(wg.WARPGROUP // 32):
            for k in range(j * cols // 4, (j + 1) * cols // 4):
                _conflict_free(pairs[32 * w: 32 * w + 32, k], 2 * ob, "a fragment write")
        read = np.zeros(buf.size, dtype=int)
        for p in range(wg.STORE_PASSES):
            rr, cc = wg.store_vector(thread, p)
            ro = wg.staging_offset(rr, cc * vec, ob)
            if (ro % wg.STORE_BYTES).any():
                raise HopperModelError("staged epilogue: a 16-byte read is misaligned")
            for w in range(wg.WARPGROUP // 32):
                _conflict_free(ro[32 * w: 32 * w + 32], wg.STORE_BYTES, "a 16-byte read")
            row, col = row0 + rr, col0 + j * cols + cc * vec
            full = (row < spec.m) & (col + vec <= spec.n)  # the kernel's 16-byte stores
            if (spec.c_addr(row[full], col[full]) * ob % wg.STORE_BYTES).any():
                raise HopperModelError(f"staged epilogue: a 16-byte store to C is misaligned "
                                       f"(ldc={spec.ldc}): use the register epilogue")
            for e in range(vec):
                if (wg.staging_offset(rr, cc * vec + e, ob) != ro + e * ob).any():
                    raise HopperModelError("staged epilogue: a 16-byte read is not the row's "
                                           "consecutive elements")
                slot = (ro + e * ob) // ob
                np.add.at(read, slot, 1)
                row, col = row0 + rr, col0 + j * cols + cc * vec + e
                ok = (row < spec.m) & (col < spec.n)
                dst = spec.c_addr(row[ok], col[ok])
                out[dst] = buf[slot[ok]]
                np.add.at(written, dst, 1)
        if (read != 1).any():
            raise HopperModelError("staged epilogue: the 16-byte reads miss or repeat a slot")


def run(spec: KernelSpec, config: HopperConfig, a: np.ndarray, b: np.ndarray,
        bias: np.ndarray | None = None, scale: float = 1.0, grid: int = 132,
        protocol: Protocol | None = None, policy: str = "round_robin") -> np.ndarray:
    """Execute the kernel on flat operand buffers (float64 holding f16/bf16 values) with a
    persistent grid of ``grid`` CTAs, running ``protocol`` (default: the one the renderer emits
    for ``spec`` and ``config``) under interleaving ``policy``; returns the flat output
    (``m * ldc``, float64 holding ``epilogue.out`` values; elements the kernel does not write
    stay 0)."""
    from ..runtime.tma import grid_size, tensor_map_args

    check(spec, config)
    protocol = protocol or protocol_for(spec, config)
    plans = (operand_plan(spec, config, "a"), operand_plan(spec, config, "b"))
    args = {op: tensor_map_args(spec, config, op) for op in ("a", "b")}
    tm, tn = tiles(spec, config)
    ctas = grid_size(spec, config, grid)
    out = np.zeros(spec.m * spec.ldc)
    written = np.zeros(out.size, dtype=int)
    t, i = np.meshgrid(np.arange(wg.WARPGROUP), np.arange(config.bn // 2), indexing="ij")
    row_in, col_in = wg.acc_coords(t, i)
    staged = next(s.n for s in protocol.epilogue if s.op is Op.STORE) > 0
    for cta in range(ctas):
        outs = _run_cta(spec, config, protocol, plans, args, a, b,
                        list(tile_ids(cta, ctas, tm * tn)), policy)
        for cw, results in enumerate(outs):
            for tile, r, regs in results:
                mb, nb = (int(x) for x in wg.tile_coords(tile, tm, tn, config.group_m))
                row = mb * config.bm + cw * config.rows_per_consumer + r * 64 + row_in
                col = nb * config.bn + col_in
                ok = (row < spec.m) & (col < spec.n)
                if staged:  # the kernel applies the epilogue to every register (bias clamped)
                    o = Operands(spec.dtype, None if bias is None else
                                 bias[np.minimum(col, spec.n - 1)], scale)
                    vals = regs
                    for op in spec.epilogue.ops:
                        vals = OPS[op].numpy(vals, o)
                    _staged_store(spec, config, cw,
                                  mb * config.bm + cw * config.rows_per_consumer + r * 64,
                                  nb * config.bn, vals, out, written)
                    continue
                o = Operands(spec.dtype, None if bias is None else bias[col[ok]], scale)
                vals = regs[ok]
                for op in spec.epilogue.ops:
                    vals = OPS[op].numpy(vals, o)
                dst = spec.c_addr(row[ok], col[ok])
                out[dst] = vals
                np.add.at(written, dst, 1)
    if (written > 1).any():
        raise HopperModelError("an output element is stored twice")
    need = np.zeros(out.size, dtype=bool)
    rows, cols = np.meshgrid(np.arange(spec.m), np.arange(spec.n), indexing="ij")
    need[spec.c_addr(rows, cols).ravel()] = True
    if (written[need] != 1).any():
        raise HopperModelError("an output element is never stored")
    if spec.epilogue.out != FLOAT32.name:
        out = round_to(out, spec.epilogue.out)
    return out


class HopperModelLauncher:
    """Stands in for ``runtime.tma.HopperLoaded`` (same constructor arguments but the cubin,
    same call): runs :func:`run` on the raw memory of the tensors a launch would pass and
    writes the output elements the kernel stores, leaving the rest of ``c`` as it was. Lets the
    runtime's Hopper path (candidates, verification, autotuning) run on a CPU."""

    def __init__(self, spec: KernelSpec, config: HopperConfig, *_):
        check(spec, config)
        self.spec, self.config = spec, config

    def __call__(self, a, b, c, bias=None, scale=None) -> None:
        from .model import _raw

        sp = self.spec
        out = run(sp, self.config, _raw(a).double().numpy(), _raw(b).double().numpy(),
                  bias=None if bias is None else bias.double().numpy(),
                  scale=1.0 if scale is None else float(scale))
        rows, cols = np.meshgrid(np.arange(sp.m), np.arange(sp.n), indexing="ij")
        idx = torch.from_numpy(np.asarray(sp.c_addr(rows, cols)).ravel())
        dst = _raw(c)
        dst[idx] = torch.from_numpy(out[idx.numpy()]).to(c.dtype)
