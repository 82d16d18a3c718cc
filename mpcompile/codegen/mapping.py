"""Who holds and moves which element: the mappings the renderer emits and the NumPy model runs.

All functions take int-like arguments (ints, NumPy arrays, or :class:`~.expr.Sym`).

PTX ISA layouts of ``mma.sync.aligned.m16n8k16`` with f16/bf16 inputs and f32 accumulators
(section "Matrix Fragments for mma.m16n8k16"), for lane ``l``, ``g = l >> 2``, ``t = l & 3``:

- A (16x16, row): element ``i`` of 8 (registers a0..a3 hold pairs): row ``g + 8*((i>>1)&1)``,
  column ``2t + (i&1) + 8*(i>>2)``;
- B (16x8, col): element ``i`` of 4 (b0, b1): row (k) ``2t + (i&1) + 8*(i>>1)``, column ``g``;
- C/D (16x8): element ``i`` of 4: row ``g + 8*(i>>1)``, column ``2t + (i&1)``.

``ldmatrix.m8n8.x4.b16``: lanes 8j..8j+7 give the addresses of the 8 rows (16 bytes each) of
matrix ``j``; register ``j`` of lane ``l`` then holds row ``l>>2``, columns ``2(l&3)+{0,1}`` of
matrix ``j`` — with ``.trans``, rows ``2(l&3)+{0,1}`` of column ``l>>2``.
"""

from __future__ import annotations

import numpy as np

from .expr import minimum

# -- blocks -------------------------------------------------------------------------------------


def block_coords(bid, tiles_m: int, tiles_n: int, group: int):
    """(tile row, tile column, z) of linear block ``bid``: z = bid // tiles (batch and split-K
    slice), and inside one z a grouped raster: ``group`` tile rows are walked column by column,
    so blocks resident together share A rows and B columns in L2. A bijection onto
    [0, tiles_m) x [0, tiles_n) for each z; one grid dimension, so no 65535 limit on y or z."""
    tiles = tiles_m * tiles_n
    z, t = bid // tiles, bid % tiles
    per_group = group * tiles_n
    first_m = (t // per_group) * group
    size_m = minimum(tiles_m - first_m, group)
    return first_m + (t % per_group) % size_m, (t % per_group) // size_m, z


# -- PTX fragments ---------------------------------------------------------------------------


def frag_a(lane, i):
    g, t = lane >> 2, lane & 3
    return g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)


def frag_b(lane, i):
    g, t = lane >> 2, lane & 3
    return 2 * t + (i & 1) + 8 * (i >> 1), g


def frag_c(lane, i):
    g, t = lane >> 2, lane & 3
    return g + 8 * (i >> 1), 2 * t + (i & 1)


def ldmatrix_element(lane, e, trans: bool):
    """(row, col) inside an 8x8 matrix of the element ``e`` (0/1) that ``lane`` receives."""
    if trans:
        return 2 * (lane & 3) + e, lane >> 2
    return lane >> 2, 2 * (lane & 3) + e


# -- shared memory ----------------------------------------------------------------------------


def swizzle(row, chunk, chunks_per_row: int):
    """The 16-byte chunk a (row, chunk) lands in: XOR with a row-dependent value so the 8 rows an
    ldmatrix phase reads fall in 8 different 4-bank groups (a bijection within each row)."""
    if chunks_per_row % 8 == 0:
        return chunk ^ (row & 7)
    rows_per_line = 8 // chunks_per_row  # rows sharing one 128-byte line
    return chunk ^ ((row // rows_per_line) & (chunks_per_row - 1))


def smem_offset(row, col, width: int):
    """Element offset (not bytes) of (row, col) in a [rows][width] tile of 2-byte elements;
    ``col`` runs along the tile's contiguous dimension."""
    cpr = width // 8
    return row * width + swizzle(row, col >> 3, cpr) * 8 + (col & 7)


# -- global -> shared copies --------------------------------------------------------------------


def copy_coords(idx, width: int, vec: int):
    """Copy ``idx`` of a tile with rows of ``width`` elements moved ``vec`` at a time:
    (row, first column)."""
    per_row = width // vec
    return idx // per_row, (idx % per_row) * vec


def copies(rows: int, width: int, vec: int) -> int:
    return rows * width // vec


# -- warp fragments --------------------------------------------------------------------------


def warp_origin(warp, wtm: int, wtn: int, warps_n: int):
    return (warp // warps_n) * wtm, (warp % warps_n) * wtn


def a_ldmatrix(lane, m0, k0, kcontig: bool):
    """(row, col) of the shared-memory row lane ``lane`` addresses when loading the A fragment
    of the 16x16 tile at (m0, k0). K-contiguous tile: [m][k], no transpose; M-contiguous tile:
    [k][m], loaded with .trans."""
    j, r = lane >> 3, lane & 7
    if kcontig:
        return m0 + (j & 1) * 8 + r, k0 + (j >> 1) * 8
    return k0 + (j >> 1) * 8 + r, m0 + (j & 1) * 8


def b_ldmatrix(lane, n0, k0, kcontig: bool):
    """(row, col) lane ``lane`` addresses when loading the B fragments of two n8 tiles (n0 and
    n0+8) x k16 at k0: registers b[n0][0], b[n0][1], b[n0+8][0], b[n0+8][1]. K-contiguous
    tile: [n][k]; N-contiguous tile: [k][n], loaded with .trans."""
    j, r = lane >> 3, lane & 7
    if kcontig:
        return n0 + (j >> 1) * 8 + r, k0 + (j & 1) * 8
    return k0 + (j & 1) * 8 + r, n0 + (j >> 1) * 8


def xor_add_split(table: dict, align: int):
    """Constants ``{key: (x, y)}`` with ``table[key] == (table[first] ^ x) + y`` for every
    element (every lane of every warp) and ``x < align``, or None when there are none.
    ``table`` maps each unrolled fragment load (i, j) to its offsets, ``first`` being the
    first key: a thread then computes one offset per stage and reaches the others with an
    XOR and an immediate. Correct for byte addresses ``base + 2*off`` when ``base`` is a
    multiple of ``2*align`` (a power of two): the XOR stays below the base's bits."""
    keys = list(table)
    t0 = np.asarray(table[keys[0]])
    out = {}
    for key in keys:
        t = np.asarray(table[key])
        i, j = key
        cands = [0, t.flat[0] ^ t0.flat[0]]
        for other in ((keys[0][0], j), (i, keys[0][1])):
            if other in table:
                cands.append(np.asarray(table[other]).flat[0] ^ t0.flat[0])
        for x in cands:
            y = t.flat[0] - (t0.flat[0] ^ x)
            if 0 <= x < align and ((t0 ^ x) + y == t).all():
                out[key] = (int(x), int(y))
                break
        else:
            return None
    return out


# -- epilogue ---------------------------------------------------------------------------------


def stage_slot(lane, i, mi, ni, pitch: int):
    """Element offset in a warp's staging buffer of accumulator element ``i`` of its m16n8
    tile (mi, ni): the warp tile row-major with ``pitch`` elements a row."""
    r, c = frag_c(lane, i)
    return (mi * 16 + r) * pitch + ni * 8 + c


def store_chunk(lane, p, wtn: int, vec: int):
    """(row, col) in the warp tile of the ``vec`` elements lane ``lane`` stores in pass ``p``:
    consecutive lanes take consecutive chunks of a row (coalesced 16-byte stores)."""
    chunk = p * 32 + lane
    per_row = wtn // vec
    return chunk // per_row, (chunk % per_row) * vec


def c_coords(lane, i, m0, n0):
    """Global (row, col) of accumulator element ``i`` of the m16n8 tile at (m0, n0)."""
    r, c = frag_c(lane, i)
    return m0 + r, n0 + c
