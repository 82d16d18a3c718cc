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
- the mbarrier protocol (PTX ISA 9.7.13.15, mbarrier phases and ``try_wait.parity``): producer
  and consumers are run as coroutines with the kernel's waits, arrivals and transaction counts;
  a consumer must find in a stage exactly the k-tile it expects, and nothing may deadlock.

The result is compared with a float64 matmul in the tests, on ragged shapes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..dtypes import FLOAT32
from ..errors import KernelError
from . import wgmma as wg
from .epilogue import OPS, Operands, round_to
from .hopper import HopperConfig, OperandPlan, check, operand_plan, tiles
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
    """An mbarrier: expected arrivals per phase, pending transaction bytes, the phase bit."""

    def __init__(self, count: int):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def arrive(self, tx: int = 0) -> None:
        self.tx += tx
        self.pending -= 1
        if self.pending < 0:
            raise HopperModelError("more arrivals on an mbarrier than its count")
        self._maybe_complete()

    def complete_tx(self, nbytes: int) -> None:
        self.tx -= nbytes
        if self.tx < 0:
            raise HopperModelError("TMA completed more bytes than expect_tx announced")
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if self.pending == 0 and self.tx == 0:
            self.phase ^= 1
            self.pending = self.count

    def ready(self, parity: int) -> bool:
        """``try_wait.parity``: true once the phase with that parity has completed."""
        return self.phase != parity


def _producer(spec, config, plans, args, a, b, smem, full, empty, tile_ids, stage_base):
    k_tiles = -(-spec.k // config.bk)
    tm, tn = tiles(spec, config)
    stage, phase = 0, 0
    for tile in tile_ids:
        mb, nb = (int(x) for x in wg.tile_coords(tile, tm, tn, config.group_m))
        for kt in range(k_tiles):
            while not empty[stage].ready(phase ^ 1):
                yield False  # blocked
            full[stage].arrive(tx=sum(p.stage_bytes for p in plans))
            tag = tile * k_tiles + kt
            for plan, mem, mn0 in ((plans[0], a, mb * config.bm), (plans[1], b, nb * config.bn)):
                for j in range(plan.boxes):
                    c0, c1 = plan.load_coords(mn0, kt * config.bk, j)
                    smem.tma_load(args[plan.operand], mem,
                                  stage_base[plan.operand](stage) + j * plan.box_bytes,
                                  (c0, c1), tag)
                    full[stage].complete_tx(args[plan.operand].box_bytes)  # TMA's complete_tx
            yield True  # a stage filled: progress
            stage, phase = (0, phase ^ 1) if stage + 1 == config.stages else (stage + 1, phase)


def _consumer(spec, config, plans, smem, full, empty, tile_ids, stage_base, cw, out):
    """One consumer warpgroup; ``out`` collects (tile, r, registers[128, bn/2]). A k-tile's
    wgmmas read shared memory while in flight: the model performs their reads when the kernel's
    ``wgmma.wait_group`` retires them, so a stage released too early is caught (its data is
    overwritten by then)."""
    k_tiles = -(-spec.k // config.bk)
    a_plan, b_plan = plans
    stage, phase = 0, 0

    def execute(acc, stage, tag):
        for ks in range(config.bk // 16):
            db = _descriptor(b_plan, stage_base["b"](stage), 0, ks)
            bt = smem.read_operand(db, config.bn, b_plan.k_major, tag)  # [n][k]
            for r in range(config.m_repeats):
                row0 = cw * config.rows_per_consumer + r * 64
                da = _descriptor(a_plan, stage_base["a"](stage), row0, ks)
                acc[r] += smem.read_operand(da, 64, a_plan.k_major, tag) @ bt.T

    def release(stage):
        for _ in range(4):  # lane 0 of each of the warpgroup's 4 warps
            empty[stage].arrive()

    for tile in tile_ids:
        acc = np.zeros((config.m_repeats, 64, config.bn))
        in_flight = []  # (stage, tag) of committed, not yet retired wgmma groups
        for kt in range(k_tiles):
            while not full[stage].ready(phase):
                yield False  # blocked
            in_flight.append((stage, tile * k_tiles + kt))
            yield True  # the group is in flight: the producer may run
            while len(in_flight) > 1:  # wgmma.wait_group 1 retires all but the newest group
                done = in_flight.pop(0)
                execute(acc, *done)
                release(done[0])
            stage, phase = (0, phase ^ 1) if stage + 1 == config.stages else (stage + 1, phase)
        for done in in_flight:  # wgmma.wait_group 0
            execute(acc, *done)
            release(done[0])
        yield True  # stages released: progress
        for r in range(config.m_repeats):
            out.append((tile, r, _registers(acc[r])))


def _run_cta(spec, config, plans, args, a, b, tile_ids):
    """Run one CTA's producer and consumers to completion, round robin; their accumulators."""
    smem = SharedMemory(config.smem_bytes)
    full = [MBarrier(1) for _ in range(config.stages)]
    empty = [MBarrier(4 * config.consumers) for _ in range(config.stages)]
    b0 = config.stages * plans[0].stage_bytes
    stage_base = {"a": lambda s: s * plans[0].stage_bytes,
                  "b": lambda s: b0 + s * plans[1].stage_bytes}
    outs = [[] for _ in range(config.consumers)]
    tasks = [_producer(spec, config, plans, args, a, b, smem, full, empty, tile_ids, stage_base)]
    tasks += [_consumer(spec, config, plans, smem, full, empty, tile_ids, stage_base, cw, outs[cw])
              for cw in range(config.consumers)]
    idle = 0  # consecutive rounds in which every task was blocked on a wait
    while tasks:
        running, moved = [], False
        for task in tasks:
            try:
                moved |= next(task)
                running.append(task)
            except StopIteration:
                moved = True
        # a consumer may release a stage and then block in one turn: give the producer one more
        # round to see it; two idle rounds in a row and nothing can change any more
        idle = 0 if moved else idle + 1
        if idle == 2:
            raise HopperModelError("producer and consumers wait on each other (deadlock)")
        tasks = running
    return outs


# -- the kernel ---------------------------------------------------------------------------------


def run(spec: KernelSpec, config: HopperConfig, a: np.ndarray, b: np.ndarray,
        bias: np.ndarray | None = None, scale: float = 1.0, grid: int = 132) -> np.ndarray:
    """Execute the kernel on flat operand buffers (float64 holding f16/bf16 values) with a
    persistent grid of ``grid`` CTAs; returns the flat output (``m * ldc``, float64 holding
    ``epilogue.out`` values; elements the kernel does not write stay 0)."""
    from ..runtime.tma import grid_size, tensor_map_args

    check(spec, config)
    plans = (operand_plan(spec, config, "a"), operand_plan(spec, config, "b"))
    args = {op: tensor_map_args(spec, config, op) for op in ("a", "b")}
    tm, tn = tiles(spec, config)
    ctas = grid_size(spec, config, grid)
    out = np.zeros(spec.m * spec.ldc)
    written = np.zeros(out.size, dtype=int)
    t, i = np.meshgrid(np.arange(wg.WARPGROUP), np.arange(config.bn // 2), indexing="ij")
    row_in, col_in = wg.acc_coords(t, i)
    for cta in range(ctas):
        tile_ids = list(range(cta, tm * tn, ctas))
        outs = _run_cta(spec, config, plans, args, a, b, tile_ids)
        for cw, results in enumerate(outs):
            for tile, r, regs in results:
                mb, nb = (int(x) for x in wg.tile_coords(tile, tm, tn, config.group_m))
                row = mb * config.bm + cw * config.rows_per_consumer + r * 64 + row_in
                col = nb * config.bn + col_in
                ok = (row < spec.m) & (col < spec.n)
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
