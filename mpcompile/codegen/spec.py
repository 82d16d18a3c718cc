"""Kernel specs: what one generated kernel computes, frozen and validated at construction.

A spec is a GEMM ``C[M, N] = epilogue(A[M, K] @ B[K, N])`` (FP16/BF16 operands, FP32
accumulation), batched, or a convolution as an implicit GEMM in NHWC activations / KRSC weights:

- ``conv_fprop``: M = N*P*Q, N = K_out, K = R*S*C   (y = conv(x, w))
- ``conv_dgrad``: M = N*H*W, N = C,     K = R*S*K_out (dx from dy and w)
- ``conv_wgrad``: M = K_out, N = R*S*C, K = N*P*Q   (dw from dy and x; split-K)

Operands are read through address functions of the GEMM coordinates, written as Python over
int-like values (see ``expr.py``), so the renderer and the NumPy model share them. Each operand is
read in chunks of ``vec`` consecutive elements along its contiguous dimension (16-byte
``cp.async`` for 8, narrower copies for 4 and 2, plain loads for 1); a spec whose shapes or
strides do not allow its ``vec`` is rejected here.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..dtypes import FLOAT32, FLOATS
from ..errors import KernelError
from .epilogue import LINEAR, NAMES  # LINEAR: the only ops allowed before a split-K sum
from .expr import all_of, below, minimum, select, wide
from .schedule import Schedule

KERNEL_DTYPES = tuple(f.name for f in FLOATS if f.is_low)  # float16, bfloat16
OUT_DTYPES = (*KERNEL_DTYPES, FLOAT32.name)
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
MAX_SMEM = min(SMEM_LIMIT.values())
INT32_MAX = 2**31 - 1  # also the grid's x limit; y and z stop at 65535, so the grid uses x only
RASTER_GROUP = 8  # tile rows walked together by consecutive blocks (L2 reuse of B columns)
OUTSIDE = -(1 << 24)  # a window origin no filter offset brings inside: marks rows past M


def radix_add(digits: tuple, radices: tuple, amount: int) -> tuple:
    """``digits`` (most significant first; the first unbounded, the others below
    ``radices``) plus the constant ``amount``, digit by digit with one carry each: what a
    kernel computes per k-tile without a division."""
    out, carry = [], 0
    for i in range(len(digits) - 1, 0, -1):
        radix = radices[i - 1]
        below_ = 1
        for r in radices[i:]:
            below_ *= r
        inc = amount // below_ % radix
        if inc == 0 and type(carry) is int and carry == 0:  # this digit cannot move
            out.append(digits[i])
            continue
        d = digits[i] + inc + carry
        carry = d >= radix
        out.append(select(carry, d - radix, d))
    below_ = 1
    for r in radices:
        below_ *= r
    out.append(digits[0] + amount // below_ + carry)
    return tuple(reversed(out))


def widest_vec(*extents: int) -> int:
    """The widest copy (8, 4, 2 or 1 elements) that divides every extent and stride given."""
    for v in (8, 4, 2, 1):
        if all(e % v == 0 for e in extents):
            return v
    return 1


WIDE_TILE_MIN_VEC = 4  # copy width (elements) both operands need under 64x64 warp tiles


class SpecError(KernelError, ValueError):
    """A kernel spec that cannot be built (says why)."""


class Kind(str, enum.Enum):
    GEMM = "gemm"
    CONV_FPROP = "conv_fprop"
    CONV_DGRAD = "conv_dgrad"
    CONV_WGRAD = "conv_wgrad"


@dataclass(frozen=True)
class Tile:
    """Threadblock tile and its warps: each warp computes (bm/warps_m) x (bn/warps_n) with
    m16n8k16 MMAs; ``stages`` shared-memory buffers pipeline the global loads."""

    bm: int = 128
    bn: int = 128
    bk: int = 32
    warps_m: int = 2
    warps_n: int = 4
    stages: int = 3

    def __post_init__(self) -> None:
        if self.bk % 16 or self.bk not in (16, 32, 64):
            raise SpecError(f"tile bk={self.bk}: must be 16, 32 or 64 (k16 MMAs, 16-byte rows)")
        if self.bm % (16 * self.warps_m):
            raise SpecError(f"tile bm={self.bm} is not a multiple of 16 x warps_m={self.warps_m}")
        if self.bn % (16 * self.warps_n):
            raise SpecError(f"tile bn={self.bn} is not a multiple of 16 x warps_n={self.warps_n}"
                            " (each warp loads B fragments in pairs of n8 tiles)")
        for side in (self.bm, self.bn, self.bk):
            cpr = side // 8  # 16-byte chunks per shared-memory row: the swizzle needs 2^i or 8j
            if cpr not in (1, 2, 4) and cpr % 8:
                raise SpecError(f"tile side {side}: 16-byte chunks per row must be 1, 2, 4 or a "
                                "multiple of 8 for the shared-memory swizzle")
        if not 2 <= self.stages <= 6:
            raise SpecError(f"tile stages={self.stages}: use 2..6")
        if self.threads > 1024:
            raise SpecError(f"tile uses {self.threads} threads (> 1024)")

    @property
    def warps(self) -> int:
        return self.warps_m * self.warps_n

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def wtm(self) -> int:
        return self.bm // self.warps_m

    @property
    def wtn(self) -> int:
        return self.bn // self.warps_n

    @property
    def mi(self) -> int:
        return self.wtm // 16

    @property
    def ni(self) -> int:
        return self.wtn // 8

    @property
    def smem_bytes(self) -> int:
        return self.stages * (self.bm * self.bk + self.bk * self.bn) * 2

    @property
    def accumulator_registers(self) -> int:
        return self.mi * self.ni * 4

    @property
    def ctas_per_sm(self) -> int:
        """CTAs the kernel is built to keep resident per SM (``__launch_bounds__``'s minimum):
        one for 64x64 warp tiles (their 128 accumulators a thread fill the registers), two
        otherwise. Without it ptxas picks its own occupancy target and may spill at 72
        registers."""
        return 1 if self.accumulator_registers >= 128 else 2


@dataclass(frozen=True)
class Conv:
    """Convolution geometry (groups = 1)."""

    n: int
    h: int
    w: int
    c: int
    k: int
    r: int
    s: int
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (0, 0)
    dil: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        for name in ("n", "h", "w", "c", "k", "r", "s"):
            if getattr(self, name) < 1:
                raise SpecError(f"conv {name}={getattr(self, name)} must be >= 1")
        object.__setattr__(self, "stride", tuple(self.stride))
        object.__setattr__(self, "pad", tuple(self.pad))
        object.__setattr__(self, "dil", tuple(self.dil))
        if self.p < 1 or self.q < 1:
            raise SpecError(f"conv output would be {self.p}x{self.q}")

    @property
    def p(self) -> int:
        return (self.h + 2 * self.pad[0] - self.dil[0] * (self.r - 1) - 1) // self.stride[0] + 1

    @property
    def q(self) -> int:
        return (self.w + 2 * self.pad[1] - self.dil[1] * (self.s - 1) - 1) // self.stride[1] + 1


def conv_gemm_shape(kind: Kind, cv: Conv) -> tuple[int, int, int]:
    """(M, N, K) of the implicit GEMM that computes convolution ``kind`` of ``cv``."""
    return {
        Kind.CONV_FPROP: (cv.n * cv.p * cv.q, cv.k, cv.r * cv.s * cv.c),
        Kind.CONV_DGRAD: (cv.n * cv.h * cv.w, cv.c, cv.r * cv.s * cv.k),
        Kind.CONV_WGRAD: (cv.k, cv.r * cv.s * cv.c, cv.n * cv.p * cv.q),
    }[Kind(kind)]


@dataclass(frozen=True)
class Epilogue:
    """Ops on the FP32 accumulator, in order, then the cast to ``out``. ``scale`` multiplies by
    a runtime FP32 scalar (the loss scale or its inverse: no host sync), ``bias_n`` adds a
    per-column vector, ``round`` rounds to the operand dtype first (keeps an unfused
    low-precision result exactly when the output is FP32)."""

    ops: tuple[str, ...] = ()
    out: str = "float16"
    bias_dtype: str = "float16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        bad = [o for o in self.ops if o not in NAMES]
        if bad:
            raise SpecError(f"epilogue ops {bad} unknown; known: {NAMES}")
        if len(set(self.ops)) != len(self.ops):
            raise SpecError(f"epilogue {self.ops} repeats an op")
        if self.out not in OUT_DTYPES or self.bias_dtype not in OUT_DTYPES:
            raise SpecError(f"epilogue dtypes {self.out}/{self.bias_dtype} not in {OUT_DTYPES}")


@dataclass(frozen=True)
class KernelSpec:
    """One generated kernel. Strides are in elements; the GEMM view's operand layouts are
    ``row`` (A: K contiguous; B: N contiguous) or ``col`` (A: M contiguous; B: K contiguous)."""

    kind: Kind
    dtype: str
    m: int
    n: int
    k: int
    tile: Tile = field(default_factory=Tile)
    epilogue: Epilogue = field(default_factory=Epilogue)
    batch: int = 1
    a_layout: str = "row"
    b_layout: str = "row"
    lda: int = 0
    ldb: int = 0
    ldc: int = 0
    batch_stride_a: int = 0
    batch_stride_b: int = 0
    batch_stride_c: int = 0
    conv: Conv | None = None
    split_k: int = 1
    vec_a: int = 8
    vec_b: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        if self.dtype not in KERNEL_DTYPES:
            raise SpecError(f"dtype {self.dtype}: kernels take {KERNEL_DTYPES} operands")
        if min(self.m, self.n, self.k, self.batch, self.split_k) < 1:
            raise SpecError(f"empty problem m={self.m} n={self.n} k={self.k} "
                            f"batch={self.batch} split_k={self.split_k}")
        if self.kind is not Kind.GEMM:
            self._check_conv()
        else:
            if self.a_layout not in ("row", "col") or self.b_layout not in ("row", "col"):
                raise SpecError(f"layouts {self.a_layout}/{self.b_layout}: use row or col")
            need_a = self.k if self.a_layout == "row" else self.m
            need_b = self.n if self.b_layout == "row" else self.k
            if self.lda < need_a or self.ldb < need_b or self.ldc < self.n:
                raise SpecError(f"leading dimensions lda={self.lda} ldb={self.ldb} "
                                f"ldc={self.ldc} too small for {self.m}x{self.n}x{self.k}")
        for name, vec, extent, ld in (("a", self.vec_a, *self._contig("a")),
                                      ("b", self.vec_b, *self._contig("b"))):
            if vec not in (1, 2, 4, 8):
                raise SpecError(f"vec_{name}={vec}: use 1, 2, 4 or 8 elements")
            if extent % vec or ld % vec:
                raise SpecError(
                    f"vec_{name}={vec} does not divide operand {name}'s contiguous extent "
                    f"{extent} and stride {ld}: chunks would straddle rows (use a smaller vec)")
        if self.split_k > 1:
            if any(o not in LINEAR for o in self.epilogue.ops) or \
                    self.epilogue.out != "float32" or self.batch > 1:
                raise SpecError("split-K writes FP32 partials that are summed afterwards: only "
                                f"linear epilogue ops {LINEAR}, a float32 output, no batch")
        if max(self.m, self.n, self.k) + max(self.tile.bm, self.tile.bn, self.tile.bk) \
                > INT32_MAX or self.blocks > INT32_MAX:
            raise SpecError(f"problem {self.m}x{self.n}x{self.k} (batch {self.batch}, split_k "
                            f"{self.split_k}) needs {self.blocks} blocks or coordinates beyond "
                            "2^31-1: split it into several kernels")
        if self.smem_bytes > MAX_SMEM:
            raise SpecError(f"tile needs {self.smem_bytes} B of shared memory "
                            f"(> {MAX_SMEM} on sm_80)")
        if self.tile.accumulator_registers > 128:
            raise SpecError(f"warp tile needs {self.tile.accumulator_registers} accumulator "
                            "registers per thread (> 128 leaves too few for the rest)")
        t = self.tile
        if t.accumulator_registers >= 128 and min(self.vec_a, self.vec_b) < WIDE_TILE_MIN_VEC:
            raise SpecError(
                f"tile {t.bm}x{t.bn}x{t.bk} (64x64 warp tiles) needs copies of "
                f"{WIDE_TILE_MIN_VEC}+ elements on both operands, got vec_a={self.vec_a}, "
                f"vec_b={self.vec_b}: narrower copies spill registers (measured on sm_80: up to "
                "1.5 KB a thread); use a smaller tile (choose_tile(m, n, vec=...))")
        if self.kind is Kind.CONV_DGRAD and t.bm > 128:
            raise SpecError(f"tile {t.bm}x{t.bn}x{t.bk}: a data gradient's two stepped "
                            "operands spill at bm > 128 (measured on sm_80: 254 registers and "
                            "8 B of spills); use bm <= 128")

    def _check_conv(self) -> None:
        cv = self.conv
        if cv is None:
            raise SpecError(f"{self.kind.value} needs conv geometry")
        want = conv_gemm_shape(self.kind, cv)
        if (self.m, self.n, self.k) != want:
            raise SpecError(f"{self.kind.value}: m, n, k must be {want} for {cv}, got "
                            f"{(self.m, self.n, self.k)}")
        if self.batch != 1:
            raise SpecError("convolutions are not batched (the batch is in M or K)")

    def _contig(self, operand: str) -> tuple[int, int]:
        """(extent of the operand's contiguous dimension, its row stride) for alignment."""
        cv = self.conv
        if self.kind is Kind.GEMM:
            if operand == "a":
                return (self.k if self.a_layout == "row" else self.m), self.lda
            return (self.n if self.b_layout == "row" else self.k), self.ldb
        table = {
            (Kind.CONV_FPROP, "a"): (cv.c, cv.c), (Kind.CONV_FPROP, "b"): (cv.c, cv.c),
            (Kind.CONV_DGRAD, "a"): (cv.k, cv.k), (Kind.CONV_DGRAD, "b"): (cv.c, cv.c),
            (Kind.CONV_WGRAD, "a"): (cv.k, cv.k), (Kind.CONV_WGRAD, "b"): (cv.c, cv.c),
        }
        return table[(self.kind, operand)]

    # -- the GEMM view ------------------------------------------------------------------------

    @property
    def a_kcontig(self) -> bool:
        """Is A read as a K-contiguous tile ([bm][bk]) or an M-contiguous one ([bk][bm])?"""
        if self.kind is Kind.GEMM:
            return self.a_layout == "row"
        return self.kind is not Kind.CONV_WGRAD

    @property
    def b_kcontig(self) -> bool:
        if self.kind is Kind.GEMM:
            return self.b_layout == "col"
        return self.kind is Kind.CONV_FPROP

    @property
    def k_per_split(self) -> int:
        steps = -(-self.k // self.tile.bk)
        return -(-steps // self.split_k) * self.tile.bk

    @property
    def schedule(self) -> Schedule:
        """The main loop's pipeline (stage ring, waits, barriers) the renderer emits and the
        NumPy model executes; the epilogue reuses the stage buffers, so the drain barriers."""
        return Schedule.for_stages(self.tile.stages, smem_epilogue=True)

    # -- the epilogue: staged through shared memory, stored in 16-byte chunks -------------------

    @property
    def out_bytes(self) -> int:
        return 4 if self.split_k > 1 or self.epilogue.out == "float32" else 2

    @property
    def c_vec(self) -> int:
        """Output elements per global store: 16 bytes when every row start (ldc, the batch and
        split-K slice offsets) keeps 16-byte alignment, else one element."""
        v = 16 // self.out_bytes
        strides = [self.c_ld, self.batch_stride_c if self.batch > 1 else 0,
                   self.m * self.c_ld if self.split_k > 1 else 0]
        return v if all(st % v == 0 for st in strides) else 1

    @property
    def stage_pitch(self) -> int:
        """Row pitch (elements) of a warp's staging buffer: its warp tile plus 16 bytes, so the
        rows of a fragment store start in different banks."""
        return self.tile.wtn + 16 // self.out_bytes

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory: the stage ring, or the epilogue's staging buffers (one per
        warp, reusing the ring) if larger."""
        t = self.tile
        return max(t.smem_bytes, t.warps * t.wtm * self.stage_pitch * self.out_bytes)

    @property
    def tiles_m(self) -> int:
        return -(-self.m // self.tile.bm)

    @property
    def tiles_n(self) -> int:
        return -(-self.n // self.tile.bn)

    @property
    def blocks(self) -> int:
        return self.tiles_m * self.tiles_n * self.batch * self.split_k

    @property
    def raster_group(self) -> int:
        return RASTER_GROUP

    def grid(self) -> tuple[int, int, int]:
        """Launch dimensions: every block on x (up to 2^31-1; y and z would stop at 65535), the
        kernel decodes its tile and (batch, split) with ``mapping.block_coords``."""
        return (self.blocks, 1, 1)

    def span(self, operand: str) -> int:
        """Elements one batch / split slice of ``operand`` (a, b or c) spans: the largest offset
        its address function reaches, plus one."""
        cv = self.conv
        if operand == "c":
            return self.m * self.c_ld
        if self.kind is Kind.GEMM:
            if operand == "a":
                return self.a_addr(self.m - 1, self.k - 1)[0] + 1
            return self.b_addr(self.k - 1, self.n - 1)[0] + 1
        x, y, w = cv.n * cv.h * cv.w * cv.c, cv.n * cv.p * cv.q * cv.k, cv.k * cv.r * cv.s * cv.c
        return {(Kind.CONV_FPROP, "a"): x, (Kind.CONV_FPROP, "b"): w,
                (Kind.CONV_DGRAD, "a"): y, (Kind.CONV_DGRAD, "b"): w,
                (Kind.CONV_WGRAD, "a"): y, (Kind.CONV_WGRAD, "b"): x}[(self.kind, operand)]

    def k_step(self, operand: str) -> int | None:
        """Elements the address of ``operand`` (a or b) moves per unit of k when it is affine in
        k, ``off(mn, k) = off(mn, 0) + k * k_step`` (GEMMs, the fprop weight, the wgrad output
        gradient): the kernel then computes each copy's offset and predicate once and only
        advances a base pointer per k-tile. None for the im2col operands (not affine)."""
        if self.kind is Kind.GEMM:
            if operand == "a":
                return 1 if self.a_layout == "row" else self.lda
            return self.ldb if self.b_layout == "row" else 1
        return {(Kind.CONV_FPROP, "b"): 1, (Kind.CONV_WGRAD, "a"): self.conv.k if self.conv
                else None}.get((self.kind, operand))

    # -- the im2col filter iterator: incremental (r, s, c) stepping ------------------------------

    def stepped(self, operand: str) -> bool:
        """Is ``operand`` read through the filter iterator instead of its full address function
        each k-tile? For the conv fprop activation, the stride-1 dgrad output gradient (A,
        K-contiguous) and the dgrad weight (B), copied with 16-byte ``cp.async``, when the
        channel extent ``chan`` of k = (r, s, chan) (C, or K_out for dgrad) is a multiple of
        bk: a k-tile then lies in one filter position (r, s) shared by all its copies, only the
        channel offset moves per k-tile and the offsets and predicates change every chan/bk
        tiles. Other channel counts take a per-copy iterator (``walk``); element-wise copies
        and the stride-2 dgrad output gradient the general path."""
        cv, vec = self.conv, self.vec_a if operand == "a" else self.vec_b
        if (self.kind, operand) == (Kind.CONV_FPROP, "a"):
            chan = cv.c
        elif self.kind is Kind.CONV_DGRAD and (operand == "b" or cv.stride == (1, 1)):
            chan = cv.k
        else:
            return False
        return vec == 8 and chan % self.tile.bk == 0

    def walk(self, operand: str) -> str | None:
        """Is ``operand`` read through a per-copy iterator, and which? ``pixels``: the wgrad
        activation, whose k is the output pixel (n, p, q) and column the filter tap (r, s,
        c): each copy keeps its pixel and advances it by bk per k-tile (``pixel_step``), its
        tap's offset and window shift computed once. ``taps``: an im2col operand of fprop or
        dgrad whose channel extent is not a multiple of bk (so not ``stepped``): each copy
        keeps its own (r, s, c) and advances it by bk (``tap_step``), its output pixel's
        window origin computed once. Both with 16-byte ``cp.async`` (channels a multiple of
        8); None otherwise (stride-2 dgrad A, element-wise copies)."""
        if self.stepped(operand) or (self.vec_a if operand == "a" else self.vec_b) != 8:
            return None
        if (self.kind, operand) == (Kind.CONV_WGRAD, "b"):
            return "pixels"
        if (self.kind, operand) == (Kind.CONV_FPROP, "a") or (self.kind is Kind.CONV_DGRAD and (
                operand == "b" or self.conv.stride == (1, 1))):
            return "taps"
        return None

    def walk_origin(self, operand: str, mn):
        """What a walking copy at GEMM row/column ``mn`` computes once (three values)."""
        if self.walk(operand) == "pixels":
            return self.pixel_origin(operand, mn)
        return self.im2col_origin(operand, mn, 0)

    def walk_start(self, operand: str, k):
        """A walking copy's digits at GEMM k."""
        if self.walk(operand) == "pixels":
            return self.pixel_start(operand, k)
        return self.tap_start(operand, k)

    def walk_step(self, operand: str, *digits):
        """The digits bk further."""
        if self.walk(operand) == "pixels":
            return self.pixel_step(operand, *digits)
        return self.tap_step(operand, *digits)

    def walk_at(self, operand: str, origin, digits):
        """(offset, inside) of a walking copy; 0 outside. The caller adds k < k_end."""
        if self.walk(operand) == "pixels":
            return self.pixel_at(operand, *origin, *digits)
        return self.tap_at(operand, *origin, *digits)

    def pixel_origin(self, operand: str, mn):
        """(tap offset, dh, dw) of the wgrad activation's column ``mn`` = (r, s, c): x at
        pixel (n, p, q) is at ``pixel offset + tap offset`` and inside when (p*stride + dh,
        q*stride + dw) is in the image; past N, dh = OUTSIDE."""
        cv = self.conv
        g = minimum(mn, self.n - 1)
        r, sc = g // (cv.s * cv.c), g % (cv.s * cv.c)
        s, c = sc // cv.c, sc % cv.c
        dh, dw = r * cv.dil[0] - cv.pad[0], s * cv.dil[1] - cv.pad[1]
        return (dh * cv.w + dw) * cv.c + c, select(mn < self.n, dh, OUTSIDE), dw

    def pixel_start(self, operand: str, k):
        """The pixel (n, p, q) of GEMM k."""
        cv = self.conv
        return k // (cv.p * cv.q), k % (cv.p * cv.q) // cv.q, k % cv.q

    def pixel_step(self, operand: str, n_, p, q):
        """The pixel bk further: (n, p, q) + bk in mixed radix (N, P, Q)."""
        return radix_add((n_, p, q), (self.conv.p, self.conv.q), self.tile.bk)

    def pixel_at(self, operand: str, tap, dh, dw, n_, p, q):
        """(offset, inside the image and N) of the copy at pixel (n, p, q) with column origin
        (tap, dh, dw); 0 outside. The caller adds the k < k_end bound."""
        cv = self.conv
        h, w = p * cv.stride[0], q * cv.stride[1]
        ok = all_of(below(h + dh, cv.h), below(w + dw, cv.w))
        n_ = wide(n_) if self.wide_index(operand) else n_
        return select(ok, ((n_ * cv.h + h) * cv.w + w) * cv.c + tap, 0), ok

    def tap_start(self, operand: str, k):
        """The filter tap (r, s, channel) of GEMM k of an im2col operand."""
        cv, chan = self.conv, self._chan()
        return k // (cv.s * chan), k // chan % cv.s, k % chan

    def tap_step(self, operand: str, r, s, c):
        """The tap bk further: (r, s, c) + bk in mixed radix (R, S, chan)."""
        return radix_add((r, s, c), (self.conv.s, self._chan()), self.tile.bk)

    def tap_at(self, operand: str, base, h0, w0, r, s, c):
        """(offset, inside) of a copy with window origin (base, h0, w0, from
        ``im2col_origin``) at tap (r, s, c); 0 outside. The caller adds k < k_end."""
        cv = self.conv
        if operand == "b":  # the dgrad weight w[ko, r, s, c], ko = the tap's channel
            ok = below(h0, 1)
            return select(ok, ((c * cv.r + r) * cv.s + s) * cv.c + base, 0), ok
        sign, rows, cols = (1, cv.h, cv.w) if self.kind is Kind.CONV_FPROP else (-1, cv.p, cv.q)
        dh, dw = sign * cv.dil[0] * r, sign * cv.dil[1] * s
        ok = all_of(below(h0 + dh, rows), below(w0 + dw, cols))
        return select(ok, base + (dh * cols + dw) * self._chan() + c, 0), ok

    def copy_path(self, operand: str) -> str:
        """How the main loop computes ``operand``'s copy addresses: ``stepped`` (the filter
        iterator, see ``stepped``), ``pixels`` or ``taps`` (per-copy iterators, see ``walk``),
        ``hoisted`` (affine in k, 16-byte copies: offsets and
        predicates computed once, a base pointer moves) or ``general`` (the address function
        at every k-tile)."""
        if self.stepped(operand):
            return "stepped"
        if self.walk(operand):
            return self.walk(operand)
        vec = self.vec_a if operand == "a" else self.vec_b
        return "hoisted" if self.k_step(operand) is not None and vec == 8 else "general"

    def _chan(self) -> int:
        """The channel extent of the im2col k = (r, s, chan)."""
        return self.conv.c if self.kind is Kind.CONV_FPROP else self.conv.k

    def im2col_origin(self, operand: str, mn, kr):
        """(base offset, h0, w0) of a stepped operand's copy at GEMM row/column ``mn`` and
        relative k ``kr`` (its place in the k-tile): what does not change with k, computed once
        per copy. Its element at filter position (r, s) and the k-tile's channel c is at
        ``base + window offset (im2col_at) + channel offset (im2col_chan)``, inside when
        (h0 + dh, w0 + dw) is in the image. fprop reads x[n, h, w, c] at h = p*stride - pad +
        r*dil; stride-1 dgrad reads dy[n, p, q, ko] at p = h + pad - r*dil; the dgrad weight
        w[ko, r, s, c] has no window: h0 only says whether the column is inside. Past M (or N):
        h0 = OUTSIDE (never inside) and the base of the last row."""
        cv = self.conv
        g = minimum(mn, (self.m if operand == "a" else self.n) - 1)  # offsets stay in range
        if operand == "b":  # dgrad weight, n = c
            base = g + kr * (cv.r * cv.s * cv.c)
            return base, select(mn < self.n, 0, OUTSIDE), 0
        if self.kind is Kind.CONV_FPROP:  # m = (n, p, q)
            n_, pq = g // (cv.p * cv.q), g % (cv.p * cv.q)
            h0 = pq // cv.q * cv.stride[0] - cv.pad[0]
            w0 = pq % cv.q * cv.stride[1] - cv.pad[1]
            rows, cols = cv.h, cv.w
        else:  # stride-1 dgrad, m = (n, h, w)
            n_, hw = g // (cv.h * cv.w), g % (cv.h * cv.w)
            h0, w0 = hw // cv.w + cv.pad[0], hw % cv.w + cv.pad[1]
            rows, cols = cv.p, cv.q
        n_ = wide(n_) if self.wide_index(operand) else n_
        base = ((n_ * rows + h0) * cols + w0) * self._chan() + kr
        return base, select(mn < self.m, h0, OUTSIDE), w0

    def im2col_at(self, operand: str, base, h0, w0, rs):
        """(offset at channel 0, inside) of a copy with origin (base, h0, w0) at filter position
        ``rs`` = r*S + s; outside, the offset is 0 (a valid address the copy does not read)."""
        cv = self.conv
        if operand == "b":  # w[ko, r, s, c]: the filter position is in ``im2col_chan``
            ok = below(h0, 1)
            return select(ok, base, 0), ok
        sign, rows, cols = (1, cv.h, cv.w) if self.kind is Kind.CONV_FPROP else (-1, cv.p, cv.q)
        dh, dw = sign * cv.dil[0] * (rs // cv.s), sign * cv.dil[1] * (rs % cv.s)
        ok = all_of(below(h0 + dh, rows), below(w0 + dw, cols))
        return select(ok, base + (dh * cols + dw) * self._chan(), 0), ok

    def im2col_chan(self, operand: str, c, rs):
        """The offset every copy of the k-tile adds, at channel ``c`` and filter position
        ``rs``: the channel (unit stride) in NHWC activations; in the KRSC weight (dgrad B)
        the position too, as its offsets and predicates never change (``im2col_fixed``)."""
        cv = self.conv
        return (c * (cv.r * cv.s) + rs) * cv.c if operand == "b" else c

    def im2col_fixed(self, operand: str) -> bool:
        """Do ``im2col_at``'s offsets and predicates stay put when the filter position moves?
        For the dgrad weight (no window): then they are computed once."""
        return operand == "b"

    def im2col_start(self, operand: str, k):
        """The iterator's state (channel, filter position) at the first k of a split."""
        return k % self._chan(), k // self._chan()

    def im2col_step(self, operand: str, c, rs):
        """The state one k-tile later, and whether the filter position moved (then the
        offsets and predicates are recomputed with ``im2col_at``): (c, rs, moved)."""
        moved = c + self.tile.bk == self._chan()  # chan % bk == 0: c + bk never passes chan
        return select(moved, 0, c + self.tile.bk), rs + moved, moved

    @property
    def ragged_k(self) -> bool:
        """Can a k-tile run past its split's end (K not a multiple of bk)?"""
        return self.k % self.tile.bk != 0

    def wide_index(self, operand: str) -> bool:
        """Must offsets into ``operand`` be computed in 64 bits? Only past 2^31-1 elements: 32-bit
        integer math is faster and every intermediate value is bounded by the final offset."""
        return self.span(operand) > INT32_MAX

    def a_addr(self, m, k):
        """(element offset of A[m, k], is it inside the problem), for int-like m, k."""
        cv = self.conv
        inside = all_of(m < self.m, k < self.k)
        if self.kind is Kind.GEMM:
            off = m * self.lda + k if self.a_layout == "row" else k * self.lda + m
            return off, inside
        if self.kind is Kind.CONV_FPROP:  # x[n, h, w, c], m=(n,p,q), k=(r,s,c)
            n_, pq = m // (cv.p * cv.q), m % (cv.p * cv.q)
            p, q = pq // cv.q, pq % cv.q
            r, sc = k // (cv.s * cv.c), k % (cv.s * cv.c)
            s, c = sc // cv.c, sc % cv.c
            h = p * cv.stride[0] - cv.pad[0] + r * cv.dil[0]
            w = q * cv.stride[1] - cv.pad[1] + s * cv.dil[1]
            ok = all_of(inside, h >= 0, h < cv.h, w >= 0, w < cv.w)
            return ((n_ * cv.h + h) * cv.w + w) * cv.c + c, ok
        if self.kind is Kind.CONV_DGRAD:  # dy[n, p, q, k], m=(n,h,w), k=(r,s,ko)
            n_, hw = m // (cv.h * cv.w), m % (cv.h * cv.w)
            h, w = hw // cv.w, hw % cv.w
            r, sk = k // (cv.s * cv.k), k % (cv.s * cv.k)
            s, ko = sk // cv.k, sk % cv.k
            hh = h + cv.pad[0] - r * cv.dil[0]
            ww = w + cv.pad[1] - s * cv.dil[1]
            p, q = hh // cv.stride[0], ww // cv.stride[1]
            ok = all_of(inside, hh >= 0, ww >= 0, hh % cv.stride[0] == 0,
                        ww % cv.stride[1] == 0, p < cv.p, q < cv.q)
            return ((n_ * cv.p + p) * cv.q + q) * cv.k + ko, ok
        # wgrad: dy[(n,p,q), ko], m=ko, k=(n,p,q): M-contiguous
        return k * cv.k + m, inside

    def b_addr(self, k, n):
        """(element offset of B[k, n], is it inside the problem)."""
        cv = self.conv
        inside = all_of(k < self.k, n < self.n)
        if self.kind is Kind.GEMM:
            off = k * self.ldb + n if self.b_layout == "row" else n * self.ldb + k
            return off, inside
        if self.kind is Kind.CONV_FPROP:  # w[ko, r, s, c] with n=ko, k=(r,s,c)
            return n * (cv.r * cv.s * cv.c) + k, inside
        if self.kind is Kind.CONV_DGRAD:  # w[ko, r, s, c] with k=(r,s,ko), n=c
            r, sk = k // (cv.s * cv.k), k % (cv.s * cv.k)
            s, ko = sk // cv.k, sk % cv.k
            return ((ko * cv.r + r) * cv.s + s) * cv.c + n, inside
        # wgrad: x[n, h, w, c] with k=(n,p,q), n=(r,s,c)
        n_, pq = k // (cv.p * cv.q), k % (cv.p * cv.q)
        p, q = pq // cv.q, pq % cv.q
        r, sc = n // (cv.s * cv.c), n % (cv.s * cv.c)
        s, c = sc // cv.c, sc % cv.c
        h = p * cv.stride[0] - cv.pad[0] + r * cv.dil[0]
        w = q * cv.stride[1] - cv.pad[1] + s * cv.dil[1]
        ok = all_of(inside, h >= 0, h < cv.h, w >= 0, w < cv.w)
        return ((n_ * cv.h + h) * cv.w + w) * cv.c + c, ok

    def c_addr(self, m, n):
        """Element offset of C[m, n] (row-major with ldc; NHWC / KRSC for convolutions)."""
        return m * self.c_ld + n

    @property
    def c_ld(self) -> int:
        return self.ldc if self.kind is Kind.GEMM else self.n

    # -- identity ------------------------------------------------------------------------------

    def as_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()
        return f"mpk_{self.kind.value}_{self.dtype}_{digest[:12]}"
