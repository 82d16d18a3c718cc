"""What the mma.sync kernels compile to, read from their SASS (no GPU needed): for each
representative kernel, how each operand's copy addresses are formed (``KernelSpec.copy_path``:
the filter iterator, hoisted, or the general im2col path), the K loop's instruction count and
HMMA share (static: the filter iterator's recomputation when (r, s) moves is counted although it
runs once every C/bk k-tiles), its ldmatrix and cp.async counts, the epilogue's global store
widths, registers and spills; then the same GEMMs through the Hopper (sm_90a) wgmma kernel with
each preset: HGMMA instructions, epilogue store widths, registers, spills, shared memory. Markdown
tables, for RESULTS.md, until a GPU run gives times.

    python benchmarks/sass_report.py [--arch sm_80] [--no-hopper]
"""

from __future__ import annotations

import argparse
import time

from mpcompile.codegen import hopper
from mpcompile.codegen.render import render_source
from mpcompile.codegen.spec import Conv, Epilogue, KernelSpec, Kind, widest_vec
from mpcompile.codegen.tiles import choose_tile, conv_spec
from mpcompile.runtime import nvrtc, sass

RESNET50 = {  # (h, w, c, k, r, s, stride) at batch 32, NHWC
    "res2 3x3": (56, 56, 64, 64, 3, 3, 1),
    "res2 1x1": (56, 56, 64, 256, 1, 1, 1),
    "res3 3x3 s2": (56, 56, 128, 128, 3, 3, 2),
    "res4 3x3": (14, 14, 256, 256, 3, 3, 1),
    "res5 3x3": (7, 7, 512, 512, 3, 3, 1),
}


def gemm(dtype: str, s: int) -> KernelSpec:
    return KernelSpec(Kind.GEMM, dtype, s, s, s, tile=choose_tile(s, s),
                      epilogue=Epilogue((), dtype, dtype), lda=s, ldb=s, ldc=s,
                      vec_a=widest_vec(s), vec_b=widest_vec(s))


def cases() -> list[tuple[str, KernelSpec]]:
    out = [(f"gemm {s}^3 {d}", gemm(d, s)) for s in (4096, 8192)
           for d in ("float16", "bfloat16")]
    for name, (h, w, c, k, r, s, st) in RESNET50.items():
        cv = Conv(32, h, w, c, k, r, s, (st, st), (r // 2, s // 2))
        out.append((f"fprop {name}", conv_spec(Kind.CONV_FPROP, "float16", cv)))
    h, w, c, k, r, s, st = RESNET50["res4 3x3"]
    cv = Conv(32, h, w, c, k, r, s, (st, st), (1, 1))
    out.append(("dgrad res4 3x3", conv_spec(Kind.CONV_DGRAD, "float16", cv)))
    out.append(("wgrad res4 3x3", conv_spec(Kind.CONV_WGRAD, "float16", cv)))
    return out


def row(label: str, spec: KernelSpec, arch: str) -> str:
    c = nvrtc.compile_cubin(render_source(spec), spec.name, arch)
    text = sass.disassemble(c.cubin)
    loop = sass.main_loop(text)
    stores = ", ".join(f"{k} x{v}" for k, v in sorted(sass.global_stores(text).items()))
    t, i = spec.tile, c.info
    return (f"| {label} | {t.bm}x{t.bn}x{t.bk}/{t.stages} | {spec.split_k} | "
            f"{spec.copy_path('a')}/{spec.copy_path('b')} | {loop.instructions}"
            f" | {loop.hmma} | {100 * loop.hmma_share:.0f} % | {loop.ldsm} | {loop.ldgsts} | "
            f"{stores} | {i.registers} | {i.spill_stores + i.spill_loads} |")


def hopper_row(label: str, spec: KernelSpec, config: hopper.HopperConfig) -> str:
    info = hopper.hopper_sass_summary(spec, config)
    compiled = hopper.compile_hopper(spec, config)
    stores = ", ".join(f"{k} x{v}" for k, v in
                       sorted(sass.global_stores(sass.disassemble(compiled.cubin)).items()))
    kinds = ", ".join(info["hgmma_kinds"])
    return (f"| {label} | {info['tile']}/{info['stages']} | {info['hgmma']} ({kinds}) | "
            f"{'yes' if info['wgmma_serialized'] else 'no'} | {stores} | {info['registers']} | "
            f"{info['spill_stores'] + info['spill_loads']} | {info['smem_bytes']} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="sm_80")
    p.add_argument("--no-hopper", action="store_true", help="skip the sm_90a wgmma table")
    args = p.parse_args()
    t0 = time.perf_counter()
    version = ".".join(map(str, nvrtc.nvrtc_version()))
    print(f"SASS of the mma.sync kernels, {args.arch} (NVRTC {version}; K loop = the backward "
          "branch with the most HMMA; counts per thread)\n")
    print("| kernel | tile/stages | split-K | copies A/B | K-loop instr. | HMMA | HMMA share | "
          "LDSM | LDGSTS | epilogue stores | registers | spills |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, spec in cases():
        print(row(label, spec, args.arch))
    if not args.no_hopper:
        print(f"\nSASS of the Hopper wgmma kernel, {hopper.ARCH} (per thread; 'serialized': "
              "ptxas had to insert waits between wgmmas)\n")
        print("| GEMM | tile/stages | HGMMA | serialized | epilogue stores | registers | spills | "
              "shared memory (B) |")
        print("|---|---|---|---|---|---|---|---|")
        for label, spec in cases():
            if hopper.supports(spec) is None:
                for config in hopper.PRESETS:
                    print(hopper_row(label, spec, config))
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
