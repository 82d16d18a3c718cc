"""Hopper (sm_90a) layouts: who holds which element, and where it lies in shared memory.

Plain functions over int-like values (ints, NumPy integer arrays, or :class:`~.expr.Sym`), used
both by the renderer (``hopper.py``: it pastes the rendered expressions and constants into the
kernel) and by the NumPy model (``hopper_model.py``: it executes them for every thread).

References, PTX ISA 9.0:

- 9.7.15.5.1.1.1 "Matrix Fragments for wgmma.mma_async.m64nNk16" (Figure 149): the f32
  accumulator D of a warpgroup (128 threads): thread ``t`` = warp ``w`` (0..3), lane ``l``,
  ``g = l >> 2``, ``q = l & 3``; register ``i`` of ``N/2`` holds row ``16w + g + 8*((i>>1)&1)``,
  column ``8*(i>>2) + 2q + (i&1)``.
- 9.7.15.5.1.2 "Shared Memory Matrix Layout", 9.7.15.5.1.2.1.3 "Canonical Layouts" (in units of
  ``T = 128 / element bits`` elements), for the 128-byte swizzle mode:
  K-major ``Swizzle<3,4,3> o ((8,m),(T,2k)):((8T,SBO),(1,T))``,
  MN-major ``Swizzle<3,4,3> o ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))``;
  the swizzle XORs byte-address bits [4:6] (the 16-byte chunk) with bits [7:9] (the 128-byte
  row within a 1024-byte pattern), on absolute shared-memory addresses: a pattern starting on a
  1024-byte boundary needs base offset 0.
- 9.7.15.5.1.2.2 "Matrix Descriptor Format": bits 0-13 start address, 16-29 leading dimension
  byte offset (LBO), 32-45 stride dimension byte offset (SBO), each ``(x & 0x3FFFF) >> 4``;
  bits 49-51 base offset; bits 62-63 swizzle mode (0 none, 1 128B, 2 64B, 3 32B).
- CUDA driver API, ``CUtensorMapSwizzle``: ``CU_TENSOR_MAP_SWIZZLE_128B`` "swizzles 16B chunks
  within a 128B span": a box whose inner dimension spans 128 bytes is written row after row,
  16-byte chunk ``c`` of row ``r`` landing in chunk ``c ^ (r % 8)`` of a 1024-byte aligned
  destination, the same pattern as the wgmma 128B mode: a TMA box is a canonical operand.
"""

from __future__ import annotations

import numpy as np

from .expr import Sym

ELEM_BYTES = 2  # f16 / bf16 operands
SWIZZLE_BYTES = 128  # the swizzle span: one shared-memory row of a K-major tile
SWIZZLE_ATOM_BYTES = 1024  # 8 rows of 128 bytes: the period of the 128B pattern
SWIZZLE_128B = 1  # descriptor bits 62-63
ROW_ELEMS = SWIZZLE_BYTES // ELEM_BYTES  # 64 elements per swizzled row
WARPGROUP = 128


# -- 128-byte swizzle ----------------------------------------------------------------------------


def swizzle_128b(addr):
    """Byte address after the 128B swizzle: chunk bits [4:6] XOR row bits [7:9]."""
    return addr ^ (((addr >> 7) & 7) << 4)


def tma_box_offset(inner, outer):
    """Byte offset (from a 1024-byte aligned destination) where a 128B-swizzled TMA box puts the
    element at (``inner`` index along the 128-byte contiguous dimension, ``outer`` row)."""
    return swizzle_128b(outer * SWIZZLE_BYTES + inner * ELEM_BYTES)


# -- matrix descriptors --------------------------------------------------------------------------


def encode_field(x):
    """``matrix-descriptor-encode(x) = (x & 0x3FFFF) >> 4``."""
    return (x & 0x3FFFF) >> 4


def descriptor(start: int, lbo: int, sbo: int, swizzle: int = SWIZZLE_128B,
               base_offset: int = 0) -> int:
    """The 64-bit wgmma shared-memory matrix descriptor (ints only)."""
    return (encode_field(start) | (encode_field(lbo) << 16) | (encode_field(sbo) << 32)
            | ((base_offset & 7) << 49) | ((swizzle & 3) << 62))


def descriptor_constant(lbo: int, sbo: int, swizzle: int = SWIZZLE_128B) -> int:
    """Every field but the start address: the kernel ORs in ``encode_field(address)``."""
    return descriptor(0, lbo, sbo, swizzle)


def decode_descriptor(d: int) -> dict[str, int]:
    """The fields of a descriptor, byte values (start, lbo, sbo) restored by ``<< 4``."""
    d = int(d)
    return {"start": (d & 0x3FFF) << 4, "lbo": ((d >> 16) & 0x3FFF) << 4,
            "sbo": ((d >> 32) & 0x3FFF) << 4, "base_offset": (d >> 49) & 7,
            "swizzle": (d >> 62) & 3}


def canonical_offset(mn, k, k_major: bool, lbo: int, sbo: int):
    """Byte offset, before the swizzle, of operand element (``mn``, ``k``) in the canonical
    128B-swizzle layout of 16-bit elements (T = 8): K-major ``((8,m),(T,2k)):((8T,SBO),(1,T))``,
    MN-major ``((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))``."""
    if k_major:  # 8 rows of 128 bytes (k along the row), groups of 8 rows SBO apart
        return (mn % 8) * SWIZZLE_BYTES + (mn // 8) * sbo + k * ELEM_BYTES
    return ((mn % ROW_ELEMS) * ELEM_BYTES + (mn // ROW_ELEMS) * lbo
            + (k % 8) * SWIZZLE_BYTES + (k // 8) * sbo)


def operand_address(desc: int, mn, k, k_major: bool):
    """Shared-memory byte address wgmma reads for operand element (``mn``, ``k``) of the matrix
    that descriptor ``desc`` describes (128B swizzle, base offset 0)."""
    f = decode_descriptor(desc)
    if f["swizzle"] != SWIZZLE_128B or f["base_offset"] != 0:
        raise ValueError(f"descriptor {desc:#x}: only the 128B swizzle with base offset 0")
    return swizzle_128b(f["start"] + canonical_offset(mn, k, k_major, f["lbo"], f["sbo"]))


# -- accumulator fragment ------------------------------------------------------------------------


def acc_coords(thread, i):
    """(row, col) inside the m64nN tile of f32 accumulator register ``i`` of warpgroup thread
    ``thread`` (0..127)."""
    warp, lane = thread >> 5, thread & 31
    return (16 * warp + (lane >> 2) + 8 * ((i >> 1) & 1),
            8 * (i >> 2) + 2 * (lane & 3) + (i & 1))


# -- staged epilogue -----------------------------------------------------------------------------

STAGING_ROWS = 64  # one m64 accumulator block per chunk
STAGING_BYTES = STAGING_ROWS * SWIZZLE_BYTES  # 8 KB: 64 rows of 128 bytes
STORE_BYTES = 16  # one st.global.v4 (STG.E.128) per thread and pass


def staging_offset(row, col, elem_bytes: int):
    """Byte offset (from the chunk buffer) of output element (``row``, ``col``) of a 64-row chunk
    of 128-byte rows, its 16-byte chunks XOR-permuted per row so that the accumulator
    fragment's pair writes and the 16-byte row reads hit distinct banks: a pair store covers
    ``k = elem_bytes / 2`` chunks of each of ``8 / k`` rows per wavefront (8 rows of 4-byte
    pairs per warp; 4 rows of 8-byte pairs per half-warp), so row ``r`` XORs its chunk index
    with ``(r % (8 / k)) * k``; a quarter-warp's 16-byte reads take one row's 8 chunks."""
    k = elem_bytes // ELEM_BYTES
    return (row * SWIZZLE_BYTES + col * elem_bytes) ^ (((row % (8 // k)) * k) << 4)


def store_vector(thread, pass_):
    """(row, 16-byte chunk) of the staging chunk that warpgroup thread ``thread`` copies to global
    memory in pass ``pass_`` (0..3): 8 threads per 128-byte row, 16 rows per pass."""
    per_row = SWIZZLE_BYTES // STORE_BYTES
    return pass_ * (WARPGROUP // per_row) + (thread >> 3), thread & (per_row - 1)


STORE_PASSES = STAGING_ROWS * SWIZZLE_BYTES // (STORE_BYTES * WARPGROUP)


# -- persistent tile schedule --------------------------------------------------------------------


def _min(a, b):
    if isinstance(a, Sym) or isinstance(b, Sym):
        return Sym(f"min({a}, {b})")
    return np.minimum(a, b)


def tile_coords(tile, tiles_m: int, tiles_n: int, group_m: int):
    """(m block, n block) of linear tile ``tile``: tiles are taken in bands of ``group_m``
    M-blocks, column by column inside a band, so consecutive CTAs share B columns and A rows
    in L2 (grouped rasterisation)."""
    per_band = group_m * tiles_n
    band, inner = tile // per_band, tile % per_band
    first_m = band * group_m
    rows = _min(tiles_m - first_m, group_m)
    return first_m + inner % rows, inner // rows
