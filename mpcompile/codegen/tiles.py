"""The tile presets and the heuristics that pick a tile, a split-K factor and copy widths.

One place for these choices: the lowering pass uses them to build specs, ``KernelCall``'s
autotuner times the presets, and ``scripts/gpu_check.py`` checks the same variants.
"""

from __future__ import annotations

from ..dtypes import FLOAT32
from .spec import Conv, Epilogue, KernelSpec, Kind, Tile, conv_gemm_shape, widest_vec

TILES: dict[str, Tile] = {  # the configurations the lowering chooses from (and autotuning times)
    "large": Tile(128, 128, 32, 2, 4, 3),
    "medium": Tile(64, 128, 32, 2, 2, 3),
    "small": Tile(64, 64, 32, 2, 2, 3),
    "tiny": Tile(32, 32, 32, 1, 2, 2),
}

SPLIT_K_MIN_DEPTH = 4096  # a split-K slice should still run at least this many K elements
SPLIT_K_MAX = 32


def choose_tile(m: int, n: int) -> Tile:
    """The largest preset whose block still has work on an M x N output."""
    if m >= 1024 and n >= 1024:
        return TILES["large"]
    if m >= 256 and n >= 128:
        return TILES["medium"]
    if m >= 64 and n >= 64:
        return TILES["small"]
    return TILES["tiny"]


def choose_split_k(k: int) -> int:
    """Split factor of a reduction of depth ``k`` (a weight gradient's K = N*P*Q is long and its
    M x N output small): one split per ``SPLIT_K_MIN_DEPTH`` elements, at most ``SPLIT_K_MAX``."""
    return max(1, min(SPLIT_K_MAX, k // SPLIT_K_MIN_DEPTH))


def conv_spec(kind: Kind, dtype: str, cv: Conv, ops: tuple[str, ...] = (),
              out: str | None = None) -> KernelSpec:
    """The spec of convolution ``kind`` of ``cv``: preset tile by the GEMM's M x N, split-K for
    weight gradients (FP32 partials: the output is then FP32, rounded by the caller), the
    widest copies the channel counts allow. ``out`` defaults to ``dtype``."""
    m, n, k = conv_gemm_shape(kind, cv)
    split = choose_split_k(k) if kind is Kind.CONV_WGRAD else 1
    out = FLOAT32.name if split > 1 else (out or dtype)
    return KernelSpec(kind, dtype, m, n, k, tile=choose_tile(m, n),
                      epilogue=Epilogue(tuple(ops), out, dtype), conv=cv, split_k=split,
                      vec_a=widest_vec(cv.c if kind is Kind.CONV_FPROP else cv.k),
                      vec_b=widest_vec(cv.c))


__all__ = ["SPLIT_K_MAX", "SPLIT_K_MIN_DEPTH", "TILES", "choose_split_k", "choose_tile",
           "conv_spec"]
