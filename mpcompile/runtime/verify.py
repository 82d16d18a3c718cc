"""Verification of a generated kernel on first use on a device, as plain functions.

A kernel is trusted on a device only after it computed two problems of its own shape there:

1. **Exact integers.** Operands are random integers in ``[-v, v]`` with ``v`` chosen from K
   (:func:`integer_limit`): every operand is exact in FP16/BF16, every product and every partial
   sum (in any order, split-K included) is an integer below 2^24, so exact in FP32, and the
   result fits the output dtype. The kernel's output must then equal the float64 result, put
   through the epilogue and rounded once to the output dtype, *exactly* (``torch.equal``: -0 and
   +0 compare equal, NaN never does). Epilogues with ``gelu`` are not exact in FP32; for them
   the comparison allows one rounding of the output plus :data:`EPILOGUE_UNITS` FP32 units of
   the activation's input.
2. **Random values** uniform in [-1, 1), compared element-wise with the float64 result within

       |got - want| <= C * sqrt(K) * u32 * (|A| @ |B|) (carried through the epilogue)
                       + u_out * |want| + one subnormal of the output dtype,

   ``C`` = :data:`RANDOM_BOUND_C` = 8. Why: each of the K FP32 additions rounds with an error of
   at most u32 times a partial sum, itself at most ``(|A| @ |B|)``; the errors have random signs,
   so their sum is about ``sqrt(K / 3) * u32 * (|A| @ |B|)`` (a standard deviation) and 8 of
   those is never reached by a correct kernel, while a wrong index, a lost K slice or a
   truncating accumulator that drifts like K instead of sqrt(K) exceeds it.
   ``u_out`` is the unit roundoff of the coarsest rounding the contract has (the output dtype,
   or the operand dtype when the epilogue rounds to it).

In both, the output buffer is filled with NaN before the kernel runs (:func:`poisoned`): an
element the kernel leaves unwritten is NaN and fails. GEMM operands are built with the strides
the spec was generated for, their padding filled with NaN, so a kernel that reads outside its
rows fails too.

Nothing here needs a GPU: ``launch`` may be any function with the kernel's contract (tests give
it the CPU reference, and broken variants).
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

RANDOM_BOUND_C = 8.0  # standard deviations of the random-rounding model (see the module doc)
EPILOGUE_UNITS = 8.0  # FP32 units of |input| an inexact epilogue op (gelu) may add
EXACT_OPS = ("scale", "bias_n", "relu", "round")  # exact on exact inputs (scale is 2^-1)
SCALE = 0.5  # the runtime scale of the checks: a power of two, so exact
FP32_EXACT = 2 ** 24  # integers up to this are exact in FP32

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


def expected(problem: Problem, a, b, bias, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 result after the epilogue, before the final rounding; its error bound without
    the output rounding) for the operands given."""
    sp = problem.spec
    ref = product64(sp, a, b)
    mag = product64(sp, a.abs(), b.abs())
    bound = RANDOM_BOUND_C * math.sqrt(sp.k) * unit_roundoff("float32") * mag
    o = Operands(sp.dtype, None if bias is None else
                 channel_view(bias.double(), ref.dim(), _channel_dim(sp.kind)),
                 None if scale is None else scale.double())
    for name in sp.epilogue.ops:
        extra = 0 if name in EXACT_OPS else EPILOGUE_UNITS * unit_roundoff("float32") * ref.abs()
        if name == "round":  # the value really is rounded; its error is the coarser u below
            ref = OPS[name].torch(ref, o)
        else:
            ref, bound = OPS[name].oracle(ref, bound, o)
        bound = bound + extra
    return ref, bound


def output_unit(problem: Problem) -> float:
    """u of the coarsest rounding between the accumulator and the output."""
    u = unit_roundoff(problem.final)
    if "round" in problem.spec.epilogue.ops or problem.spec.epilogue.out != "float32":
        u = max(u, unit_roundoff(problem.spec.dtype))
    return u


def _smallest(dtype: str) -> float:
    return float(torch.finfo(from_name(dtype)).smallest_normal) * unit_roundoff(dtype) * 2


def check_exact(problem: Problem, got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None if ``got`` is the exact result rounded once to its dtype, else what differs.
    ``want``: float64, after the epilogue (:func:`expected`)."""
    if got.shape != want.shape:
        return f"output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    nan = int(torch.isnan(got).sum())
    if nan:
        return f"{nan} output elements NaN (unwritten or poisoned) on integer inputs"
    rounded = want.to(got.dtype)
    if all(op in EXACT_OPS for op in problem.spec.epilogue.ops):
        bad = int((got != rounded).sum())
        return None if bad == 0 else f"{bad} elements differ from the exact integer result"
    u = output_unit(problem)
    tol = (u + EPILOGUE_UNITS * unit_roundoff("float32")) * want.abs() + _smallest(problem.final)
    bad = int((~((got.double() - want).abs() <= tol)).sum())
    return None if bad == 0 else f"{bad} elements beyond one rounding of the integer result"


def check_bounded(problem: Problem, got: torch.Tensor, want: torch.Tensor,
                  bound: torch.Tensor) -> tuple[str | None, float]:
    """(None or what is wrong, the largest error / bound) for random operands."""
    if got.shape != want.shape:
        return f"output shape {tuple(got.shape)}, expected {tuple(want.shape)}", math.inf
    total = bound + output_unit(problem) * want.abs() + _smallest(problem.final)
    err = (got.double() - want).abs()
    ratio = err / total
    worst = float(ratio.nan_to_num(nan=math.inf).max()) if ratio.numel() else 0.0
    nan = int(torch.isnan(got).sum())
    if nan:
        return f"{nan} output elements NaN (unwritten or poisoned) on random inputs", math.inf
    bad = int((~(err <= total)).sum())
    if bad:
        return (f"{bad} elements beyond the sqrt(K) error bound on random inputs (worst "
                f"{worst:.3g}x the bound)"), worst
    return None, worst


def verify(problem: Problem, launch: Launch, device, seed: int = 0) -> Verdict:
    """Run ``launch`` on exact-integer and on random operands of ``problem``'s shape, each time
    into a NaN-poisoned output, and judge the results (see the module doc)."""
    sp = problem.spec
    gen = torch.Generator().manual_seed(seed)
    rounds = sp.dtype if "round" in sp.epilogue.ops else None
    v = integer_limit(sp.k, sp.dtype, problem.final, rounds_to=rounds)
    notes = []
    if v is not None:
        ops = make_operands(problem, "int", device, gen, v)
        got = launch(*ops, alloc=poisoned)
        why = check_exact(problem, got, expected(problem, *ops)[0])
        if why:
            return Verdict(False, f"{why} (|v| <= {v}, K = {sp.k})")
        notes.append(f"exact on integers |v| <= {v}")
    else:
        notes.append(f"no exact-integer check (K = {sp.k} overflows {problem.final})")
    ops = make_operands(problem, "random", device, gen)
    got = launch(*ops, alloc=poisoned)
    why, worst = check_bounded(problem, got, *expected(problem, *ops))
    if why:
        return Verdict(False, why)
    notes.append(f"random within {worst:.2g} of the sqrt(K) bound")
    return Verdict(True, "verified on this device: " + ", ".join(notes))


__all__ = ["EPILOGUE_UNITS", "EXACT_OPS", "RANDOM_BOUND_C", "SCALE", "Problem", "Verdict",
           "check_bounded", "check_exact", "conv_shapes", "expected", "gemm_operand_layout",
           "integer_limit", "make_operands", "max_exact_integer", "operand_shapes", "output_unit",
           "poisoned", "product64", "verify"]
