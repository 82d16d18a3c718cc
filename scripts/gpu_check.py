"""Check and time the generated kernels on a GPU, in one prepared command (<= 8 min on an H200).

    python scripts/gpu_check.py                    # every case, each in its own subprocess
    python scripts/gpu_check.py --cases 'gemm_*'   # a selection (comma-separated fnmatch patterns)
    python scripts/gpu_check.py --compile-only     # no GPU: NVRTC for sm_80, sm_90 (and sm_90a for
                                                   # the Hopper kernel): registers, spills, SASS
    python scripts/gpu_check.py --list             # the cases, in run order

It writes ``OUT/gpu_check.json`` (rewritten after every case, so a run cut short keeps what it
did) and ``OUT/gpu_check.md`` (``--out``, default ``gpu_check_out/``), one log per case under
``OUT/logs/``, and prints the Markdown table. Exit status: 0 all run cases passed, 1 a case failed,
crashed or timed out, 3 none failed but some were skipped by the ``--budget`` (seconds for the
whole run: a case that would start with less than ``--min-case-s`` left is reported as skipped,
never run past the budget), 2 no GPU (GPU mode).

Each case runs as ``gpu_check.py --case NAME --json-out FILE`` in a subprocess with a timeout:
an illegal address, a hang or an abort in one case loses that case only. The child writes its JSON
after every candidate, so even a crashed case reports the candidates it finished.

A kernel case passes only if EVERY candidate passes (each preset tile that builds the problem,
and on sm_90 each Hopper configuration that supports it); a failing tile is never replaced by a
passing one. Each candidate runs the checks of ``mpcompile/runtime/verify.py`` (``run_checks``:
the same implementation, operands and bound the runtime's first-use verification uses, so both
agree on what passes), launched through the runtime's launch path (``launch_fn``):

1. Canaries: each output lies between ``verify.CANARY_ELEMS`` elements on each side holding a NaN
   with a distinctive payload, and is itself poisoned with NaN (``verify.Guarded``). After the
   launch: every canary bit unchanged (no write outside the output), no NaN left in the result.
2. Exact integers in ``[-v, v]`` (``verify.integer_limit``: every product and partial sum, in any
   order and any split, an integer FP32 holds exactly; the result finite in the output dtype):
   the float64 result through the epilogue, rounded once, must equal the output bit for bit
   (GELU: within the output rounding plus ``verify.EPILOGUE_UNITS`` u32 of its input).
3. Random inputs (uniform in [-1, 1)) element-wise within ``(1 + u_out)(C sqrt(K) u32 M + e)
   + u_out |ref| + tiny``, ``M`` = |A||B| in float64 through the epilogue, ``C`` =
   ``verify.C_SQRT_K`` = 2; the reasons for sqrt(K) and for C = 2 (a truncating-accumulator
   simulation peaked at 0.14 sqrt(K) u32 M for K = 4096 .. 100352, while a lost k-slice of 32
   products exceeds 2) are in verify.py's docstring.

``--compile-only`` (what CI runs) compiles every candidate of every selected case with NVRTC for
sm_80 and sm_90 (mma.sync) and sm_90a (the Hopper kernel) and reads ptxas and the SASS: a row fails
on a compile error, spills or a stack frame, shared memory over the arch's limit, or no
FP32-accumulating tensor-core instruction (``HMMA.16816.F32``; ``HGMMA.*.F32``); registers above
the tile's budget are reported as a warning.

Timing: ``torch.backends.cudnn.benchmark = True``; each op is warmed for ``WARM_MS`` (clocks up),
then timed by CUDA events around back-to-back launches (enough for ``SAMPLE_MS`` per sample),
median of ``--reps`` samples. cuBLAS is ``torch.matmul``, cuDNN ``F.conv2d`` /
``convolution_backward`` on channels-last tensors. Reported: ms, TFLOP/s, kernel/library speed
ratio, and the issue's target (mma.sync >= 0.6x cuBLAS and wgmma >= 0.85x on the 4096^3 / 8192^3
GEMMs, conv fprop >= 0.5x cuDNN); a missed target fails the run only with ``--strict-targets``.
Two end-to-end cases: ``KernelCall`` forward and backward (checked against float64, timed against
``torch.matmul`` with autograd), and ``mpcompile.convert`` of a small CNN on CUDA with
``kernels="auto"``, trained one step (forward + backward), gradients compared with
``kernels="off"``.

The library's kernel API is used only in the adapter section below (``candidates``,
``compile_candidate``, ``launch_candidate``, ``kernel_call``): adjust it there when the API moves.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import importlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpcompile.codegen.render import render_source  # noqa: E402
from mpcompile.codegen.spec import (  # noqa: E402
    SMEM_LIMIT,
    Conv,
    Epilogue,
    KernelSpec,
    Kind,
    SpecError,
    widest_vec,
)
from mpcompile.codegen.tiles import TILES, choose_tile, conv_spec  # noqa: E402
from mpcompile.dtypes import from_name, unit_roundoff  # noqa: E402
from mpcompile.runtime import sass, verify  # noqa: E402
from mpcompile.runtime.nvrtc import compile_cubin  # noqa: E402

SCRIPT = Path(__file__).resolve()
SM80_ARCHS = ("sm_80", "sm_90")  # the mma.sync kernel: Ampere, and Hopper without wgmma
HOPPER_ARCH = "sm_90a"  # wgmma/TMA need the arch-specific target
ARCHS = (*SM80_ARCHS, HOPPER_ARCH)

# =================================================================================================
# Adapter: every use of the library's kernel API. Adjust here when the API changes.
# =================================================================================================


@dataclass(frozen=True)
class Candidate:
    """One kernel that computes a case's spec: ``path`` "sm80" (mma.sync, a preset tile) or
    "hopper" (wgmma + TMA, a ``HopperConfig``)."""

    label: str
    spec: KernelSpec
    path: str = "sm80"
    config: object = None


def hopper_api():
    """(hopper codegen module, tma runtime module or None, "") or (None, None, why not)."""
    try:
        hopper = importlib.import_module("mpcompile.codegen.hopper")
    except Exception as e:  # noqa: BLE001 - missing or broken: report, never crash the run
        return None, None, f"Hopper kernel not available ({type(e).__name__}: {e})"
    for name in ("supports", "render_hopper", "HopperConfig"):
        if not hasattr(hopper, name):
            return None, None, f"Hopper kernel not available (codegen.hopper has no {name})"
    try:
        tma = importlib.import_module("mpcompile.runtime.tma")
    except Exception:  # noqa: BLE001 - compile-only needs no launcher
        tma = None
    return hopper, tma, ""


def hopper_configs(hopper) -> list:
    """The configurations to check: the module's ``PRESETS`` (dict or sequence) if it has them,
    else the default ``HopperConfig()``."""
    configs = getattr(hopper, "PRESETS", None)
    if isinstance(configs, dict):
        return list(configs.values())
    return list(configs) if configs else [hopper.HopperConfig()]


def candidates(spec: KernelSpec, hopper: bool) -> tuple[list[Candidate], list[str]]:
    """(every kernel to check for ``spec``, notes on what was left out and why): each preset
    tile that builds the problem, then (``hopper``) each Hopper configuration that supports it."""
    out, notes = [], []
    for name, tile in TILES.items():
        try:
            out.append(Candidate(f"sm80 {name}", dataclasses.replace(spec, tile=tile)))
        except SpecError as e:
            notes.append(f"tile {name}: {str(e).splitlines()[0]}")
    if hopper:
        mod, _, why = hopper_api()
        if mod is None:
            notes.append(why)
        else:
            reason = mod.supports(spec)
            if reason:
                notes.append(f"hopper: {reason}")
            else:
                for cfg in hopper_configs(mod):
                    out.append(Candidate(f"hopper {_config_label(cfg)}", spec, "hopper", cfg))
    return out, notes


def _config_label(cfg) -> str:
    fields = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}
    tile = [fields.get(k) for k in ("bm", "bn", "bk")]
    return "x".join(map(str, tile)) if all(tile) else str(cfg)[:40]


def candidate_source(cand: Candidate) -> tuple[str, str]:
    """(CUDA source, kernel function name)."""
    if cand.path == "sm80":
        return render_source(cand.spec), cand.spec.name
    hopper, _, why = hopper_api()
    if hopper is None:
        raise RuntimeError(why)
    src = hopper.render_hopper(cand.spec, cand.config)
    name = getattr(hopper, "kernel_name", None)
    if callable(name):
        return src, name(cand.spec, cand.config)
    found = re.search(r"__global__\s+(?:__launch_bounds__\([^)]*\)\s+)?void\s+(\w+)\s*\(", src)
    return src, found.group(1) if found else cand.spec.name


def candidate_archs(cand: Candidate, archs: tuple[str, ...]) -> tuple[str, ...]:
    """The archs (of ``archs``) a candidate compiles for: sm_80/sm_90 for mma.sync, sm_90a for
    the Hopper kernel."""
    return tuple(a for a in archs if (a == HOPPER_ARCH) == (cand.path == "hopper"))


def compile_candidate(cand: Candidate, arch: str):
    """NVRTC -> ``Compiled`` (``.cubin``, ``.info`` from ptxas)."""
    src, name = candidate_source(cand)
    return compile_cubin(src, name, arch)


def launch_candidate(cand: Candidate, compiled, device: torch.device):
    """A callable ``(a, b, c, bias, scale) -> None`` that launches the kernel on the current
    stream."""
    if cand.path == "sm80":
        from mpcompile.runtime.launch import Loaded

        return Loaded(cand.spec, compiled, device)
    _, tma, why = hopper_api()
    if tma is None or not hasattr(tma, "HopperLoaded"):
        raise RuntimeError(why or "Hopper launcher runtime.tma.HopperLoaded not available")
    return tma.HopperLoaded(cand.spec, cand.config, compiled, device)


def register_budget(spec: KernelSpec) -> int | None:
    """Registers per thread the mma.sync kernel of ``spec`` should stay within (the library's
    ``tiles.register_budget``; None where it has none)."""
    from mpcompile.codegen import tiles

    budget = getattr(tiles, "register_budget", None)
    return None if budget is None else budget(spec.tile, min(spec.vec_a, spec.vec_b) == 1)


def smem_bytes(spec: KernelSpec) -> int:
    """Shared memory the mma.sync kernel of ``spec`` takes (pipeline, epilogue staging)."""
    return getattr(spec, "smem_bytes", None) or spec.tile.smem_bytes


def kernel_call(spec: KernelSpec):
    """The module a lowered graph calls: ``KernelCall`` for a plain GEMM ``spec``."""
    from mpcompile.runtime.kernel import KernelCall

    return KernelCall(spec, has_bias=False, has_scale=False)


def kernel_call_backends(module: torch.nn.Module) -> list[str]:
    """What ran each ``KernelCall`` inside ``module`` (its ``backend`` string)."""
    from mpcompile.runtime.kernel import KernelCall

    return [str(m.backend) for m in module.modules() if isinstance(m, KernelCall)]


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


# =================================================================================================
# Checks: one implementation, in mpcompile/runtime/verify.py (the runtime's first-use verification
# runs the same). Here: the problem of a spec, and its launch through the runtime's launch path.
# =================================================================================================


class CheckError(AssertionError):
    """A kernel result failed a check (the message says which and by how much)."""


def gemm_spec(dtype, m, n, k, al="row", bl="row", ops=(), out=None, tile=None, batch=1,
              pad=0) -> KernelSpec:
    """A GEMM spec with leading dimensions ``pad`` elements wider than the minimum."""
    lda = (k if al == "row" else m) + pad
    ldb = (n if bl == "row" else k) + pad
    ldc = n + pad
    rows_a, rows_b = (m if al == "row" else k), (k if bl == "row" else n)
    vec_a = widest_vec(lda, k if al == "row" else m)
    vec_b = widest_vec(ldb, n if bl == "row" else k)
    return KernelSpec(Kind.GEMM, dtype, m, n, k,
                      tile=tile or choose_tile(m, n, min(vec_a, vec_b)),
                      epilogue=Epilogue(tuple(ops), out or dtype, dtype), a_layout=al,
                      b_layout=bl, lda=lda, ldb=ldb, ldc=ldc, batch=batch,
                      vec_a=vec_a, vec_b=vec_b,
                      batch_stride_a=rows_a * lda if batch > 1 else 0,
                      batch_stride_b=rows_b * ldb if batch > 1 else 0,
                      batch_stride_c=m * ldc if batch > 1 else 0)


def problem_of(spec: KernelSpec) -> verify.Problem:
    """What a kernel of ``spec`` computes: bias / scale as its epilogue reads them, the result in
    the epilogue's output dtype (split-K partials summed in FP32)."""
    ops = spec.epilogue.ops
    return verify.Problem(spec, "bias_n" in ops, "scale" in ops, spec.epilogue.out)


def launch_fn(spec: KernelSpec, launcher):
    """``launch(a, b, bias, scale, alloc)`` for ``verify.run_checks``: ``launcher(a, b, c, bias,
    scale)`` run through the runtime's launch path (realigned operands, ``c`` from ``alloc``,
    split-K partials summed, NCHW result)."""
    from mpcompile.runtime.kernel import contiguous_strides, launch_result
    from mpcompile.runtime.ops import Call, ConvArgs

    p = problem_of(spec)
    conv = None
    if spec.kind is not Kind.GEMM:
        cv, shapes = spec.conv, verify.conv_shapes(spec)
        conv = ConvArgs(cv.stride, cv.pad, cv.dil, shapes["x"], shapes["w"])
    call = Call(spec, p.has_bias, p.has_scale, conv, final=p.final)

    def launch(a, b, bias, scale, alloc):
        alloc = alloc or (lambda shape, dtype, dev: torch.empty(shape, dtype=dtype, device=dev))
        return launch_result(launcher, call, spec, a, b, bias, scale,
                             _strided_output(spec, alloc, contiguous_strides))
    return launch


def _strided_output(spec: KernelSpec, alloc, contiguous_strides):
    """``alloc`` for a GEMM whose output has a padded ``ldc`` / batch stride (the runtime's
    launch path allocates dense outputs): the padded span from ``alloc``, seen through the
    spec's strides (split-K partials one span apart)."""
    if spec.kind is not Kind.GEMM:
        return alloc
    per = (spec.batch - 1) * spec.batch_stride_c + spec.m * spec.ldc

    def strided(shape, dtype, device):
        inner = (spec.batch_stride_c, spec.ldc, 1)[-(len(shape) - (spec.split_k > 1)):]
        strides = ((per,) if spec.split_k > 1 else ()) + inner
        if strides == contiguous_strides(shape):
            return alloc(shape, dtype, device)
        flat = alloc((per * max(spec.split_k, 1),), dtype, device)
        return torch.as_strided(flat, tuple(shape), strides)
    return strided


def check_candidate(spec: KernelSpec, launcher, device, inputs) -> dict:
    """Every check of one kernel (``verify.run_checks``: canaries, unwritten elements, exact
    integers, the sqrt(K) bound) on ``inputs`` (``verify.make_inputs``): one row, ``ok`` true
    only if all passed."""
    report = verify.run_checks(problem_of(spec), launch_fn(spec, launcher), device,
                               inputs=inputs)
    return report.row()


def library_op(spec: KernelSpec, operands: tuple):
    """The same product through torch's CUDA libraries (cuBLAS / cuDNN, channels-last), on the
    operands of a check, for timing."""
    import torch.nn.functional as F

    a, b = operands[:2]
    if spec.kind is Kind.GEMM:
        a, b = a.contiguous(), b.contiguous()
        return lambda: torch.matmul(a, b)
    cv, shapes = spec.conv, verify.conv_shapes(spec)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    a, b = cl(a), cl(b)
    st, pd, dl = cv.stride, cv.pad, cv.dil
    if spec.kind is Kind.CONV_FPROP:
        return lambda: F.conv2d(a, b, None, st, pd, dl)
    empty = lambda shape: cl(torch.empty(shape, dtype=a.dtype, device=a.device))  # noqa: E731
    if spec.kind is Kind.CONV_DGRAD:  # (dy, w): x only lends its shape
        dy, x, w = a, empty(shapes["x"]), b
    else:  # wgrad (dy, x): w only lends its shape
        dy, x, w = a, b, empty(shapes["w"])
    mask = [spec.kind is Kind.CONV_DGRAD, spec.kind is Kind.CONV_WGRAD, False]
    return lambda: torch.ops.aten.convolution_backward(
        dy, x, w, None, st, pd, dl, False, [0, 0], 1, mask)

# =================================================================================================
# Timing
# =================================================================================================

WARM_MS = 100.0  # launches before timing, so clocks and caches settle
SAMPLE_MS = 20.0  # each sample times enough back-to-back launches to take about this long


def time_ms(fn, reps: int) -> float:
    """Median milliseconds per call of ``fn`` (CUDA events around back-to-back launches)."""
    fn()
    torch.cuda.synchronize()
    t0, calls = time.perf_counter(), 0
    while calls < 3 or (time.perf_counter() - t0) * 1e3 < WARM_MS:
        fn()
        calls += 1
        if calls % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) * 1e3 / calls, 1e-3)
    n = max(1, min(1000, math.ceil(SAMPLE_MS / est)))
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / n)
    return statistics.median(samples)


# =================================================================================================
# Cases
# =================================================================================================

# ResNet-50 (batch 32) convolutions: (name, H, W, C, K, R, S, stride)
RESNET50 = {
    "res2_3x3": (56, 56, 64, 64, 3, 3, 1),
    "res2_1x1": (56, 56, 64, 256, 1, 1, 1),
    "res3_3x3": (28, 28, 128, 128, 3, 3, 1),
    "res3_3x3s2": (56, 56, 128, 128, 3, 3, 2),
    "res4_3x3": (14, 14, 256, 256, 3, 3, 1),
    "res4_1x1": (14, 14, 1024, 256, 1, 1, 1),
    "res5_3x3": (7, 7, 512, 512, 3, 3, 1),
}
TARGETS = {("gemm_big", "sm80"): 0.6, ("gemm_big", "hopper"): 0.85, ("fprop", "sm80"): 0.5}
SHORT = {"float16": "f16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Case:
    """One check. ``runner``: "kernel" (every candidate of ``spec``), "kernel_call" (the
    end-to-end module, forward and backward), "convert" (a converted model trained one step).
    ``group`` names the target family (``TARGETS``); ``timed``: time candidates and library."""

    name: str
    spec: KernelSpec | None = None
    timed: bool = False
    runner: str = "kernel"
    group: str = ""
    dtype: str = "float16"
    timeout_s: float = 120.0

    @property
    def flops(self) -> float:
        s = self.spec
        return 2.0 * s.m * s.n * s.k * s.batch if s is not None else float("nan")

    @property
    def shape(self) -> str:
        s = self.spec
        if s is None:
            return "-"
        if s.kind is Kind.GEMM:
            lay = f" {s.a_layout[0]}{s.b_layout[0]}"
            return (f"{s.batch}x" if s.batch > 1 else "") + f"{s.m}x{s.n}x{s.k}{lay}"
        cv = s.conv
        return (f"{cv.n}x{cv.h}x{cv.w}x{cv.c}->{cv.k} {cv.r}x{cv.s}/{cv.stride[0]}"
                f" (K={s.k}{f', split {s.split_k}' if s.split_k > 1 else ''})")

    @property
    def kind(self) -> str:
        return self.spec.kind.value if self.runner == "kernel" else self.runner

    @property
    def ops(self) -> str:
        return "+".join(self.spec.epilogue.ops) if self.spec is not None else ""


def _conv(layer: str) -> Conv:
    h, w, c, k, r, s, st = RESNET50[layer]
    return Conv(32, h, w, c, k, r, s, (st, st), (r // 2, s // 2))


def catalog(quick: bool = False) -> list[Case]:
    """Every case, in run order: the headline GEMMs and ResNet-50 fprops first (what the
    targets measure), then the correctness sweep (ragged GEMMs, dgrad/wgrad incl. the long-K res2
    weight gradient), the 8192^3 GEMMs, and the end-to-end cases."""
    cases = []
    for d in ("float16", "bfloat16"):
        cases.append(Case(f"gemm_{SHORT[d]}_4096", gemm_spec(d, 4096, 4096, 4096), True,
                          group="gemm_big", dtype=d))
    fprops = ["res2_3x3", "res2_1x1", "res3_3x3", "res4_3x3", "res5_3x3", "res4_1x1"]
    for layer in fprops[:2] if quick else fprops:
        cases.append(Case(f"fprop_f16_{layer}", conv_spec(Kind.CONV_FPROP, "float16",
                                                          _conv(layer)), True, group="fprop"))
    ragged = [
        ("gemm_f16_ragged_rc_bias_relu", gemm_spec("float16", 1001, 1031, 523, "row", "col",
                                                   ("bias_n", "relu"))),
        ("gemm_bf16_ragged_cr_bias_gelu", gemm_spec("bfloat16", 777, 1030, 1028, "col", "row",
                                                    ("bias_n", "gelu"))),
        ("gemm_f16_ragged_cc_gelu_tanh", gemm_spec("float16", 513, 257, 1000, "col", "col",
                                                   ("bias_n", "gelu_tanh"))),
        ("gemm_bf16_ragged_cr_round_scale_f32", gemm_spec("bfloat16", 768, 3072, 4094, "col",
                                                          "row", ("round", "scale"), "float32")),
        ("gemm_f16_padded_rr_scale", gemm_spec("float16", 640, 384, 1000, pad=8,
                                               ops=("scale",))),
        ("bmm_f16_32x512x512x64", gemm_spec("float16", 512, 512, 64, batch=32)),
    ]
    for name, spec in ragged[:2] if quick else ragged:
        cases.append(Case(name, spec, dtype=spec.dtype))
    grads = [(Kind.CONV_WGRAD, "float16", "res2_3x3"), (Kind.CONV_DGRAD, "float16", "res2_3x3"),
             (Kind.CONV_DGRAD, "float16", "res3_3x3s2"), (Kind.CONV_WGRAD, "bfloat16",
                                                          "res4_3x3"),
             (Kind.CONV_DGRAD, "bfloat16", "res5_3x3"), (Kind.CONV_WGRAD, "float16", "res2_1x1")]
    for kind, d, layer in grads[:2] if quick else grads:
        cases.append(Case(f"{kind.value.removeprefix('conv_')}_{SHORT[d]}_{layer}",
                          conv_spec(kind, d, _conv(layer)), True, dtype=d))
    if not quick:
        cases.append(Case("fprop_bf16_res2_3x3", conv_spec(Kind.CONV_FPROP, "bfloat16",
                                                           _conv("res2_3x3")), True,
                          group="fprop", dtype="bfloat16"))
        cases.append(Case("fprop_f16_res3_3x3s2_bias_relu", conv_spec(
            Kind.CONV_FPROP, "float16", _conv("res3_3x3s2"), ("bias_n", "relu"))))
        for d in ("float16", "bfloat16"):
            cases.append(Case(f"gemm_{SHORT[d]}_8192", gemm_spec(d, 8192, 8192, 8192), True,
                              group="gemm_big", dtype=d, timeout_s=180.0))
    cases.append(Case("kernelcall_f16_4096_fwd_bwd", gemm_spec("float16", 4096, 4096, 4096),
                      True, runner="kernel_call"))
    cases.append(Case("convert_f16_cnn_train", None, True, runner="convert"))
    return cases


def select(cases: list[Case], patterns: str | None) -> list[Case]:
    """The cases whose name matches any comma-separated fnmatch pattern (all if none given)."""
    if not patterns:
        return cases
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in pats)]


# =================================================================================================
# Case runners (child process)
# =================================================================================================


def cubin_report(cand: Candidate, arch: str) -> dict:
    """Compile ``cand`` for ``arch`` and read ptxas and the SASS: registers, spills, stack, and
    the tensor-core instructions. Problems (the row fails): spills or a stack frame, more shared
    memory than the arch has (mma.sync), and no tensor-core instruction with FP32 accumulation
    (mma.sync: only ``HMMA.16816.F32``; Hopper: ``HGMMA.*.F32``). A warning (reported, the row
    passes): registers above ``register_budget`` (slower, not wrong: the element-wise copies of
    odd leading dimensions need many)."""
    t0 = time.perf_counter()
    c = compile_candidate(cand, arch)
    row = judge_cubin(c, cand, arch)
    row["compile_s"] = round(time.perf_counter() - t0, 3)
    return row


def judge_cubin(c, cand: Candidate, arch: str) -> dict:
    """``cubin_report``'s reading of a compiled cubin ``c`` of ``cand``."""
    info, problems = c.info, []
    row = {"arch": arch, "registers": info.registers, "spills": info.spill_stores
           + info.spill_loads, "stack": info.stack_frame}
    if info.spill_stores or info.spill_loads or info.stack_frame:
        problems.append(f"spills/stack: {info}")
    if cand.path == "sm80":
        budget = register_budget(cand.spec)
        if budget is not None and not 0 < info.registers <= budget:
            row["warnings"] = [f"{info.registers} registers > budget {budget}"]
        limit, need = SMEM_LIMIT.get(arch, SMEM_LIMIT["sm_80"]), smem_bytes(cand.spec)
        if need > limit:
            problems.append(f"{need} B of shared memory > {limit}")
    if sass.available():
        mma = sorted(set(sass.mma_instructions(sass.disassemble(c.cubin))))
        row["mma"] = ", ".join(mma) or "none"
        if cand.path == "sm80":
            good = bool(mma) and all(i.startswith("HMMA.16816.F32") for i in mma)
        else:
            good = any(i.startswith("HGMMA") and ".F32" in i for i in mma)
        if not good:
            problems.append(f"tensor-core instructions {mma or 'none'}")
    else:
        row["mma"] = "cuobjdump missing"
    row["problems"] = problems
    return row


def compile_case(case: Case, archs: tuple[str, ...], emit) -> dict:
    """--compile-only: every candidate of the case for each of its archs."""
    result = {"candidates": [], "notes": []}
    if case.runner == "convert":
        result["notes"].append("nothing to compile ahead: the model's kernels are compiled on "
                               "first use on the GPU")
        result["ok"] = True
        return result
    if case.runner == "kernel_call":  # the spec KernelCall starts from (it may autotune)
        cands = [Candidate("sm80 (KernelCall spec)", case.spec)]
    else:
        cands, notes = candidates(case.spec, HOPPER_ARCH in archs)
        result["notes"] += notes
    for cand in cands:
        for arch in candidate_archs(cand, archs):
            try:
                row = cubin_report(cand, arch)
            except Exception as e:  # noqa: BLE001 - a compile error is this row's failure
                row = {"arch": arch, "problems": [f"{type(e).__name__}: "
                                                  f"{str(e).splitlines()[0][:300]}"]}
            row.update(candidate=cand.label, kernel=cand.spec.name, ok=not row["problems"])
            result["candidates"].append(row)
            emit(result)
    result["ok"] = bool(result["candidates"]) and all(r["ok"] for r in result["candidates"])
    return result


def load_candidate(cand: Candidate, device: torch.device, arch: str) -> tuple[object, dict]:
    """Compile ``cand`` for the device (sm_90a for the Hopper kernel) and load it: (launcher,
    facts for the row: arch, registers, spills, compile seconds)."""
    arch_c = HOPPER_ARCH if cand.path == "hopper" else arch
    t0 = time.perf_counter()
    compiled = compile_candidate(cand, arch_c)
    launcher = launch_candidate(cand, compiled, device)
    return launcher, {"arch": arch_c, "registers": compiled.info.registers,
                      "spills": compiled.info.spill_stores + compiled.info.spill_loads,
                      "compile_s": round(time.perf_counter() - t0, 3)}


def kernel_case(case: Case, device: torch.device, reps: int, emit, load=load_candidate) -> dict:
    """Check every candidate (exact integers, random, canaries); on CUDA time those that pass
    and the library. The case passes only if every candidate passes. ``load(cand, device,
    arch)`` gives (launcher, row facts); the tests pass one running the NumPy model on CPU."""
    arch = device_arch(device) if device.type == "cuda" else device.type
    cands, notes = candidates(case.spec, arch == "sm_90")
    result = {"candidates": [], "notes": notes, "arch": arch}
    inputs = verify.make_inputs(problem_of(case.spec), device, seed=1)
    if inputs[0].kind != "int":
        notes.append(f"no exact-integer check: K = {case.spec.k} overflows "
                     f"{case.spec.epilogue.out}")
    timed = case.timed and device.type == "cuda"
    lib_ms = None
    if timed:
        lib_ms = time_ms(library_op(case.spec, inputs[-1].operands), reps)
        result["library"] = {"ms": lib_ms, "tflops": case.flops / lib_ms / 1e9}
    for cand in cands:
        row = {"candidate": cand.label, "kernel": cand.spec.name, "ok": False}
        result["candidates"].append(row)
        try:
            launcher, facts = load(cand, device, arch)
            row.update(facts)
            emit(result)  # a crash in the launch below still shows which candidate it was
            row.update(check_candidate(cand.spec, launcher, device, inputs))
            if timed and row["ok"]:
                ms = time_launches(cand.spec, launcher, inputs[-1], reps)
                row.update(ms=ms, tflops=case.flops / ms / 1e9, ratio=lib_ms / ms)
                target = TARGETS.get((case.group, cand.path))
                if target is not None:
                    row.update(target=target, meets_target=row["ratio"] >= target)
        except Exception as e:  # noqa: BLE001 - this candidate failed; the case fails
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if _sticky(e):
                emit(result)
                raise  # the context is gone: the parent reports the rest of the case lost
        emit(result)
    result["ok"] = bool(cands) and all(r["ok"] for r in result["candidates"])
    if not cands:
        result["notes"].append("no candidate builds this problem")
    return result


def time_launches(spec: KernelSpec, launcher, inputs: verify.Inputs, reps: int) -> float:
    """Milliseconds per launch of ``launcher`` on ``inputs``: the arguments the launch path
    prepares once (realigned operands, output buffer) are recorded, then the kernel alone is
    timed on them."""
    seen = []

    def record(*args):
        seen.append(args)
        launcher(*args)

    launch_fn(spec, record)(*inputs.operands, alloc=None)
    args = seen[0]
    return time_ms(lambda: launcher(*args), reps)


def _sticky(e: Exception) -> bool:
    """Is ``e`` a CUDA fault that poisons the context (nothing later in the process can run)?"""
    text = str(e).lower()
    return any(w in text for w in ("illegal", "misaligned", "launch failed", "launch_failed",
                                   "device-side", "unspecified launch", "uncorrectable", "ecc",
                                   "hardware_stack", "exception_", "not_permitted"))


def check_spec(spec: KernelSpec, device, loader) -> dict:
    """Every check of the kernel ``loader(spec, None, device)`` launches (e.g. the NumPy model's
    ``ModelLauncher`` on CPU): exact integers, random inputs, canaries."""
    inputs = verify.make_inputs(problem_of(spec), device, seed=1)
    return check_candidate(spec, loader(spec, None, device), device, inputs)


def kernel_call_case(case: Case, device: torch.device, reps: int, emit) -> dict:
    """``KernelCall`` on a GEMM with autograd: forward and backward against float64 within the
    sqrt(K) bound, then (CUDA) forward and forward+backward timed against ``torch.matmul``."""
    spec = case.spec
    dt = from_name(spec.dtype)
    gen = torch.Generator(device=device).manual_seed(3)
    a = torch.randn(spec.m, spec.k, generator=gen, device=device).to(dt).requires_grad_()
    b = torch.randn(spec.k, spec.n, generator=gen, device=device).to(dt).requires_grad_()
    g = torch.randn(spec.m, spec.n, generator=gen, device=device).to(dt)
    call = kernel_call(spec).to(device)
    out = call(a, b)
    out.backward(g)
    u = unit_roundoff(spec.dtype)
    a64, b64, g64 = a.detach().double(), b.detach().double(), g.double()
    checks = {"out": (out.detach(), a64 @ b64, a64.abs() @ b64.abs(), spec.k),
              "grad_a": (a.grad, g64 @ b64.T, g64.abs() @ b64.abs().T, spec.n),
              "grad_b": (b.grad, a64.T @ g64, a64.abs().T @ g64.abs(), spec.m)}
    row = {"candidate": "KernelCall", "backend": getattr(call, "backend", "?")}
    for key, (got, ref, absprod, k) in checks.items():
        if got is None:
            raise CheckError(f"KernelCall gave no {key} (no autograd through the kernel?)")
        tol = verify.tolerance(ref, verify.accumulation_bound(absprod, k), u, spec.dtype)
        row[f"err_bound_{key}"] = verify.bound_ratio(got, ref, tol)
    row["err_bound"] = max(row[f"err_bound_{k}"] for k in checks)
    row["ok"] = row["err_bound"] <= 1.0

    def fwd(f):
        return lambda: f(a, b)

    def fwd_bwd(f):
        def step():
            a.grad = b.grad = None
            f(a, b).backward(g)
        return step

    result = {"candidates": [row], "notes": [f"backend after the first call: {row['backend']}"],
              "library": {}}
    if device.type == "cuda":
        row["ms"] = time_ms(fwd(call), reps)
        row["fwd_bwd_ms"] = time_ms(fwd_bwd(call), reps)
        lib_ms, lib_fb = time_ms(fwd(torch.matmul), reps), time_ms(fwd_bwd(torch.matmul), reps)
        row.update(tflops=case.flops / row["ms"] / 1e9, ratio=lib_ms / row["ms"],
                   fwd_bwd_ratio=lib_fb / row["fwd_bwd_ms"])
        result["library"] = {"ms": lib_ms, "fwd_bwd_ms": lib_fb,
                             "tflops": case.flops / lib_ms / 1e9}
    emit(result)
    result["ok"] = row["ok"]
    return result


class SmallCNN(torch.nn.Module):
    """A ResNet-like stem and block: 3x3 convs with batch norm, a 1x1 conv, a classifier."""

    def __init__(self, c: int = 64, classes: int = 100):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        return self.fc(self.body(x))


CONVERT_UNITS = 64  # gradients of two FP16 programs that differ only in their GEMM rounding


def convert_case(case: Case, device: torch.device, reps: int, emit,
                 kernels: str = "auto", shape=(32, 3, 32, 32)) -> dict:
    """``mpcompile.convert`` of ``SmallCNN`` on ``device`` with ``kernels`` (default "auto")
    against ``kernels="off"``: one forward + backward each from the same weights; every parameter
    gradient within ``CONVERT_UNITS`` u of the largest gradient of that parameter; on CUDA no
    ``KernelCall`` may fall back to the torch reference. Both steps are timed on CUDA."""
    import mpcompile

    dt = from_name(case.dtype)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=gen).to(device)
    y = torch.randint(0, 100, (shape[0],), generator=gen).to(device)
    runs = {}
    for mode in ("off", kernels):
        torch.manual_seed(0)
        model = SmallCNN().to(device).train()
        mp = mpcompile.convert(model, (x,), dtype=dt, policy=mpcompile.Policy(dtype=dt,
                                                                              kernels=mode),
                               backend="eager")

        def step(mp=mp, model=model):
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(mp(x).float(), y).backward()

        step()
        runs[mode] = {"grads": [p.grad.detach().clone() for p in model.parameters()],
                      "backends": kernel_call_backends(mp.executable), "step": step}
    u = unit_roundoff(case.dtype)
    worst = 0.0
    for got, want in zip(runs[kernels]["grads"], runs["off"]["grads"]):
        scale = float(want.abs().max()) or 1.0
        worst = max(worst, float((got - want).abs().max()) / (u * scale))
    backends = runs[kernels]["backends"]
    fallbacks = [b for b in backends if b.startswith("reference")]
    row = {"candidate": f"convert kernels={kernels}", "grad_err_u": worst,
           "kernel_calls": len(backends), "backends": sorted(set(backends)),
           "ok": worst <= CONVERT_UNITS and bool(backends)
           and not (device.type == "cuda" and fallbacks)}
    notes = [f"{len(backends)} KernelCalls: " + "; ".join(sorted(set(backends)))[:400]]
    if device.type == "cuda":
        row["ms"] = time_ms(runs[kernels]["step"], reps)
        lib = time_ms(runs["off"]["step"], reps)
        row["ratio"] = lib / row["ms"]
        result_lib = {"ms": lib}
    else:
        result_lib = {}
    result = {"candidates": [row], "notes": notes, "library": result_lib, "ok": row["ok"]}
    emit(result)
    return result


def child(args) -> int:
    """Run one case and write its JSON (after every candidate, and at the end)."""
    cases = {c.name: c for c in catalog(quick=False)}
    case = cases[args.case]
    path = Path(args.json_out)
    head = {"name": case.name, "kind": case.kind, "shape": case.shape, "dtype": case.dtype,
            "ops": case.ops, "runner": case.runner}

    def emit(result: dict, done: bool = False) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**head, **result, "done": done}, default=str))
        os.replace(tmp, path)

    t0 = time.perf_counter()
    try:
        if args.compile_only:
            result = compile_case(case, tuple(args.arch or ARCHS), emit)
        else:
            device = torch.device("cuda")
            torch.backends.cudnn.benchmark = True
            runner = {"kernel": kernel_case, "kernel_call": kernel_call_case,
                      "convert": convert_case}[case.runner]
            result = runner(case, device, args.reps, emit)
    except Exception as e:  # noqa: BLE001 - reported in the JSON, the parent goes on
        prior = json.loads(path.read_text()) if path.exists() else {}
        prior.update(head, ok=False, error=f"{type(e).__name__}: {str(e)[:1000]}",
                     traceback=traceback.format_exc()[-3000:], done=True,
                     elapsed_s=time.perf_counter() - t0)
        path.write_text(json.dumps(prior, default=str))
        traceback.print_exc()
        return 1
    result["elapsed_s"] = time.perf_counter() - t0
    emit(result, done=True)
    return 0 if result["ok"] else 1


# =================================================================================================
# Parent: run the cases in subprocesses, collect, write the table and the JSON
# =================================================================================================


def child_command(case: Case, args, json_out: str) -> list[str]:
    """The command line that runs ``case`` alone (this script, ``--case``)."""
    cmd = [sys.executable, str(SCRIPT), "--case", case.name, "--json-out", json_out,
           "--reps", str(args.reps)]
    if args.compile_only:
        cmd.append("--compile-only")
        for a in args.arch or ():
            cmd += ["--arch", a]
    return cmd


def run_child(cmd: list[str], json_out: Path, timeout_s: float, log_path: Path) -> dict:
    """Run ``cmd`` (one case) with a timeout, output to ``log_path``; its JSON (possibly partial:
    the candidates it finished) with ``status`` ok / FAIL / error / crash / timeout."""
    t0 = time.perf_counter()
    rc, timed_out = None, False
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:  # subprocess.run has killed the child
            timed_out = True
    result = {}
    if json_out.exists():
        try:
            result = json.loads(json_out.read_text())
        except ValueError:
            result = {}
        json_out.unlink()
    result.update(elapsed_s=round(time.perf_counter() - t0, 2), log=str(log_path))
    if timed_out:
        result.update(status="timeout", ok=False,
                      error=f"no result within the case timeout of {timeout_s:.0f} s")
    elif not result.get("done"):
        result.update(status="crash", ok=False, error=f"the case's process exited with {rc} "
                      "before writing its result: " + _log_tail(log_path))
    elif result.get("error"):
        result.update(status="error", ok=False)
    else:
        result["status"] = "ok" if result.get("ok") else "FAIL"
    return result


def run_case_subprocess(case: Case, args, timeout_s: float, out_dir: Path) -> dict:
    """Run one case in a child process: its result, or what is known if it crashed."""
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{case.name}.", suffix=".json", dir=logs)
    os.close(fd)
    os.unlink(tmp)
    result = run_child(child_command(case, args, tmp), Path(tmp), timeout_s,
                       logs / f"{case.name}.log")
    result.update(name=case.name, kind=case.kind, shape=case.shape, dtype=case.dtype,
                  ops=case.ops)
    return result


def reason(c: dict) -> str:
    """Why a case did not pass, in one line."""
    if c.get("error"):
        return str(c["error"])
    for r in c.get("candidates") or []:
        if not r.get("ok"):
            return f"{r.get('candidate')}: {_row_problem(r)}"
    return "; ".join(c.get("notes", [])) or c.get("status", "")


def _row_problem(r: dict) -> str:
    """What is wrong with one candidate row."""
    parts = list(r.get("problems", []))
    if r.get("error"):
        parts.append(r["error"])
    if parts:
        return "; ".join(parts)
    for key, what in (("canary_damage", "canary elements overwritten"),
                      ("unwritten", "output elements unwritten"),
                      ("int_mismatches", "exact-integer mismatches")):
        if r.get(key):
            parts.append(f"{r[key]} {what}")
    if r.get("err_bound", 0) > 1:
        parts.append(f"error {r['err_bound']:.3g}x the sqrt(K) bound")
    if r.get("grad_err_u", 0) > CONVERT_UNITS:
        parts.append(f"gradients differ by {r['grad_err_u']:.1f} u")
    return "; ".join(parts) or "failed"


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-500:]


def _fmt(v, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else ("-" if math.isnan(v) else format(v, spec))
    return str(v)


def markdown(meta: dict, cases: list[dict]) -> str:
    """The results as a Markdown table: one row per candidate (and per arch with
    --compile-only), one row for a case that crashed, timed out or was skipped."""
    compile_only = meta["mode"] == "compile-only"
    lines = [f"### gpu_check ({meta['mode']}): {meta['device']}, torch {meta['torch']}, "
             f"{meta['date']}", ""]
    if compile_only:
        cols = ["case", "kind", "shape", "dtype", "candidate", "arch", "registers", "spills",
                "tensor-core SASS", "verdict"]
    else:
        cols = ["case", "kind", "shape", "dtype", "candidate", "err/bound", "err (u)",
                "exact int", "canary", "ms", "TFLOP/s", "lib TFLOP/s", "ratio", "target",
                "verdict"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in cases:
        lead = [c["name"], c.get("kind", "-"), c.get("shape", "-"), c.get("dtype", "-")]
        rows = c.get("candidates") or []
        if not rows or c.get("status") in ("crash", "timeout", "skipped", "error"):
            rest = ["-"] * (len(cols) - len(lead) - 1)
            rest[0] = f"{len(rows)} candidate(s) reported" if rows else "-"
            status = c.get("status", "?")
            verdict = "pass" if status == "ok" else f"**{status}**"
            lines.append("| " + " | ".join(lead + rest + [
                f"{verdict}: {reason(c)[:200]}".replace("|", "/")]) + " |")
            if not rows:
                continue
        lib = (c.get("library") or {}).get("tflops")
        for r in rows:
            verdict = ("compiled" if compile_only else "pass") if r.get("ok") else \
                "**FAIL** " + _row_problem(r)[:200]
            if r.get("warnings"):
                verdict += " (warning: " + "; ".join(r["warnings"]) + ")"
            if compile_only:
                cells = [r.get("candidate"), r.get("arch"), r.get("registers"), r.get("spills"),
                         r.get("mma"), verdict]
            else:
                exact = None if r.get("int_mismatches") is None else r["int_mismatches"] == 0
                canary = None if "canary_damage" not in r else (
                    r["canary_damage"] == 0 and r.get("unwritten", 0) == 0)
                target = "-" if "target" not in r else \
                    f"{r['target']}x {'met' if r['meets_target'] else 'MISSED'}"
                cells = [r.get("candidate"), _fmt(r.get("err_bound"), ".3f"),
                         _fmt(r.get("err_u", r.get("grad_err_u")), ".2f"), _fmt(exact),
                         _fmt(canary),
                         _fmt(r.get("ms"), ".3f"), _fmt(r.get("tflops"), ".1f"), _fmt(lib, ".1f"),
                         _fmt(r.get("ratio"), ".2f"), target, verdict]
            lines.append("| " + " | ".join(str(x).replace("|", "/") for x in lead + cells)
                         + " |")
    s = meta["summary"]
    lines += ["", f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped of "
              f"{s['cases']} cases in {meta['elapsed_s']:.0f} s (budget {meta['budget_s']:.0f} s)"]
    notes = [f"- {c['name']}: {n}" for c in cases for n in c.get("notes", [])]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def summarize(cases: list[dict], total: int) -> dict:
    return {"cases": total, "passed": sum(c.get("status") == "ok" for c in cases),
            "failed": sum(c.get("status") not in ("ok", "skipped") for c in cases),
            "skipped": sum(c.get("status") == "skipped" for c in cases)}


def write_outputs(out_dir: Path, meta: dict, results: list[dict], total: int) -> None:
    meta["summary"] = summarize(results, total)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps({"meta": meta, "cases": results},
                                                     indent=1, default=str)),
                       ("gpu_check.md", markdown(meta, results))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


def parent(args) -> int:
    cases = select(catalog(args.quick), args.cases)
    if args.list:
        for c in cases:
            print(f"{c.name:<40} {c.kind:<12} {c.dtype:<9} {c.shape}")
        return 0
    if not cases:
        print(f"no case matches {args.cases!r} (see --list)")
        return 2
    if args.compile_only:
        device = "no GPU needed (NVRTC " + ", ".join(args.arch or ARCHS) + ")"
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --compile-only, or on a GPU machine")
        return 2
    else:
        device = f"{torch.cuda.get_device_name(0)} ({device_arch(torch.device('cuda'))})"
    out_dir = Path(args.out)
    meta = {"mode": "compile-only" if args.compile_only else "gpu", "device": device,
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "argv": sys.argv[1:], "budget_s": args.budget, "elapsed_s": 0.0,
            "c_sqrt_k": verify.C_SQRT_K, "python": sys.version.split()[0],
            "cuda": torch.version.cuda}
    start = time.perf_counter()
    results: list[dict] = []
    for case in cases:
        left = args.budget - (time.perf_counter() - start)
        if left < args.min_case_s:
            results.append({"name": case.name, "kind": case.kind, "shape": case.shape,
                            "dtype": case.dtype, "ops": case.ops, "status": "skipped",
                            "ok": False, "error": f"time budget: {left:.0f} s left of "
                            f"{args.budget:.0f} s"})
        else:
            timeout = min(args.case_timeout or case.timeout_s, left)
            r = run_case_subprocess(case, args, timeout, out_dir)
            results.append(r)
            print(f"{r['status']:<8} {case.name:<40} {r['elapsed_s']:6.1f} s"
                  + (f"  {reason(r)[:120]}" if r["status"] != "ok" else ""), flush=True)
        meta["elapsed_s"] = time.perf_counter() - start
        write_outputs(out_dir, meta, results, len(cases))
    print()
    table = (out_dir / "gpu_check.md").read_text()
    print(table)
    if args.md:
        args.md.write_text(table)
    s = meta["summary"]
    failed_targets = [c["name"] for c in results for r in c.get("candidates") or []
                      if r.get("meets_target") is False]
    if s["failed"]:
        return 1
    if args.strict_targets and failed_targets:
        print("targets missed:", ", ".join(sorted(set(failed_targets))))
        return 1
    return 3 if s["skipped"] else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile-only", action="store_true",
                   help="compile every candidate with NVRTC and read ptxas/SASS (no GPU)")
    p.add_argument("--cases", help="comma-separated fnmatch patterns of case names")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--quick", action="store_true", help="a shorter catalog")
    p.add_argument("--reps", type=int, default=5, help="timing samples per op (median)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run")
    p.add_argument("--min-case-s", type=float, default=30.0,
                   help="skip a case when less than this is left of the budget")
    p.add_argument("--case-timeout", type=float, default=0.0,
                   help="seconds per case (default: each case's own, at most what is left)")
    p.add_argument("--out", default="gpu_check_out", help="folder for the .md, .json and logs")
    p.add_argument("--md", type=Path, help="also copy the Markdown table to this file")
    p.add_argument("--arch", action="append", choices=ARCHS,
                   help="with --compile-only: compile for this arch (repeatable; default all)")
    p.add_argument("--strict-targets", action="store_true",
                   help="also fail when a speed target is missed")
    p.add_argument("--case", help=argparse.SUPPRESS)  # child: run this one case
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        return child(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
