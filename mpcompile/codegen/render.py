"""KernelSpec -> self-contained CUDA C++ source (sm_80+: cp.async, ldmatrix, mma.sync).

No headers and no CUTLASS: conversions, copies, ldmatrix and MMAs are inline PTX. Every index
expression comes from ``mapping.py`` and the spec's address functions evaluated on symbolic
values, the same functions the NumPy model (``model.py``) executes. Shapes and strides are
compile-time constants: a kernel is specialised to one matmul or convolution of the graph.
"""

from __future__ import annotations

from ..dtypes import FLOAT32, info
from . import mapping as mp
from .epilogue import OPS
from .expr import Sym, all_of, render
from .spec import KernelSpec, Kind


def _short(dtype: str) -> str:
    """f16 / bf16 / f32: the type suffix of PTX instructions and of the prelude's helpers."""
    return info(dtype).short


def _c_type(dtype: str) -> str:
    """How a buffer of ``dtype`` is declared: 16-bit floats as raw ``u16`` (converted by PTX)."""
    return "u16" if info(dtype).is_low else "float"


def _cvt(dtype: str) -> str:
    """Prefix of the prelude's helper that reads one ``dtype`` element as float:
    ``f16_to_f32``, ``bf16_to_f32``, ``float32_to_f32``."""
    return _short(dtype) if info(dtype).is_low else dtype

_PRELUDE = r"""
typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float f16_to_f32(u16 v) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;
}
__device__ __forceinline__ float bf16_to_f32(u16 v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ u16 f32_to_f16(float f) {
  u16 v; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v;
}
__device__ __forceinline__ u16 f32_to_bf16(float f) {
  u16 v; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v;
}
__device__ __forceinline__ float float32_to_f32(float v) { return v; }
__device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 r; asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ void cp_async(u32 dst, const void* src, bool ok, int bytes) {
  const int n = ok ? bytes : 0;  // 0 bytes read: the destination is zero-filled
  if (bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(n));
  else if (bytes == 8)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" :: "r"(dst), "l"(src), "r"(n));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}
__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
"""


def _loader(spec: KernelSpec, operand: str) -> str:
    """The body that copies operand tile ``operand`` for pipeline stage ``stage`` at ``k0``."""
    t = spec.tile
    kcontig = spec.a_kcontig if operand == "a" else spec.b_kcontig
    vec = spec.vec_a if operand == "a" else spec.vec_b
    extent = t.bm if operand == "a" else t.bn
    width, rows = (t.bk, extent) if kcontig else (extent, t.bk)
    n = mp.copies(rows, width, vec)
    per_thread = -(-n // t.threads)
    ptr, smem, tile0 = ("A", "sA", "m0") if operand == "a" else ("B", "sB", "n0")
    row, col = mp.copy_coords(Sym("idx"), width, vec)
    if kcontig:
        mn, k = Sym(tile0) + Sym("row"), Sym("k0") + Sym("col")
    else:
        mn, k = Sym(tile0) + Sym("col"), Sym("k0") + Sym("row")
    off, ok = (spec.a_addr(Sym("g_mn"), Sym("g_k")) if operand == "a"
               else spec.b_addr(Sym("g_k"), Sym("g_mn")))
    ok = all_of(ok, Sym("g_k") < Sym("k_end"))
    dst = mp.smem_offset(Sym("row"), Sym("col"), width)
    guard = "" if n % t.threads == 0 else f"if (idx < {n}) "
    if vec == 1:
        copy = (f"{smem}[stage * {rows * width} + {render(dst)}] = ok ? {ptr}[off] : "
                "(u16)0;")
    else:
        copy = (f"cp_async(smem_u32({smem} + stage * {rows * width} + {render(dst)}), "
                f"{ptr} + (ok ? off : 0), ok, {vec * 2});")
    return f"""
    #pragma unroll
    for (int i = 0; i < {per_thread}; ++i) {{
      const int idx = tid + i * {t.threads};
      {guard}{{
        const int row = {render(row)};
        const int col = {render(col)};
        const int g_mn = {render(mn)};
        const int g_k = {render(k)};
        const bool ok = {render(ok)};
        const int off = ok ? {render(off)} : 0;
        {copy}
      }}
    }}"""


def _fragments(spec: KernelSpec) -> str:
    t = spec.tile
    a_w = t.bk if spec.a_kcontig else t.bm
    b_w = t.bk if spec.b_kcontig else t.bn
    ar, ac = mp.a_ldmatrix(Sym("lane"), Sym("wm0") + Sym("mi") * 16, Sym("ks"), spec.a_kcontig)
    br, bc = mp.b_ldmatrix(Sym("lane"), Sym("wn0") + Sym("nj") * 8, Sym("ks"), spec.b_kcontig)
    lda = "ldsm_x4" if spec.a_kcontig else "ldsm_x4_t"
    ldb = "ldsm_x4" if spec.b_kcontig else "ldsm_x4_t"
    a_tile, b_tile = t.bm * t.bk, t.bk * t.bn
    low = _short(spec.dtype)  # FP32 accumulators, f16/bf16 operands
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{low}.{low}.f32"
    return f"""
      #pragma unroll
      for (int ks = 0; ks < {t.bk}; ks += 16) {{
        u32 af[{t.mi}][4];
        u32 bf[{t.ni}][2];
        #pragma unroll
        for (int mi = 0; mi < {t.mi}; ++mi)
          {lda}(smem_u32(sA + stage * {a_tile} + {render(mp.smem_offset(ar, ac, a_w))}),
                af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
        #pragma unroll
        for (int nj = 0; nj < {t.ni}; nj += 2)
          {ldb}(smem_u32(sB + stage * {b_tile} + {render(mp.smem_offset(br, bc, b_w))}),
                bf[nj][0], bf[nj][1], bf[nj + 1][0], bf[nj + 1][1]);
        #pragma unroll
        for (int mi = 0; mi < {t.mi}; ++mi)
          #pragma unroll
          for (int ni = 0; ni < {t.ni}; ++ni)
            asm volatile("{mma} {{%0,%1,%2,%3}}, {{%4,%5,%6,%7}}, {{%8,%9}}, "
                         "{{%0,%1,%2,%3}};\\n"
                         : "+f"(acc[mi][ni][0]), "+f"(acc[mi][ni][1]), "+f"(acc[mi][ni][2]),
                           "+f"(acc[mi][ni][3])
                         : "r"(af[mi][0]), "r"(af[mi][1]), "r"(af[mi][2]), "r"(af[mi][3]),
                           "r"(bf[ni][0]), "r"(bf[ni][1]));
      }}"""


def _epilogue(spec: KernelSpec) -> str:
    ep = spec.epilogue
    lines = [OPS[op].c.format(low=_short(spec.dtype), bias=_cvt(ep.bias_dtype))
             for op in ep.ops]
    if spec.split_k > 1:  # each split writes its own FP32 partial; the caller sums them
        store = f"C[(long long)split * {spec.m * spec.c_ld} + off] = x;"
    elif ep.out == FLOAT32.name:
        store = "C[off] = x;"
    else:
        store = f"C[off] = f32_to_{_short(ep.out)}(x);"
    row, col = mp.c_coords(Sym("lane"), Sym("i"), Sym("m0") + Sym("wm0") + Sym("mi") * 16,
                           Sym("n0") + Sym("wn0") + Sym("ni") * 8)
    body = "\n            ".join(lines)
    return f"""
  #pragma unroll
  for (int mi = 0; mi < {spec.tile.mi}; ++mi)
    #pragma unroll
    for (int ni = 0; ni < {spec.tile.ni}; ++ni)
      #pragma unroll
      for (int i = 0; i < 4; ++i) {{
        const int row = {render(row)};
        const int col = {render(col)};
        if (row < {spec.m} && col < {spec.n}) {{
          float x = acc[mi][ni][i];
            {body}
          const int off = {render(spec.c_addr(Sym("row"), Sym("col")))};
          {store}
        }}
      }}"""


def render_source(spec: KernelSpec) -> str:
    """The CUDA C++ source of ``spec``'s kernel, entry point ``spec.name``."""
    t, ep = spec.tile, spec.epilogue
    wm0, wn0 = mp.warp_origin(Sym("warp"), t.wtm, t.wtn, t.warps_n)
    c_t = "float" if spec.split_k > 1 else _c_type(ep.out)
    bias_t = _c_type(ep.bias_dtype)
    per_split = spec.k_per_split
    header = (f"// mpcompile kernel {spec.name}: {spec.kind.value} {spec.dtype} "
              f"m={spec.m} n={spec.n} k={spec.k} batch={spec.batch} split_k={spec.split_k}\n"
              f"// tile {t.bm}x{t.bn}x{t.bk}, warps {t.warps_m}x{t.warps_n}, stages {t.stages},"
              f" A {'k' if spec.a_kcontig else 'm'}-contiguous vec {spec.vec_a}, "
              f"B {'k' if spec.b_kcontig else 'n'}-contiguous vec {spec.vec_b}\n"
              f"// epilogue {list(ep.ops)} -> {ep.out}; generated, do not edit\n")
    scale = ("  const float scale = *scale_ptr;\n" if "scale" in ep.ops else "")
    batch_off = ""
    if spec.kind is Kind.GEMM and spec.batch > 1:
        batch_off = (f"  A += (long long)batch * {spec.batch_stride_a};\n"
                     f"  B += (long long)batch * {spec.batch_stride_b};\n"
                     f"  C += (long long)batch * {spec.batch_stride_c};\n")
    return header + _PRELUDE + f"""
extern "C" __global__ void __launch_bounds__({t.threads})
{spec.name}(const u16* __restrict__ A, const u16* __restrict__ B, {c_t}* __restrict__ C,
    const {bias_t}* __restrict__ bias, const float* __restrict__ scale_ptr) {{
  extern __shared__ __align__(128) u16 smem[];
  u16* sA = smem;
  u16* sB = smem + {t.stages * t.bm * t.bk};
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int m0 = blockIdx.y * {t.bm};
  const int n0 = blockIdx.x * {t.bn};
  const int batch = blockIdx.z / {spec.split_k};
  const int split = blockIdx.z % {spec.split_k};
  const int k_start = split * {per_split};
  const int k_end = min({spec.k}, k_start + {per_split});
  const int k_tiles = k_end > k_start ? (k_end - k_start + {t.bk - 1}) / {t.bk} : 0;
{batch_off}{scale}  const int wm0 = {render(wm0)};
  const int wn0 = {render(wn0)};
  (void)lane; (void)bias;
  float acc[{t.mi}][{t.ni}][4];
  #pragma unroll
  for (int mi = 0; mi < {t.mi}; ++mi)
    #pragma unroll
    for (int ni = 0; ni < {t.ni}; ++ni)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

  // prologue: stages 0 .. {t.stages - 2} in flight
  #pragma unroll
  for (int s = 0; s < {t.stages - 1}; ++s) {{
    if (s < k_tiles) {{
      const int stage = s;
      const int k0 = k_start + s * {t.bk};
      {_loader(spec, "a")}
      {_loader(spec, "b")}
    }}
    cp_async_commit();
  }}
  for (int kt = 0; kt < k_tiles; ++kt) {{
    cp_async_wait<{t.stages - 2}>();
    __syncthreads();
    {{  // refill the stage computed in the previous iteration
      const int next = kt + {t.stages - 1};
      if (next < k_tiles) {{
        const int stage = next % {t.stages};
        const int k0 = k_start + next * {t.bk};
        {_loader(spec, "a")}
        {_loader(spec, "b")}
      }}
      cp_async_commit();
    }}
    {{
      const int stage = kt % {t.stages};
      {_fragments(spec)}
    }}
  }}
  cp_async_wait<0>();
{_epilogue(spec)}
}}
"""
