"""Check and time every generated-kernel variant on a GPU, in one command (< 8 min on an H200).

    python scripts/gpu_check.py                 # compile, check, time; print a table
    python scripts/gpu_check.py --md out.md     # also write the table as markdown
    python scripts/gpu_check.py --compile-only  # no GPU needed: NVRTC -> cubin for sm_80, sm_90
                                                # (no spills, registers in budget, HMMA.F32)

For each variant: compile for the device's arch; random FP16/BF16 inputs; the output buffer is
poisoned with NaN first (an element the kernel fails to write stays NaN); the result must satisfy,
elementwise, |out - ref| <= u_out*|ref| + K*2^-24*(|A||B|) + tiny, the standard bound for
low-precision products accumulated in FP32 (ref and |A||B| in float64). Then kernel and library
(torch.matmul -> cuBLAS, conv -> cuDNN, channels-last) are timed with CUDA events (median of
``--reps``), reported as TFLOP/s and kernel/library ratio; the best of the preset tiles is kept
for the headline GEMMs (autotuning).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpcompile.codegen.epilogue import OPS, Operands  # noqa: E402
from mpcompile.codegen.render import render_source  # noqa: E402
from mpcompile.codegen.spec import (  # noqa: E402
    SMEM_LIMIT,
    Conv,
    Epilogue,
    KernelSpec,
    Kind,
    SpecError,
    Tile,
    widest_vec,
)
from mpcompile.codegen.tiles import TILES, choose_tile, conv_spec  # noqa: E402
from mpcompile.dtypes import FLOAT32, from_name, unit_roundoff  # noqa: E402
from mpcompile.runtime import sass  # noqa: E402
from mpcompile.runtime.launch import Loaded, device_arch  # noqa: E402
from mpcompile.runtime.nvrtc import compile_cubin  # noqa: E402

ARCHS = ("sm_80", "sm_90")

# ResNet-50 convolutions (batch 32): (H, W, C, K, R, S, stride)
RESNET50 = [
    ("res2 3x3", 56, 56, 64, 64, 3, 3, 1),
    ("res2 1x1", 56, 56, 64, 256, 1, 1, 1),
    ("res3 3x3/2", 56, 56, 128, 128, 3, 3, 2),
    ("res4 3x3", 14, 14, 256, 256, 3, 3, 1),
    ("res5 3x3", 7, 7, 512, 512, 3, 3, 1),
]


@dataclass
class Case:
    name: str
    spec: KernelSpec
    timed: bool = False
    tune: bool = False

    @property
    def flops(self) -> float:
        return 2.0 * self.spec.m * self.spec.n * self.spec.k * self.spec.batch


def gemm_spec(dtype, m, n, k, al="row", bl="row", ops=(), out=None, tile=None, batch=1):
    lda, ldb = (k if al == "row" else m), (n if bl == "row" else k)
    return KernelSpec(Kind.GEMM, dtype, m, n, k, tile=tile or choose_tile(m, n),
                      epilogue=Epilogue(tuple(ops), out or dtype, dtype), a_layout=al,
                      b_layout=bl, lda=lda, ldb=ldb, ldc=n, batch=batch,
                      vec_a=widest_vec(lda), vec_b=widest_vec(ldb),
                      batch_stride_a=m * k if batch > 1 else 0,
                      batch_stride_b=k * n if batch > 1 else 0,
                      batch_stride_c=m * n if batch > 1 else 0)


def catalog(quick: bool) -> list[Case]:
    cases = []
    big = [4096] if quick else [4096, 8192]
    for dtype in ("float16", "bfloat16"):
        for s in big:
            cases.append(Case(f"gemm {s}^3 NN", gemm_spec(dtype, s, s, s), True, True))
        for al in ("row", "col"):
            for bl in ("row", "col"):
                cases.append(Case(f"gemm 2048^3 {al[0].upper()}{bl[0].upper()}",
                                  gemm_spec(dtype, 2048, 2048, 2048, al, bl), True))
        for ops in (("bias_n", "relu"), ("gelu",), ("bias_n", "gelu_tanh")):
            cases.append(Case(f"gemm ragged {'+'.join(ops)}",
                              gemm_spec(dtype, 1000, 1030, 520, "row", "col", ops)))
        cases.append(Case("gemm wgrad-like round+scale -> f32",
                          gemm_spec(dtype, 768, 3072, 4096, "col", "row", ("round", "scale"),
                                    FLOAT32.name), True))
        cases.append(Case("bmm 32x512x512x64", gemm_spec(dtype, 512, 512, 64, batch=32), True))
    layers = RESNET50[:2] if quick else RESNET50
    for dtype in ("float16",) if quick else ("float16", "bfloat16"):
        for name, h, w, c, k, r, s, st in layers:
            pad = r // 2
            cv = Conv(32, h, w, c, k, r, s, (st, st), (pad, pad))
            for kind in (Kind.CONV_FPROP, Kind.CONV_DGRAD, Kind.CONV_WGRAD):
                cases.append(Case(f"{kind.value} {name}", conv_spec(kind, dtype, cv), True))
    return cases


# --- GPU ---------------------------------------------------------------------------------------


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _inputs(spec: KernelSpec, dev):
    dt = from_name(spec.dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=dev).to(dt)  # noqa: E731
    if spec.kind is Kind.GEMM:
        a = rnd(spec.batch, spec.m, spec.k) if spec.batch > 1 else rnd(spec.m, spec.k)
        b = rnd(spec.batch, spec.k, spec.n) if spec.batch > 1 else rnd(spec.k, spec.n)
        # storage in the kernel's layouts; the logical [m,k] / [k,n] views for the library
        a_st = a if spec.a_layout == "row" else a.transpose(-1, -2).contiguous()
        b_st = b if spec.b_layout == "row" else b.transpose(-1, -2).contiguous()
        return a, b, a_st, b_st
    cv = spec.conv
    x, w, dy = rnd(cv.n, cv.c, cv.h, cv.w), rnd(cv.k, cv.c, cv.r, cv.s), rnd(cv.n, cv.k, cv.p, cv.q)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    return cl(x), cl(w), cl(dy), None


def _reference(spec: KernelSpec, ins, bias, scale):
    """(reference, |.|-bound term, library callable) in float64 / the operand dtype."""
    F = torch.nn.functional
    if spec.kind is Kind.GEMM:
        a, b = ins[0], ins[1]
        ref = torch.matmul(a.double(), b.double())
        bound = torch.matmul(a.double().abs(), b.double().abs())
        return ref, bound, lambda: torch.matmul(a, b)
    cv = spec.conv
    x, w, dy = ins[0], ins[1], ins[2]
    st, pd, dl = cv.stride, cv.pad, cv.dil
    if spec.kind is Kind.CONV_FPROP:
        f = lambda a, b: F.conv2d(a, b, None, st, pd, dl)  # noqa: E731
        return f(x.double(), w.double()), f(x.double().abs(), w.double().abs()), lambda: f(x, w)
    if spec.kind is Kind.CONV_DGRAD:
        f = lambda a, b: torch.nn.grad.conv2d_input(list(x.shape), a, b, st, pd, dl)  # noqa
        return (f(w.double(), dy.double()), f(w.double().abs(), dy.double().abs()),
                lambda: torch.ops.aten.convolution_backward(
                    dy, x, w, None, st, pd, dl, False, [0, 0], 1, [True, False, False]))
    f = lambda a, b: torch.nn.grad.conv2d_weight(a, list(w.shape), b, st, pd, dl)  # noqa
    return (f(x.double(), dy.double()), f(x.double().abs(), dy.double().abs()),
            lambda: torch.ops.aten.convolution_backward(
                dy, x, w, None, st, pd, dl, False, [0, 0], 1, [False, True, False]))


def _run_kernel(spec: KernelSpec, loaded, ins, bias, scale):
    """(launch callable, output in the reference's logical layout)."""
    dev = ins[0].device
    out_dt = from_name(spec.epilogue.out)
    nhwc = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731 (channels-last storage: a view)
    if spec.kind is Kind.GEMM:
        shape = (spec.batch, spec.m, spec.n) if spec.batch > 1 else (spec.m, spec.n)
        c = torch.full(shape, float("nan"), dtype=out_dt, device=dev)
        return (lambda: loaded(ins[2], ins[3], c, bias, scale)), lambda: c
    cv = spec.conv
    x, w, dy = ins[0], ins[1], ins[2]
    a, b, shape = {Kind.CONV_FPROP: (x, w, (cv.n, cv.p, cv.q, cv.k)),
                   Kind.CONV_DGRAD: (dy, w, (cv.n, cv.h, cv.w, cv.c)),
                   Kind.CONV_WGRAD: (dy, x, (cv.k, cv.r, cv.s, cv.c))}[spec.kind]
    a, b = nhwc(a).contiguous(), nhwc(b).contiguous()
    splits = (spec.split_k,) if spec.split_k > 1 else ()
    c = torch.full(splits + shape, float("nan"), dtype=out_dt, device=dev)

    def result():
        return (c.sum(0) if splits else c).permute(0, 3, 1, 2)

    return (lambda: loaded(a, b, c, None, scale)), result


def check_case(case: Case, dev, arch: str, reps: int, loader=None) -> dict:
    """Check (and time) one case. ``loader(spec, compiled, device)`` builds the launcher: the
    CUDA one by default; the tests pass the NumPy model's, to exercise this plumbing on CPU."""
    loader = loader or Loaded
    spec = case.spec
    ins = _inputs(spec, dev)
    bias = (torch.randn(spec.n, device=dev).to(from_name(spec.dtype))
            if "bias_n" in spec.epilogue.ops else None)
    scale = torch.tensor(0.5, device=dev) if "scale" in spec.epilogue.ops else None
    ref, bound, library = _reference(spec, ins, bias, scale)
    o = Operands(spec.dtype, bias, scale)  # GEMM bias: along the last dimension
    for op in spec.epilogue.ops:  # the exact value and its |.|-bound through the epilogue
        ref, bound = OPS[op].oracle(ref, bound, o)
    rounds = any(OPS[op].rounds for op in spec.epilogue.ops)
    candidates = [spec]
    if case.tune:
        for tile in TILES.values():
            try:
                candidates.append(dataclasses.replace(spec, tile=tile))
            except SpecError:
                pass
    best = None
    for cand in dict((c.name, c) for c in candidates).values():
        t0 = time.perf_counter()
        compiled = compile_cubin(render_source(cand), cand.name, arch) if arch else None
        loaded = loader(cand, compiled, dev)
        compile_s = time.perf_counter() - t0
        launch, result = _run_kernel(cand, loaded, ins, bias, scale)
        launch()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out = result().double()
        unwritten = int(torch.isnan(out).sum())
        u_out = unit_roundoff(cand.dtype if rounds else cand.epilogue.out)
        # rounding the FP32 result (<= u_out |acc|) of an FP32 sum (<= K 2^-24 |A||B|)
        tol = u_out * ref.abs() + (1 + u_out) * cand.k * FLOAT32.unit_roundoff * bound + 1e-30
        excess = ((out - ref).abs() / tol).nan_to_num(float("inf")).max().item()
        ms = _time(launch, reps) if case.timed else float("nan")
        row = {"case": case.name, "dtype": cand.dtype, "kernel": cand.name,
               "tile": f"{cand.tile.bm}x{cand.tile.bn}x{cand.tile.bk}/{cand.tile.stages}",
               "unwritten": unwritten, "err/bound": excess, "ms": ms,
               "compile_s": compile_s, "ok": unwritten == 0 and excess <= 1.0}
        if best is None or (row["ok"] and (not best["ok"] or ms < best["ms"])):
            best = row
    if case.timed:
        lib_ms = _time(library, reps)
        best["lib_ms"] = lib_ms
        best["tflops"] = case.flops / best["ms"] / 1e9
        best["lib_tflops"] = case.flops / lib_ms / 1e9
        best["ratio"] = lib_ms / best["ms"]
    return best


def register_budget(t: Tile) -> int:
    """Registers per thread a tile may use: its FP32 accumulators and one k16 step's A/B
    fragments, plus 128 for addresses, loop state and predicates (measured: 36-41 with 16-byte
    copies, up to 112 with the element-wise copies of a 3-channel input; unrolling the K loop
    twice takes that case to 134), and never more than lets two CTAs share an SM's 64K
    registers (the large preset uses 124 of 128; above, one CTA per SM and no overlap)."""
    fragments = 4 * t.mi + 2 * t.ni
    return min(t.accumulator_registers + fragments + 128, 65536 // (2 * t.threads), 255)


def cubin_problems(spec: KernelSpec, arch: str) -> list[str]:
    """Compile ``spec`` for ``arch`` (no GPU needed) and say what is wrong with the cubin:
    spills or a stack frame, registers above ``register_budget``, more shared memory than the
    arch has, and (when cuobjdump is installed) tensor-core instructions other than
    HMMA.16816.F32, FP32 accumulation, or none at all. A compile error raises."""
    c = compile_cubin(render_source(spec), spec.name, arch)
    info, problems = c.info, []
    if info.spill_stores or info.spill_loads or info.stack_frame:
        problems.append(f"spills/stack: {info}")
    if not 0 < info.registers <= register_budget(spec.tile):
        problems.append(f"{info.registers} registers > budget {register_budget(spec.tile)}")
    if spec.tile.smem_bytes > SMEM_LIMIT[arch]:
        problems.append(f"{spec.tile.smem_bytes} B of shared memory > {SMEM_LIMIT[arch]}")
    if sass.available():
        mma = set(sass.mma_instructions(sass.disassemble(c.cubin)))
        if not mma or not all(i.startswith("HMMA.16816.F32") for i in mma):
            problems.append(f"tensor-core instructions {sorted(mma)}")
    return problems


def compile_only(cases: list[Case], archs: tuple[str, ...]) -> int:
    """``cubin_problems`` of every case for ``archs``; prints each problem."""
    t0, failed = time.perf_counter(), 0
    for case in cases:
        for arch in archs:
            problems = cubin_problems(case.spec, arch)
            failed += bool(problems)
            for p in problems:
                print(f"{case.name} ({case.spec.dtype}, {arch}): {p}")
    print(f"compiled {len(archs) * len(cases)} kernels for {', '.join(archs)} in "
          f"{time.perf_counter() - t0:.1f} s; {failed} with problems")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer sizes")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--md", type=Path, help="write the results table as markdown here")
    p.add_argument("--arch", action="append", choices=ARCHS,
                   help="with --compile-only: compile for this arch (repeatable; default: all)")
    args = p.parse_args(argv)
    cases = catalog(args.quick)
    if args.compile_only:
        return compile_only(cases, tuple(args.arch or ARCHS))
    if not torch.cuda.is_available():
        print("no CUDA device: run with --compile-only, or on a GPU machine")
        return 2
    dev = torch.device("cuda")
    arch = device_arch(dev)
    name = torch.cuda.get_device_name(dev)
    print(f"{name}, {arch}, torch {torch.__version__}, {datetime.date.today()}")
    rows, failed = [], 0
    head = (f"{'case':<34}{'dtype':<10}{'tile':<14}{'ok':<4}{'err/bnd':>8}{'kernel TF':>10}"
            f"{'lib TF':>8}{'ratio':>7}")
    print(head)
    start = time.perf_counter()
    for case in cases:
        try:
            r = check_case(case, dev, arch, args.reps)
        except Exception as e:  # noqa: BLE001 - report and go on
            r = {"case": case.name, "dtype": case.spec.dtype, "tile": "-", "ok": False,
                 "err/bound": float("nan"), "error": f"{type(e).__name__}: {e}"}
        rows.append(r)
        failed += not r["ok"]
        print(f"{r['case']:<34}{r['dtype']:<10}{r['tile']:<14}{'yes' if r['ok'] else 'NO':<4}"
              f"{r['err/bound']:>8.2f}{r.get('tflops', float('nan')):>10.1f}"
              f"{r.get('lib_tflops', float('nan')):>8.1f}{r.get('ratio', float('nan')):>7.2f}"
              + (f"  {r['error'][:80]}" if "error" in r else ""), flush=True)
    print(f"{len(rows) - failed}/{len(rows)} passed in {time.perf_counter() - start:.0f} s")
    if args.md:
        lines = [f"### {name} ({arch}), {datetime.date.today()}, torch {torch.__version__}", "",
                 "| case | dtype | tile | ok | err/bound | kernel TFLOP/s | library TFLOP/s |"
                 " kernel/library |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['case']} | {r['dtype']} | {r['tile']} | "
                         f"{'yes' if r['ok'] else 'NO'} | {r['err/bound']:.2f} | "
                         f"{r.get('tflops', float('nan')):.1f} | "
                         f"{r.get('lib_tflops', float('nan')):.1f} | "
                         f"{r.get('ratio', float('nan')):.2f} |")
        args.md.write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
