"""Claim (d): FP32 accumulation of FP16 products (paper section 3.3) against an FP16 accumulator.

For each dot length K, ``trials`` pairs of vectors (a, b) of FP16 values are drawn from two
distributions (uniform [0, 1): positive, the sum grows; standard normal: it cancels) and their
dot products computed four ways:

- ``fp32_contract``: the kernels' contract with an FP32 output, :func:`runtime.reference.gemm`
  (FP16 operands widened to FP32, products accumulated in FP32): what a generated kernel must
  compute before its epilogue rounds;
- ``fp32_pipeline``: a dot-product module compiled by :func:`mpcompile.convert` with
  ``Policy(kernels="on")``: the graph calls the kernel op (``KernelCall``), which off a GPU runs
  that contract and rounds the result to FP16 once;
- ``fp16_accumulator``: the baseline the paper argues against, an FP16 accumulator:
  ``acc <- fp16(acc + a_k * b_k)`` for k = 1..K, one round-to-nearest-even per step
  (a fused multiply-add; see :func:`fp16_accumulate` for why this is exact);
- ``gpu_kernel``: the same compiled module on CUDA, where the generated tensor-core kernel runs
  (only when ``torch.cuda.is_available()``).

The error of each is ``|y_hat - y| / sum_k |a_k b_k|`` with ``y`` the exact dot product rounded
once to float64 (``math.fsum`` of the exact float64 products); for the positive distribution
this is the relative error. The tables report the median over the trials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MPCompileError
from . import common

DISTRIBUTIONS = ("uniform[0,1)", "normal(0,1)")
FULL_LENGTHS = tuple(2**k for k in range(6, 17))
TINY_LENGTHS = (2**6, 2**10, 2**16)
PAPER = ("FP16 dot products must accumulate their partial products in FP32 and write the "
         "result as FP16; the paper found this needed to match FP32 accuracy but gives no "
         "error figures (section 3.3). The arithmetic: an FP16 sum drops an addend below "
         "2^-11 of itself")


@dataclass(frozen=True)
class Row:
    """Median error (see the module docstring) of each method for one length and
    distribution; ``gpu_kernel`` None when no GPU ran."""

    length: int
    distribution: str
    fp32_contract: float
    fp32_pipeline: float
    fp16_accumulator: float
    gpu_kernel: float | None

    @property
    def ratio(self) -> float:
        """FP16 accumulator's error over the FP32 contract's (inf when FP32's is 0)."""
        if self.fp32_contract == 0:
            return math.inf if self.fp16_accumulator > 0 else 1.0
        return self.fp16_accumulator / self.fp32_contract


@dataclass(frozen=True)
class AccumulationResult:
    rows: tuple[Row, ...]
    trials: int
    gpu: str  # the device the generated kernels ran on, or why they did not run
    gpu_backend: str  # what computed the GPU column (KernelCall.backend), "" without a GPU

    def row(self, length: int, distribution: str) -> Row:
        for r in self.rows:
            if r.length == length and r.distribution == distribution:
                return r
        raise KeyError((length, distribution))


# --- the FP16 accumulator ---------------------------------------------------------------------


def round_fp16(x: np.ndarray) -> np.ndarray:
    """float64 -> nearest FP16 value (ties to even), returned as float64. NumPy converts
    float64 to float16 directly from the bits (no detour through float32, which would round
    twice)."""
    return np.asarray(x, dtype=np.float64).astype(np.float16).astype(np.float64)


def fp16_accumulate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products with an FP16 accumulator: ``acc <- fp16(acc + a_k * b_k)``,
    sequentially over k, one rounding to nearest even per step (a fused multiply-add).
    ``a``, ``b``: (rows, K) arrays of FP16 values.

    Exactness: ``a_k * b_k`` of FP16 values has at most 22 significant bits, so it is exact in
    float64; ``acc + p`` is rounded to float64 (``s``) and TwoSum gives the exact remainder
    ``e`` (``acc + p == s + e``). Rounding ``s`` to FP16 equals rounding ``acc + p`` unless
    ``s`` lies exactly halfway between two FP16 values while ``e != 0``: then ``e``'s sign picks
    the neighbour, which is what this does."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise MPCompileError(f"fp16_accumulate: a and b must be (rows, K) of one shape, got "
                         f"{a.shape} and {b.shape}")
    if not (np.array_equal(round_fp16(a), a) and np.array_equal(round_fp16(b), b)):
        raise MPCompileError("fp16_accumulate: a and b must hold FP16 values (round them with "
                             "round_fp16 first)")
    acc = np.zeros(a.shape[0])
    for k in range(a.shape[1]):
        p = a[:, k] * b[:, k]
        s = acc + p
        bb = s - acc
        e = (acc - (s - bb)) + (p - bb)  # TwoSum
        r = round_fp16(s)
        inexact = (e != 0) & (r != s)
        if inexact.any():
            r = _break_ties(s, e, r, inexact)
        acc = r
    return acc


def _break_ties(s: np.ndarray, e: np.ndarray, r: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Where ``s`` is the midpoint between ``r`` and its FP16 neighbour toward ``s``, round
    ``s + e`` instead: to ``r`` if ``e`` points toward ``r``, else to that neighbour."""
    r16 = r.astype(np.float16)
    toward = np.where(s > r, np.float16(np.inf), np.float16(-np.inf)).astype(np.float16)
    q = np.nextafter(r16, toward).astype(np.float64)
    mid = where & (s == (r + q) / 2)
    out = r.copy()
    away = mid & (np.sign(e) == np.sign(q - s))
    out[away] = q[away]
    return out


# --- the measurement ----------------------------------------------------------------------------


def draw(length: int, trials: int, distribution: str, seed: int) -> tuple[torch.Tensor, ...]:
    """(a, b): ``trials`` x ``length`` FP16 values (as float32 tensors) from ``distribution``."""
    g = torch.Generator().manual_seed(seed)
    if distribution == "uniform[0,1)":
        a, b = torch.rand(trials, length, generator=g), torch.rand(trials, length, generator=g)
    elif distribution == "normal(0,1)":
        a, b = torch.randn(trials, length, generator=g), torch.randn(trials, length, generator=g)
    else:
        raise MPCompileError(f"distribution {distribution!r}: use one of {DISTRIBUTIONS}")
    return a.half().float(), b.half().float()


def exact_dots(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(exact dot rounded once to float64, sum of |a_k b_k|) per row."""
    prods = (a.double() * b.double()).numpy()  # exact: FP16 x FP16 fits in 22 bits
    exact = np.array([math.fsum(row) for row in prods])
    scale = np.array([math.fsum(row) for row in np.abs(prods)])
    return exact, scale


class Dot(torch.nn.Module):
    """Row-wise dot products as one batched matmul: (T, 1, K) @ (T, K, 1)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.unsqueeze(1) @ b.unsqueeze(2)).flatten()


def pipeline_dots(a: torch.Tensor, b: torch.Tensor, device: str = "cpu"
                  ) -> tuple[np.ndarray, str]:
    """The dots through :func:`mpcompile.convert` (FP16, ``kernels="on"``) on ``device``, and
    what computed the kernel call (``KernelCall.backend``)."""
    from ..api import convert
    from ..policy import Policy
    from ..runtime.kernel import KernelCall

    a, b = a.to(device), b.to(device)
    mp = convert(Dot(), (a, b), policy=Policy(dtype=torch.float16, kernels="on"))
    with torch.no_grad():
        y = mp(a, b)
    program = mp.program_for((a, b), {})
    calls = [m for m in program.executable.modules() if isinstance(m, KernelCall)]
    if len(calls) != 1:
        raise RuntimeError(f"expected one kernel call in the compiled dot, found {len(calls)}")
    return y.double().cpu().numpy(), calls[0].backend


def contract_dots(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """The kernels' contract with an FP32 output: ``reference.gemm`` on FP16 operands."""
    from ..codegen.spec import Epilogue
    from ..runtime import reference

    out = reference.gemm(a.half().unsqueeze(1), b.half().unsqueeze(2),
                         Epilogue(ops=(), out="float32"), "float16")
    return out.flatten().double().numpy()


def _median_error(y: np.ndarray, exact: np.ndarray, scale: np.ndarray) -> float:
    return float(np.median(np.abs(y - exact) / scale))


def measure(lengths: tuple[int, ...] = FULL_LENGTHS, trials: int = 32, seed: int = 0,
            progress: bool = False) -> AccumulationResult:
    """Run the comparison (module docstring) for every length and distribution."""
    if not lengths or any(k < 1 for k in lengths) or trials < 1:
        raise MPCompileError(f"measure: lengths must be positive and trials >= 1, got {lengths}, "
                         f"{trials}")
    gpu = torch.cuda.is_available()
    where = torch.cuda.get_device_name() if gpu else \
        "not run: no CUDA device here (torch.cuda.is_available() is False)"
    backend = ""
    rows = []
    pbar = common.bar(len(lengths), "(d) accum", progress)
    try:
        for i, k in enumerate(lengths):
            draws = [draw(k, trials, d, seed + 2 * i + j) for j, d in enumerate(DISTRIBUTIONS)]
            a = torch.cat([x for x, _ in draws])
            b = torch.cat([y for _, y in draws])
            exact, scale = exact_dots(a, b)
            contract = contract_dots(a, b)
            piped, _ = pipeline_dots(a, b)
            acc16 = fp16_accumulate(a.numpy(), b.numpy())
            on_gpu = None
            if gpu:
                try:
                    on_gpu, backend = pipeline_dots(a, b, "cuda")
                except MPCompileError as e:  # e.g. kernels="on" without NVRTC: KernelError
                    gpu, where = False, f"not run: {str(e).splitlines()[0]}"
            for j, dist in enumerate(DISTRIBUTIONS):
                sl = slice(j * trials, (j + 1) * trials)
                errs = [None if y is None else _median_error(y[sl], exact[sl], scale[sl])
                        for y in (contract, piped, acc16, on_gpu)]
                rows.append(Row(k, dist, *errs))
            common.tick(pbar, K=k)
    finally:
        common.close(pbar)
    return AccumulationResult(tuple(rows), trials, where, backend)


# --- output -----------------------------------------------------------------------------------


def table(result: AccumulationResult) -> str:
    header = ["K", "data", "FP32 accumulate, FP32 out (contract)",
              "FP32 accumulate, FP16 out (convert, kernels='on')", "FP16 accumulator",
              "FP16 acc / FP32 contract", "generated kernel (GPU)"]
    rows = [(common.fmt_pow2(r.length), r.distribution, f"{r.fp32_contract:.2e}",
             f"{r.fp32_pipeline:.2e}", f"{r.fp16_accumulator:.2e}", f"{r.ratio:.3g}x",
             "not run" if r.gpu_kernel is None else f"{r.gpu_kernel:.2e}")
            for r in result.rows]
    gpu = result.gpu + (f" ({result.gpu_backend})" if result.gpu_backend else "")
    return (f"Median over {result.trials} trials of |y_hat - y| / sum|a_k b_k| "
            f"(y: the exact dot product of the FP16 inputs). GPU: {gpu}.\n\n"
            + common.markdown_table(header, rows))


def plot(result: AccumulationResult, path: Path) -> Path:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(DISTRIBUTIONS), figsize=(10, 3.8), sharey=True)
    series = [("fp32_contract", "FP32 accumulate (contract)"),
              ("fp32_pipeline", "FP32 accumulate, FP16 result (convert)"),
              ("fp16_accumulator", "FP16 accumulator"), ("gpu_kernel", "generated kernel (GPU)")]
    for ax, dist in zip(axes, DISTRIBUTIONS):
        rows = [r for r in result.rows if r.distribution == dist]
        ks = [r.length for r in rows]
        for attr, label in series:
            ys = [getattr(r, attr) for r in rows]
            if any(y is None for y in ys):
                continue
            ax.loglog(ks, [max(y, 1e-12) for y in ys], marker="o", label=label, base=2)
        ax.set_title(dist)
        ax.set_xlabel("dot length K")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median |error| / sum|a b|")
    axes[0].legend(fontsize=8)
    fig.suptitle("(d) FP32 vs FP16 accumulation of FP16 products")
    return common.save_figure(fig, path)


def run(out_dir: Path, *, tiny: bool = False, progress: bool = False
        ) -> tuple[AccumulationResult, list[Path]]:
    """Measure (tiny: K in 2^6, 2^10, 2^16, 8 trials) and write ``d.md`` and ``d.png``."""
    result = measure(TINY_LENGTHS if tiny else FULL_LENGTHS, trials=8 if tiny else 32,
                     progress=progress)
    md = (f"# (d) FP32 vs FP16 accumulation\n\nPaper: {PAPER}.\n\n" + table(result))
    return result, [common.write_text(out_dir / "d.md", md), plot(result, out_dir / "d.png")]
