"""The tile presets and the heuristics that pick a tile, a split-K factor and copy widths.

One place for these choices: the lowering pass uses them to build specs, ``KernelCall``'s
autotuner times the presets, and ``scripts/gpu_check.py`` checks the same variants.
"""

from __future__ import annotations

from ..dtypes import FLOAT32
from .spec import (
    WIDE_TILE_MIN_VEC,
    Conv,
    Epilogue,
    KernelSpec,
    Kind,
    Tile,
    conv_gemm_shape,
    widest_vec,
)

TILES: dict[str, Tile] = {  # the configurations the lowering chooses from (and autotuning times)
    # 64x64 warp tiles (128 FP32 accumulators a thread): 16 LDSM feed 64 HMMA per k16 step;
    # bk 64 halves the per-k-tile overhead (wait, barrier, stage and pointer updates);
    # 3 stages of 48 KB fit sm_80's 163 KB; one 256-thread CTA per SM
    "large": Tile(128, 256, 64, 2, 4, 3),
    "wide": Tile(256, 128, 64, 4, 2, 3),
    "medium": Tile(128, 128, 32, 2, 2, 4),
    "small": Tile(64, 64, 32, 2, 2, 3),
    "tiny": Tile(32, 32, 32, 1, 2, 2),
}

SPLIT_K_MIN_DEPTH = 4096  # a split-K slice should still run at least this many K elements
SPLIT_K_MAX = 32
SMS = {"sm_80": 108, "sm_90": 132}  # A100, H100/H200: streaming multiprocessors per GPU


def register_budget(t: Tile, elementwise: bool = False) -> int:
    """Registers per thread a tile may use: its FP32 accumulators and one k16 step's A/B
    fragments, plus 128 for addresses, loop state and predicates (measured: 36-100 with 16-byte
    copies), 192 when an operand is copied element by element (a 3-channel input: 16 im2col
    decompositions and loads in flight a thread; 207 registers in all for the cnn example's
    split-K weight gradient, where k_start is not a constant). A tile of 64x64 warp tiles (128
    accumulators) runs one CTA per SM by design (8 warps and 144 KB of shared memory fill the
    SM); smaller ones must let two CTAs share the SM's 64K registers (``Tile.ctas_per_sm``)."""
    fragments = 4 * t.mi + 2 * t.ni
    rest = 192 if elementwise else 128
    return min(t.accumulator_registers + fragments + rest, 65536 // (t.ctas_per_sm * t.threads),
               255)


def choose_tile(m: int, n: int, vec: int = 8, kind: Kind | None = None) -> Tile:
    """The largest preset whose block still has work on an M x N output (the long side of the
    CTA along the long side of the output). ``vec``: the narrower of the two operands' copy
    widths; the 64x64-warp-tile presets need ``WIDE_TILE_MIN_VEC`` (narrower copies spill), and
    a data gradient (``kind``) keeps bm <= 128 (see ``KernelSpec``'s checks)."""
    if vec >= WIDE_TILE_MIN_VEC:
        if m >= 1024 and n >= 1024:
            return TILES["wide"] if m > n and kind is not Kind.CONV_DGRAD else TILES["large"]
        if m >= 256 and n >= 128:
            return TILES["medium"]
    if m >= 64 and n >= 64:
        return TILES["small"]
    return TILES["tiny"]


def choose_split_k(k: int, m: int | None = None, n: int | None = None,
                   tile: Tile | None = None, sms: int = SMS["sm_90"]) -> int:
    """Split factor of a reduction of depth ``k``. Given the output (``m`` x ``n``) and the
    ``tile``: the smallest split that fills one wave of ``sms`` CTAs (a weight gradient's M x N
    output is small and its K = N*P*Q long), as long as each slice keeps at least two k-tiles
    and ``SPLIT_K_MAX`` is not passed; at most one split per ``SPLIT_K_MIN_DEPTH`` otherwise.
    Without the output shape, from K alone (one split per ``SPLIT_K_MIN_DEPTH`` elements)."""
    by_depth = max(1, min(SPLIT_K_MAX, k // SPLIT_K_MIN_DEPTH))
    if m is None or n is None or tile is None:
        return by_depth
    ctas = -(-m // tile.bm) * -(-n // tile.bn)
    if ctas >= sms:
        return 1
    fill = -(-sms // ctas)  # splits that fill the wave
    deepest = max(1, k // (2 * tile.bk))  # every slice keeps two k-tiles or more
    return max(1, min(fill, deepest, SPLIT_K_MAX))


def conv_spec(kind: Kind, dtype: str, cv: Conv, ops: tuple[str, ...] = (),
              out: str | None = None) -> KernelSpec:
    """The spec of convolution ``kind`` of ``cv``: preset tile by the GEMM's M x N, split-K for
    weight gradients (FP32 partials: the output is then FP32, rounded by the caller), the
    widest copies the channel counts allow. ``out`` defaults to ``dtype``."""
    m, n, k = conv_gemm_shape(kind, cv)
    vec_a, vec_b = widest_vec(cv.c if kind is Kind.CONV_FPROP else cv.k), widest_vec(cv.c)
    tile = choose_tile(m, n, min(vec_a, vec_b), kind)
    split = choose_split_k(k, m, n, tile) if kind is Kind.CONV_WGRAD else 1
    out = FLOAT32.name if split > 1 else (out or dtype)
    return KernelSpec(kind, dtype, m, n, k, tile=tile,
                      epilogue=Epilogue(tuple(ops), out, dtype), conv=cv, split_k=split,
                      vec_a=vec_a, vec_b=vec_b)


__all__ = ["SMS", "SPLIT_K_MAX", "SPLIT_K_MIN_DEPTH", "TILES", "choose_split_k", "choose_tile",
           "conv_spec", "register_budget"]
