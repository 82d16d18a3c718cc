"""Verification of a generated kernel: the checks the runtime runs on first use on a device
and ``scripts/gpu_check.py`` runs on every candidate, as plain functions (one implementation).

A kernel passes only if, on two problems of its own shape, launched into a NaN-poisoned output
that lies between canaries (:class:`Guarded`):

0. **Canaries and poison.** The output is allocated inside a larger buffer whose
   :data:`CANARY_ELEMS` elements before and after hold a NaN with a distinctive payload
   (:data:`CANARY_BITS`); the output itself is NaN. After the launch every canary bit must be
   unchanged (no write outside the output) and no NaN may be left in the result (no element
   unwritten). GEMM operands are built with the strides the spec was generated for, their padding
   filled with NaN, so a kernel that reads outside its rows fails too.
1. **Exact integers.** Operands are random integers in ``[-v, v]`` with ``v`` chosen from K
   (:func:`integer_limit`): every operand is exact in FP16/BF16, every product and every partial
   sum (in any order, split-K included, also in a tensor core's truncating adder) is an integer
   below 2^24, so exact in FP32, and the result fits the output dtype. The output must then equal
   the float64 result, put through the epilogue exactly as the kernel does and rounded once to
   the output dtype, bit for bit (:func:`exact_mismatches`; NaN never matches): a wrong index, a
   missed or doubled product or a wrong tile edge changes an integer. Epilogues with ``gelu`` are
   not exact in FP32; for them the comparison allows the output rounding plus
   :data:`EPILOGUE_UNITS` FP32 units of the activation's input.
2. **Random values** uniform in [-1, 1), compared element-wise with the float64 result:

       |got - want| <= (1 + u_out) * (C * sqrt(K) * u32 * M + e) + u_out * |want| + tiny

   ``M`` is ``|A| @ |B|`` carried through the epilogue ops' oracles (:func:`accumulation_bound`),
   ``e`` one FP32 rounding of each inexact epilogue op's result (plus :data:`EPILOGUE_UNITS` u32
   of a GELU's input), ``u_out`` the unit roundoff of the coarsest rounding the contract has (the
   output dtype, or the operand dtype when the epilogue rounds to it), ``tiny`` one subnormal of
   the output dtype (:func:`tolerance`).

   ``C`` = :data:`C_SQRT_K` = 2. Why sqrt(K): with mean-zero inputs the partial sums are random
   walks, and each FP32 addition's rounding error is relative to its partial sum, so the
   accumulated error grows like sqrt(K) u32 M (Higham and Mary, SIAM J. Sci. Comput. 2019, the
   probabilistic model); the worst case K u32 M is vacuous for long K (121 % relative for the
   ResNet-50 res2 weight gradient, K = 100352). Why 2: tensor cores may accumulate with
   truncation, not rounding to nearest. ``tests/test_kernel_ops.py`` simulates an FP32
   accumulator rounded toward zero after every k16 step on this module's random inputs: it uses
   0.05 of the bound at K = 4096 and 0.06 at K = 100352 (about 0.13 sqrt(K) u32 M), so C = 2
   leaves a wide margin against false alarms, while a kernel that loses one k-slice of 32
   products lands at 5.2x the bound at K = 100352. Both callers (the runtime's first-use
   verification and ``scripts/gpu_check.py``) share this one constant, so they agree on what
   passes.

Nothing here needs a GPU: ``launch`` may be any function with the kernel's contract (tests give
it the CPU reference, the NumPy model of the kernel, and broken variants).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..codegen.epilogue import OPS, Operands, channel_view
from ..codegen.spec import KernelSpec, Kind
from ..dtypes import from_name, unit_roundoff

C_SQRT_K = 2.0  # the constant C of the sqrt(K) bound (see the module doc)
U32 = unit_roundoff("float32")
EPILOGUE_UNITS = 8.0  # FP32 units of |input| an inexact epilogue op (gelu) may add
EXACT_OPS = ("scale", "bias_n", "relu", "round")  # exact on exact inputs (scale is 2^-1)
SCALE = 0.5  # the runtime scale of the checks: a power of two, so exact
FP32_EXACT = 2 ** 24  # integers up to this are exact in FP32
CANARY_ELEMS = 4096  # per side; a multiple of 8 keeps the output 16-byte aligned
CANARY_BITS = {"float16": 0x7E5A, "bfloat16": 0x7FA5, "float32": 0x7FA5A5A5}  # NaN payloads
_INT_VIEW = {"float16": torch.int16, "bfloat16": torch.int16, "float32": torch.int32}

# one ``launch(a, b, bias, scale, alloc)`` -> output in the call's final dtype, where
# ``alloc(shape, dtype, device)`` allocates the buffer the kernel writes
Alloc = Callable[[tuple, torch.dtype, torch.device], torch.Tensor]
Launch = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """What a kernel call computes: its spec, whether it reads a bias / a scale, and the dtype
    of the result it hands back (split-K sums are rounded to it)."""

    spec: KernelSpec
    has_bias: bool
    has_scale: bool
    final: str


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str


def poisoned(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer full of NaN: whatever the kernel does not write stays NaN."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def guarded_buffer(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A flat buffer of ``numel`` output elements with :data:`CANARY_ELEMS` canaries each side."""
    return torch.empty(numel + 2 * CANARY_ELEMS, dtype=dtype, device=device)


def output_region(buf: torch.Tensor) -> torch.Tensor:
    """The flat output part of a guarded buffer (a view: the kernel writes through it)."""
    return buf[CANARY_ELEMS: buf.numel() - CANARY_ELEMS]


def arm(buf: torch.Tensor) -> None:
    """Canaries to their NaN pattern, the output region to NaN (poison)."""
    bits = buf.view(_INT_VIEW[_name(buf.dtype)])
    bits[:CANARY_ELEMS].fill_(CANARY_BITS[_name(buf.dtype)])
    bits[buf.numel() - CANARY_ELEMS:].fill_(CANARY_BITS[_name(buf.dtype)])
    output_region(buf).fill_(float("nan"))


def canary_damage(buf: torch.Tensor) -> int:
    """How many canary elements no longer hold their exact bit pattern (written by the kernel)."""
    bits = buf.view(_INT_VIEW[_name(buf.dtype)])
    pattern = CANARY_BITS[_name(buf.dtype)]
    head, tail = bits[:CANARY_ELEMS], bits[buf.numel() - CANARY_ELEMS:]
    return int((head != pattern).sum() + (tail != pattern).sum())


class Guarded:
    """An ``alloc`` for ``launch``: each output it hands out is NaN-poisoned and lies between
    armed canaries; :meth:`damage` counts the canary elements written since (all buffers)."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    def __call__(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        buf = guarded_buffer(math.prod(shape), dtype, device)
        arm(buf)
        self.buffers.append(buf)
        return output_region(buf).view(tuple(shape))

    def damage(self) -> int:
        return sum(canary_damage(buf) for buf in self.buffers)


def max_exact_integer(dtype: str) -> int:
    """The largest n such that every integer in [-n, n] is exact in ``dtype``."""
    return 2 ** (round(-math.log2(unit_roundoff(dtype))))


def integer_limit(k: int, dtype: str, out: str, rounds_to: str | None = None) -> int | None:
    """The largest ``v`` for integer operands in ``[-v, v]`` (and a bias in the same range) such
    that products and sums of K of them (plus the bias) are exact in FP32 and the result is
    finite in ``out`` (and in ``rounds_to``, the dtype an epilogue ``round`` goes through).
    None when no v >= 1 qualifies (K too long for the output's range)."""
    limit = FP32_EXACT
    for name in (out, rounds_to):
        if name is not None:
            limit = min(limit, int(torch.finfo(from_name(name)).max))
    v = min(max_exact_integer(dtype), math.isqrt(limit // (k + 1)))
    return v if v >= 1 else None


# --- operands ---------------------------------------------------------------------------------


def gemm_operand_layout(spec: KernelSpec, which: str, batched: bool) -> tuple[tuple, tuple]:
    """(shape, strides) of GEMM operand ``which`` ("a": [batch,] M x K; "b": [batch,] K x N) as
    the spec reads it."""
    if which == "a":
        rows, cols, layout, ld, bstride = spec.m, spec.k, spec.a_layout, spec.lda, \
            spec.batch_stride_a
    else:
        rows, cols, layout, ld, bstride = spec.k, spec.n, spec.b_layout, spec.ldb, \
            spec.batch_stride_b
    strides = (ld, 1) if layout == "row" else (1, ld)
    if batched:
        return (spec.batch, rows, cols), (bstride, *strides)
    return (rows, cols), strides


def conv_shapes(spec: KernelSpec) -> dict[str, tuple[int, ...]]:
    """NCHW shapes of a convolution spec's tensors: x, w, y (= dy) and the output's."""
    cv = spec.conv
    return {"x": (cv.n, cv.c, cv.h, cv.w), "w": (cv.k, cv.c, cv.r, cv.s),
            "y": (cv.n, cv.k, cv.p, cv.q)}


def operand_shapes(spec: KernelSpec) -> tuple[tuple, tuple]:
    """Shapes of the two operands a call takes (GEMM a, b; fprop x, w; dgrad dy, w; wgrad dy, x)."""
    if spec.kind is Kind.GEMM:
        batched = spec.batch > 1
        return (gemm_operand_layout(spec, "a", batched)[0],
                gemm_operand_layout(spec, "b", batched)[0])
    s = conv_shapes(spec)
    return {Kind.CONV_FPROP: (s["x"], s["w"]), Kind.CONV_DGRAD: (s["y"], s["w"]),
            Kind.CONV_WGRAD: (s["y"], s["x"])}[spec.kind]


def _laid_out(values: torch.Tensor, shape, strides) -> torch.Tensor:
    """``values`` copied into storage with ``strides``; the storage's gaps hold NaN."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    buf = torch.full((size,), float("nan"), dtype=values.dtype, device=values.device)
    out = buf.as_strided(shape, strides)
    out.copy_(values)
    return out


def make_operands(problem: Problem, kind: str, device, gen: torch.Generator,
                  v: int | None = None) -> tuple:
    """(a, b, bias, scale) for the check: ``kind`` "int" (integers in [-v, v]) or "random"
    (uniform in [-1, 1)); GEMM operands laid out as the spec reads them."""
    sp = problem.spec
    low = from_name(sp.dtype)

    def draw(shape, dtype):
        if kind == "int":
            t = torch.randint(-v, v + 1, shape, generator=gen, dtype=torch.int64)
        else:
            t = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
        return t.to(dtype).to(device)

    a, b = (draw(s, low) for s in operand_shapes(sp))
    if sp.kind is Kind.GEMM:
        batched = sp.batch > 1
        a = _laid_out(a, *gemm_operand_layout(sp, "a", batched))
        b = _laid_out(b, *gemm_operand_layout(sp, "b", batched))
    bias = draw((sp.n,), from_name(sp.epilogue.bias_dtype)) if problem.has_bias else None
    scale = (torch.tensor(SCALE, dtype=torch.float32, device=device) if problem.has_scale
             else None)
    return a, b, bias, scale


# --- the float64 result ----------------------------------------------------------------------


def product64(spec: KernelSpec, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The accumulator of ``spec`` in float64 (NCHW / KCRS for convolutions)."""
    a, b = a.double(), b.double()
    if spec.kind is Kind.GEMM:
        return torch.matmul(a, b)
    cv, s = spec.conv, conv_shapes(spec)
    args = (cv.stride, cv.pad, cv.dil)
    if spec.kind is Kind.CONV_FPROP:
        return F.conv2d(a, b, None, *args)
    if spec.kind is Kind.CONV_DGRAD:
        return torch.nn.grad.conv2d_input(list(s["x"]), b, a, *args)
    return torch.nn.grad.conv2d_weight(b, list(s["w"]), a, *args)


def _channel_dim(kind: Kind) -> int:
    return {Kind.GEMM: -1, Kind.CONV_WGRAD: 0}.get(kind, 1)


def expected(problem: Problem, a, b, bias, scale,
             exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 result after the epilogue, before the final rounding; its error bound without
    the output rounding) for the operands given. ``exact`` (integer operands): every sum is exact,
    each epilogue op is applied as the kernel does (its torch form, in float64) and only inexact
    ops add to the bound; otherwise the ops' oracles carry the value and ``M`` = |A| @ |B|, and the
    bound is :func:`accumulation_bound` of M plus one FP32 rounding per op that rounds in FP32."""
    sp = problem.spec
    ref = product64(sp, a, b)
    mag = product64(sp, a.abs(), b.abs())
    extra = torch.zeros_like(ref)
    o = Operands(sp.dtype, None if bias is None else
                 channel_view(bias.double(), ref.dim(), _channel_dim(sp.kind)),
                 None if scale is None else scale.double())
    for name in sp.epilogue.ops:
        inexact = name not in EXACT_OPS
        if inexact:
            extra = extra + EPILOGUE_UNITS * U32 * ref.abs()
        value, mag = OPS[name].oracle(ref, mag, o)
        ref = OPS[name].torch(ref, o) if exact else value
        if not exact and name not in ("relu", "round"):
            extra = extra + U32 * ref.abs()  # the op's FP32 result rounds once
    bound = extra if exact else accumulation_bound(mag, sp.k) + extra
    return ref, bound


def accumulation_bound(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The sqrt(K) bound on an FP32 accumulation of ``k`` products: C sqrt(k) u32 ``mag``
    (``mag`` = |A| @ |B|, element-wise; see the module doc for C = :data:`C_SQRT_K`)."""
    return C_SQRT_K * math.sqrt(k) * U32 * mag


def output_unit(problem: Problem) -> float:
    """u of the coarsest rounding between the accumulator and the output."""
    u = unit_roundoff(problem.final)
    if "round" in problem.spec.epilogue.ops or problem.spec.epilogue.out != "float32":
        u = max(u, unit_roundoff(problem.spec.dtype))
    return u


def smallest_subnormal(dtype: str) -> float:
    return float(torch.finfo(from_name(dtype)).smallest_normal) * unit_roundoff(dtype) * 2


def tolerance(want: torch.Tensor, bound: torch.Tensor, u_out: float, out: str) -> torch.Tensor:
    """Element-wise limit on |got - want| for a value within ``bound`` of ``want`` rounded once
    to a format of unit roundoff ``u_out`` (``out``: its dtype, whose one subnormal is added):
    ``(1 + u_out) bound + u_out |want| + tiny``."""
    return (1 + u_out) * bound + u_out * want.abs() + smallest_subnormal(out)


def problem_tolerance(problem: Problem, want: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """:func:`tolerance` for ``problem``'s output (its coarsest rounding and dtype)."""
    coarse = max((problem.final, problem.spec.epilogue.out), key=unit_roundoff)
    return tolerance(want, bound, output_unit(problem), coarse)


def bound_ratio(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor) -> float:
    """max |got - want| / tol over all elements (> 1: outside the bound; NaN counts as inf)."""
    if got.numel() == 0:
        return 0.0
    ratio = (got.double() - want).abs() / tol
    return float(ratio.nan_to_num(math.inf, math.inf, math.inf).max())


def exact_mismatches(got: torch.Tensor, want: torch.Tensor) -> int:
    """Elements of ``got`` that differ from the exact float64 ``want`` rounded once to
    ``got.dtype`` (compared as values: -0 equals +0; a NaN is a mismatch)."""
    rounded = want.to(got.dtype)
    return int(((got != rounded) | torch.isnan(got)).sum())


def unwritten(got: torch.Tensor) -> int:
    """NaN elements of a result computed on finite operands into a poisoned output."""
    return int(torch.isnan(got).sum())


def _shape_error(got, want) -> str | None:
    if got.shape != want.shape:
        return f"output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    return None


def check_exact(problem: Problem, got: torch.Tensor, want: torch.Tensor,
                bound: torch.Tensor) -> tuple[str | None, int]:
    """(None or what differs, how many elements) for integer operands: ``got`` must be the exact
    result rounded once to its dtype, bit for bit; with an inexact epilogue op (gelu), within
    :func:`problem_tolerance` of ``bound`` (``want``, ``bound``: :func:`expected` with
    ``exact=True``)."""
    shape = _shape_error(got, want)
    if shape:
        return shape, got.numel()
    nan = unwritten(got)
    if all(op in EXACT_OPS for op in problem.spec.epilogue.ops):
        bad = exact_mismatches(got, want)
        what = "differ from the exact integer result"
    else:
        tol = problem_tolerance(problem, want, bound)
        bad = int((~((got.double() - want).abs() <= tol)).sum())
        what = "beyond one rounding of the integer result"
    if nan:
        return f"{nan} output elements NaN (unwritten or poisoned) on integer inputs", bad
    return (None, 0) if bad == 0 else (f"{bad} elements {what}", bad)


def check_bounded(problem: Problem, got: torch.Tensor, want: torch.Tensor,
                  bound: torch.Tensor) -> tuple[str | None, float]:
    """(None or what is wrong, the largest error / tolerance) for random operands (``want``,
    ``bound``: :func:`expected`)."""
    shape = _shape_error(got, want)
    if shape:
        return shape, math.inf
    tol = problem_tolerance(problem, want, bound)
    worst = bound_ratio(got, want, tol)
    nan = unwritten(got)
    if nan:
        return f"{nan} output elements NaN (unwritten or poisoned) on random inputs", math.inf
    bad = int((~((got.double() - want).abs() <= tol)).sum())
    if bad:
        return (f"{bad} elements beyond the sqrt(K) error bound on random inputs (worst "
                f"{worst:.3g}x the bound)"), worst
    return None, worst


@dataclass(frozen=True)
class Inputs:
    """One problem's operands and float64 result: ``kind`` "int" (with its limit ``v``) or
    "random"."""

    kind: str
    operands: tuple
    want: torch.Tensor
    bound: torch.Tensor
    v: int | None = None


def make_inputs(problem: Problem, device, seed: int = 0) -> list[Inputs]:
    """The operands of the checks and their expected results: exact integers (unless K is too
    long for the output's range) and random values, from one seeded CPU generator."""
    sp = problem.spec
    gen = torch.Generator().manual_seed(seed)
    rounds = sp.dtype if "round" in sp.epilogue.ops else None
    v = integer_limit(sp.k, sp.dtype, problem.final, rounds_to=rounds)
    out = []
    if v is not None:
        ops = make_operands(problem, "int", device, gen, v)
        out.append(Inputs("int", ops, *expected(problem, *ops, exact=True), v=v))
    ops = make_operands(problem, "random", device, gen)
    out.append(Inputs("random", ops, *expected(problem, *ops)))
    return out


@dataclass(frozen=True)
class Report:
    """What the checks measured on one kernel. ``int_mismatches`` None: no exact-integer check
    (K too long for the output's range); ``err_bound``: the largest error / tolerance on random
    inputs; ``unwritten``: NaN elements left in the results; ``canary_damage``: canary elements
    written; ``problems``: why it fails (empty: it passes)."""

    int_limit: int | None
    int_mismatches: int | None
    err_bound: float
    unwritten: int
    canary_damage: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def row(self) -> dict:
        """The report as a flat dict (JSON), with ``ok``."""
        return {"int_limit": self.int_limit, "int_mismatches": self.int_mismatches,
                "err_bound": self.err_bound, "unwritten": self.unwritten,
                "canary_damage": self.canary_damage, "problems": list(self.problems),
                "ok": self.ok}


def run_checks(problem: Problem, launch: Launch, device, seed: int = 0,
               inputs: list[Inputs] | None = None) -> Report:
    """Launch ``launch`` once per input (:func:`make_inputs`, or ``inputs`` made once for many
    kernels of one problem), each time into a fresh guarded, poisoned output, and run every check
    of the module doc on the results."""
    inputs = inputs if inputs is not None else make_inputs(problem, device, seed)
    guard = Guarded()
    problems, mismatches, worst, nan, v = [], None, 0.0, 0, None
    for inp in inputs:
        got = launch(*inp.operands, alloc=guard)
        if got.is_cuda:
            torch.cuda.synchronize(got.device)
        nan += unwritten(got)
        if inp.kind == "int":
            v = inp.v
            why, mismatches = check_exact(problem, got, inp.want, inp.bound)
            if why:
                problems.append(f"{why} (|v| <= {v}, K = {problem.spec.k})")
        else:
            why, worst = check_bounded(problem, got, inp.want, inp.bound)
            if why:
                problems.append(why)
    damage = guard.damage()
    if damage:
        problems.append(f"{damage} canary elements around the output overwritten (a write "
                        "outside the output)")
    return Report(v, mismatches, worst, nan, damage, tuple(problems))


def verify(problem: Problem, launch: Launch, device, seed: int = 0) -> Verdict:
    """Run :func:`run_checks` and sum it up: the verdict the runtime keeps per device."""
    r = run_checks(problem, launch, device, seed)
    if not r.ok:
        return Verdict(False, "; ".join(r.problems))
    notes = [f"exact on integers |v| <= {r.int_limit}" if r.int_limit is not None else
             f"no exact-integer check (K = {problem.spec.k} overflows {problem.final})",
             f"random within {r.err_bound:.2g} of the sqrt(K) bound", "canaries intact"]
    return Verdict(True, "verified on this device: " + ", ".join(notes))


__all__ = ["CANARY_BITS", "CANARY_ELEMS", "C_SQRT_K", "EPILOGUE_UNITS", "EXACT_OPS", "SCALE",
           "U32", "Guarded", "Inputs", "Problem", "Report", "Verdict", "accumulation_bound",
           "arm", "bound_ratio", "canary_damage", "check_bounded", "check_exact", "conv_shapes",
           "exact_mismatches", "expected", "gemm_operand_layout", "guarded_buffer",
           "integer_limit", "make_inputs", "make_operands", "max_exact_integer",
           "operand_shapes", "output_region", "output_unit", "poisoned", "problem_tolerance",
           "product64", "run_checks", "tolerance", "unwritten", "verify"]
