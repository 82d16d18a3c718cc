"""A NumPy model of a generated kernel: every thread's copies, ldmatrix loads, MMAs and stores.

It executes the same mapping functions the renderer emits (``mapping.py``, the spec's address
functions), with NumPy arrays over all lanes / copies at once, and checks on the way what the
hardware would not: that the copies of a tile write each shared-memory slot once, that every
ldmatrix row address is 16-byte aligned, and that the registers the lanes hold make up each
16x16 / 16x8 operand exactly once under the PTX ISA fragment layouts, that the kernel's hoisted
offsets, filter / pixel / tap iterators and XOR-split ldmatrix addresses equal the direct address
functions for every copy and load; and it runs the main loop's
pipeline schedule (``schedule.py``) event by event, so a wrong wait count or a missing barrier
raises :class:`ModelCheckError`. The result is compared with
a plain matmul in the tests, on shapes that are not tile multiples.
"""

from __future__ import annotations

import numpy as np
import torch

from . import mapping as mp
from .epilogue import OPS, Operands, round_to
from .render import fragment_split, hoisted
from .schedule import ModelCheckError, Schedule, execute
from .spec import KernelSpec, Kind


def epilogue(spec: KernelSpec, acc: np.ndarray, cols: np.ndarray, bias, scale: float):
    """The epilogue ops on FP32-accumulated values (float64 here), before the final cast."""
    o = Operands(spec.dtype, None if bias is None else bias[cols], scale)
    for op in spec.epilogue.ops:
        acc = OPS[op].numpy(acc, o)
    return acc


def _inside(spec: KernelSpec, operand: str, off, what: str) -> None:
    """Every copy address an iterator forms, read or not, lies inside the operand (the kernel
    adds offsets below 2^31 elements as unsigned 32-bit values)."""
    off = np.asarray(off)
    if (off < 0).any() or (off >= spec.span(operand)).any():
        raise ModelCheckError(f"a {what} iterator offset of operand {operand} leaves the operand")


class FilterIterator:
    """One block's im2col filter iterator for a stepped operand (``KernelSpec.stepped``), as the
    kernel keeps it: each copy's window origin computed once, the (channel, filter position)
    state advanced by ``im2col_step`` after each k-tile's copies, offsets and predicates
    recomputed with ``im2col_at`` only when the position moves. ``copies(tile)`` gives the
    per-copy (offset of the chunk's first element, inside) the kernel uses for k-tile
    ``tile``; the tiles must come in order, as the schedule issues them."""

    def __init__(self, spec: KernelSpec, operand: str, rows: int, width: int, vec: int,
                 tile0: int, k_start: int):
        self.spec, self.operand, self.next = spec, operand, 0
        row, col = mp.copy_coords(np.arange(mp.copies(rows, width, vec)), width, vec)
        kcontig = spec.a_kcontig if operand == "a" else spec.b_kcontig
        mn, kr = (tile0 + row, col) if kcontig else (tile0 + col, row)
        self.base, self.h0, self.w0 = spec.im2col_origin(operand, mn, kr)
        self.c, self.rs = spec.im2col_start(operand, k_start)
        self._window()

    def _window(self) -> None:
        self.off, self.ok = self.spec.im2col_at(self.operand, self.base, self.h0, self.w0,
                                                self.rs)

    def copies(self, tile: int) -> tuple[np.ndarray, np.ndarray]:
        if tile != self.next:
            raise ModelCheckError(f"k-tile {tile} loaded out of order: the filter iterator is "
                                  f"at k-tile {self.next}")
        out = (self.spec.im2col_chan(self.operand, self.c, self.rs) + self.off,
               np.asarray(self.ok))
        _inside(self.spec, self.operand, out[0], "filter")
        self.c, self.rs, moved = self.spec.im2col_step(self.operand, self.c, self.rs)
        self.next += 1
        if moved and not self.spec.im2col_fixed(self.operand):
            self._window()
        return out


class WalkIterator:
    """One block's per-copy iterator (``KernelSpec.walk``: the wgrad activation's pixels or an
    im2col operand's filter taps), as the kernel keeps it: each copy's origin computed once,
    its digits started at its k and advanced by ``walk_step`` after each k-tile's copies.
    ``copies(tile)`` gives the per-copy (offset, inside) for k-tile ``tile`` (in order)."""

    def __init__(self, spec: KernelSpec, operand: str, rows: int, width: int, vec: int,
                 tile0: int, k_start: int, k_end: int):
        self.spec, self.operand, self.next = spec, operand, 0
        self.k_start, self.k_end = k_start, k_end
        row, col = mp.copy_coords(np.arange(mp.copies(rows, width, vec)), width, vec)
        kcontig = spec.a_kcontig if operand == "a" else spec.b_kcontig
        mn, self.kr = (tile0 + row, col) if kcontig else (tile0 + col, row)
        self.origin = spec.walk_origin(operand, mn)
        self.digits = spec.walk_start(operand, k_start + self.kr)

    def copies(self, tile: int) -> tuple[np.ndarray, np.ndarray]:
        if tile != self.next:
            raise ModelCheckError(f"k-tile {tile} loaded out of order: the per-copy iterator "
                                  f"is at k-tile {self.next}")
        sp = self.spec
        off, ok = sp.walk_at(self.operand, self.origin, self.digits)
        ok = np.asarray(ok)
        if sp.ragged_k:
            ok = ok & (self.k_start + tile * sp.tile.bk + self.kr < self.k_end)
            off = np.where(ok, off, 0)
        _inside(sp, self.operand, off, "per-copy")
        self.digits = sp.walk_step(self.operand, *self.digits)
        self.next += 1
        return off, ok


def _load_tile(at, mem, kcontig: bool, width: int, rows: int, vec: int, tile0: int, k0: int,
               k_end: int, base: int, k_step: int | None = None, ragged: bool = True,
               stepped: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Copy one operand tile into a fresh shared-memory array, as the block's threads do.
    ``at(mn, k)`` is the operand's (offset, inside) at GEMM coordinates (row or column, k).
    With ``k_step`` (the kernel's hoisted form, see ``render._loader_setup``): the offset at the
    copy's relative k plus ``k0 * k_step``, the predicate at relative k, and the k bound only
    when ``ragged``; both are checked against the address function at the absolute k. With
    ``stepped`` (a :class:`FilterIterator`'s copies: chunk offset and predicate per copy), the
    same check of the iterator's offsets and predicates."""
    idx = np.arange(mp.copies(rows, width, vec))
    row, col = mp.copy_coords(idx, width, vec)
    smem = np.full(rows * width, np.nan)
    written = np.zeros(rows * width, dtype=int)
    for e in range(vec):
        if kcontig:  # tile rows run along M (or N), columns along K
            mn, k_rel = tile0 + row, col + e
        else:  # tile rows run along K, columns along M (or N)
            mn, k_rel = tile0 + col + e, row
        k = k0 + k_rel
        off, ok = at(mn, k)
        ok = np.asarray(ok) & (k < k_end)
        if k_step is not None:
            off_rel, ok_rel = at(mn, k_rel)
            hoisted_ok = np.asarray(ok_rel) & ((k < k_end) if ragged else True)
            hoisted = off_rel + k0 * k_step
            if (hoisted_ok != ok).any() or (np.asarray(hoisted - off)[ok] != 0).any():
                raise ModelCheckError("hoisted copy offsets or predicates differ from the "
                                      "operand's address function")
            off, ok = hoisted, hoisted_ok
        if stepped is not None:
            off_st, ok_st = stepped[0] + e, stepped[1]
            if (ok_st != ok).any() or (np.asarray(off_st - off)[ok] != 0).any():
                raise ModelCheckError("the filter or pixel iterator's copy offsets or "
                                      "predicates differ from the operand's address function")
            off, ok = off_st, ok_st
        vals = np.where(ok, mem[np.where(ok, base + off, 0)], 0.0)
        slot = mp.smem_offset(row, col + e, width)
        np.add.at(written, slot, 1)
        smem[slot] = vals
    if not (written == 1).all():
        raise ModelCheckError("copies of a tile collide in shared memory or leave holes")
    return smem


def _ldmatrix(smem, width, lanes_row, lanes_col, trans, split=None):
    """Registers (4 matrices x 2 elements per lane) an ldmatrix.x4 delivers to the 32 lanes.
    ``split``: (stage base in bytes, the lanes' first offsets, (x, y)): the kernel's address
    ``((base + 2*first) ^ 2x) + 2y`` (``render.fragment_split``), checked against the direct
    offset."""
    if (np.asarray(lanes_col) % 8).any():
        raise ModelCheckError("ldmatrix row address not 16-byte aligned")
    base = mp.smem_offset(lanes_row, lanes_col, width)
    if split is not None:
        stage_base, first, (x, y) = split
        got = (((stage_base + 2 * first) ^ (2 * x)) + 2 * y - stage_base) // 2
        if (got != base).any():
            raise ModelCheckError("ldmatrix offsets reached by XOR and immediate differ from "
                                  "the shared-memory layout")
    rows = np.stack([smem[base + c] for c in range(8)], axis=1)  # [32 lanes][8 elements]
    lane = np.arange(32)
    regs = np.zeros((32, 4, 2))
    for j in range(4):
        for e in range(2):
            r, c = mp.ldmatrix_element(lane, e, trans)
            regs[:, j, e] = rows[8 * j + r, c]
    return regs


def _assemble(shape, lane_elems, mapping):
    """Rebuild an operand tile from the lanes' fragment elements; each element exactly once."""
    out = np.full(shape, np.nan)
    seen = np.zeros(shape, dtype=int)
    lane = np.arange(32)
    for i in range(lane_elems.shape[1]):
        r, c = mapping(lane, i)
        out[r, c] = lane_elems[:, i]
        np.add.at(seen, (r, c), 1)
    if not (seen == 1).all():
        raise ModelCheckError("fragment layout does not cover the operand tile exactly once")
    return out


def _compute(spec: KernelSpec, sa: np.ndarray, sb: np.ndarray, acc: np.ndarray,
             stage: int = 0, splits: tuple = (None, None)) -> None:
    """One k-tile of every warp: ldmatrix from the stage buffers (at the addresses the kernel
    forms from ``splits``, see ``render.fragment_split``), m16n8k16 MMAs into ``acc``."""
    t, lane = spec.tile, np.arange(32)
    a_width = t.bk if spec.a_kcontig else t.bm
    b_width = t.bk if spec.b_kcontig else t.bn
    split_a, split_b = splits
    base_a = stage * t.bm * t.bk * 2  # bytes from the 128-byte aligned shared memory
    base_b = t.stages * t.bm * t.bk * 2 + stage * t.bk * t.bn * 2
    for w in range(t.warps):
        wm0, wn0 = mp.warp_origin(w, t.wtm, t.wtn, t.warps_n)
        first_a = mp.smem_offset(*mp.a_ldmatrix(lane, wm0, 0, spec.a_kcontig), a_width)
        first_b = mp.smem_offset(*mp.b_ldmatrix(lane, wn0, 0, spec.b_kcontig), b_width)
        for ks in range(0, t.bk, 16):
            af = []
            for mi in range(t.mi):
                r, c = mp.a_ldmatrix(lane, wm0 + mi * 16, ks, spec.a_kcontig)
                regs = _ldmatrix(sa, a_width, r, c, not spec.a_kcontig,
                                 split_a and (base_a, first_a, split_a[(mi, ks)]))
                af.append(_assemble((16, 16), regs.reshape(32, 8), mp.frag_a))
            bf = []
            for nj in range(0, t.ni, 2):
                r, c = mp.b_ldmatrix(lane, wn0 + nj * 8, ks, spec.b_kcontig)
                regs = _ldmatrix(sb, b_width, r, c, not spec.b_kcontig,
                                 split_b and (base_b, first_b, split_b[(nj, ks)]))
                for half in range(2):
                    elems = regs[:, 2 * half: 2 * half + 2].reshape(32, 4)
                    bf.append(_assemble((16, 8), elems, mp.frag_b))
            for mi in range(t.mi):
                for ni in range(t.ni):
                    d = af[mi] @ bf[ni]
                    for i in range(4):
                        r, c = mp.frag_c(lane, i)
                        acc[w, mi, ni, :, i] += d[r, c]


def _mainloop(spec: KernelSpec, schedule: Schedule, a, b, m0: int, n0: int, k_start: int,
              k_end: int, base_a: int, base_b: int) -> np.ndarray:
    """One block's accumulators: ``schedule`` executed event by event over a ring of stage
    buffers, the pipeline state checked at each event (see ``schedule.py``)."""
    t = spec.tile
    a_width, a_rows = (t.bk, t.bm) if spec.a_kcontig else (t.bm, t.bk)
    b_width, b_rows = (t.bk, t.bn) if spec.b_kcontig else (t.bn, t.bk)
    ring_a: list = [None] * schedule.stages
    ring_b: list = [None] * schedule.stages
    acc = np.zeros((t.warps, t.mi, t.ni, 32, 4))
    hoist = {o: spec.k_step(o) if hoisted(spec, o) else None for o in "ab"}
    walk = FilterIterator(spec, "a", a_rows, a_width, spec.vec_a, m0, k_start) \
        if spec.stepped("a") else None
    walk_b = FilterIterator(spec, "b", b_rows, b_width, spec.vec_b, n0, k_start) \
        if spec.stepped("b") else None
    if spec.walk("a"):
        walk = WalkIterator(spec, "a", a_rows, a_width, spec.vec_a, m0, k_start, k_end)
    if spec.walk("b"):
        walk_b = WalkIterator(spec, "b", b_rows, b_width, spec.vec_b, n0, k_start, k_end)

    splits = fragment_split(spec, "a"), fragment_split(spec, "b")
    if (splits[0] is None) != (splits[1] is None):  # as render._fragments
        splits = (None, None)

    def load(stage: int, tile: int) -> None:
        k0 = k_start + tile * t.bk
        ring_a[stage] = _load_tile(spec.a_addr, a, spec.a_kcontig, a_width, a_rows,
                                   spec.vec_a, m0, k0, k_end, base_a, hoist["a"],
                                   spec.ragged_k, walk and walk.copies(tile))
        ring_b[stage] = _load_tile(lambda n, k: spec.b_addr(k, n), b, spec.b_kcontig, b_width,
                                   b_rows, spec.vec_b, n0, k0, k_end, base_b, hoist["b"],
                                   spec.ragged_k, walk_b and walk_b.copies(tile))

    def compute(stage: int, tile: int) -> None:
        _compute(spec, ring_a[stage], ring_b[stage], acc, stage, splits)

    k_tiles = -(-(k_end - k_start) // t.bk) if k_end > k_start else 0
    execute(schedule, k_tiles, load, compute, asynchronous=max(spec.vec_a, spec.vec_b) > 1,
            name=spec.name)
    return acc


def _store_warp(spec: KernelSpec, w: int, acc: np.ndarray, m0: int, n0: int, base_c: int,
                bias, scale: float, out: np.ndarray, written: np.ndarray) -> None:
    """One warp's epilogue as the kernel runs it: ops on each accumulator, the conversion, the
    write into the warp's staging buffer (each slot once), then the chunked row stores (each
    element of the warp tile read once; partial chunks at the right edge element-wise)."""
    t, lane = spec.tile, np.arange(32)
    pitch, vec = spec.stage_pitch, spec.c_vec
    wm0, wn0 = mp.warp_origin(w, t.wtm, t.wtn, t.warps_n)
    stage = np.full(t.wtm * pitch, np.nan)
    filled = np.zeros(t.wtm * pitch, dtype=int)
    for mi in range(t.mi):
        for ni in range(t.ni):
            for i in range(4):
                _, col = mp.c_coords(lane, i, 0, n0 + wn0 + ni * 8)
                vals = epilogue(spec, acc[mi, ni, :, i], np.minimum(col, spec.n - 1), bias,
                                scale)
                if spec.out_bytes == 2:
                    vals = round_to(vals, spec.epilogue.out)
                slot = mp.stage_slot(lane, i, mi, ni, pitch)
                stage[slot] = vals
                np.add.at(filled, slot, 1)
    if (filled > 1).any():
        raise ModelCheckError("two accumulators staged in one shared-memory slot")
    chunks = t.wtm * t.wtn // vec
    read = np.zeros(t.wtm * pitch, dtype=int)
    for p in range(-(-chunks // 32)):
        live = p * 32 + lane < chunks
        r, c = mp.store_chunk(lane[live], p, t.wtn, vec)
        for e in range(vec):
            src = r * pitch + c + e
            np.add.at(read, src, 1)
            row, col = m0 + wm0 + r, n0 + wn0 + c + e
            ok = (row < spec.m) & (col < spec.n)
            if (filled[src[ok]] != 1).any():
                raise ModelCheckError("the store pass reads a staging slot nobody wrote")
            dst = base_c + spec.c_addr(row[ok], col[ok])
            np.add.at(out, dst, stage[src[ok]])
            np.add.at(written, dst, 1)
    if (read[filled == 1] != 1).any():
        raise ModelCheckError("the store pass does not read every staged element once")


def run(spec: KernelSpec, a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None,
        scale: float = 1.0, schedule: Schedule | None = None) -> np.ndarray:
    """Execute the kernel on flat operand buffers (float64 holding low-precision values) and
    return the flat output buffer (float64 holding ``epilogue.out`` values). ``schedule``
    defaults to the one the renderer emits for ``spec``."""
    t = spec.tile
    schedule = schedule or spec.schedule
    out_len = (spec.batch - 1) * spec.batch_stride_c + spec.m * spec.c_ld if \
        spec.kind is Kind.GEMM else spec.m * spec.c_ld
    if spec.split_k > 1:  # one FP32 partial per split, summed after the kernel
        out_len = spec.split_k * spec.m * spec.c_ld
    out = np.zeros(out_len)
    partial = np.zeros(out_len)
    gx, gy, gz = spec.grid()
    if (gy, gz) != (1, 1) or gx != spec.blocks:
        raise ModelCheckError(f"{spec.name}: grid {(gx, gy, gz)} is not {spec.blocks} blocks on x")
    written = np.zeros(out_len, dtype=int)
    visits = np.zeros((spec.batch * spec.split_k, spec.tiles_m, spec.tiles_n), dtype=int)
    for bid in range(gx):
        tm, tn, z = mp.block_coords(bid, spec.tiles_m, spec.tiles_n, spec.raster_group)
        visits[z, tm, tn] += 1
        batch, split = z // spec.split_k, z % spec.split_k
        k_start = split * spec.k_per_split
        k_end = min(spec.k, k_start + spec.k_per_split)
        base_a, base_b = batch * spec.batch_stride_a, batch * spec.batch_stride_b
        base_c = batch * spec.batch_stride_c + split * spec.m * spec.c_ld
        m0, n0 = tm * t.bm, tn * t.bn
        acc = _mainloop(spec, schedule, a, b, m0, n0, k_start, k_end, base_a, base_b)
        for w in range(t.warps):
            _store_warp(spec, w, acc[w], m0, n0, base_c, bias, scale, partial, written)
    if not (visits == 1).all():
        raise ModelCheckError(f"{spec.name}: the block raster does not visit each tile once")
    if (written[written > 0] != 1).any():
        raise ModelCheckError("two threads store the same output element")
    if spec.split_k > 1:
        return partial.reshape(spec.split_k, -1).sum(0)
    out[:] = partial  # already rounded to the output dtype when staged
    return out


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The memory a kernel sees from ``t.data_ptr()``: a flat view over the span of ``t``."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return torch.as_strided(t, (span,), (1,), t.storage_offset())


class ModelLauncher:
    """Stands in for ``runtime.launch.Loaded`` (same call): runs the NumPy model on the raw
    memory of the tensors a launch would pass, and writes the output buffer the way the kernel
    does. Lets the GPU code path (operand layouts, NHWC conversions, split-K sums) be tested
    on a CPU."""

    def __init__(self, spec: KernelSpec, *_):
        self.spec = spec

    def __call__(self, a, b, c, bias=None, scale=None) -> None:
        sp = self.spec
        out = run(sp, _raw(a).double().numpy(), _raw(b).double().numpy(),
                  bias=None if bias is None else bias.double().numpy(),
                  scale=1.0 if scale is None else float(scale))
        dst = _raw(c)
        if sp.split_k > 1:  # the kernel writes per-split partials; the model returns the sum
            dst.zero_()
            dst[: out.size] = torch.from_numpy(out).to(c.dtype)
        else:
            written = torch.from_numpy(out[: dst.numel()]).to(c.dtype)
            dst.copy_(written)
