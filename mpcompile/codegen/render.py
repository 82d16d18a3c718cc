"""KernelSpec -> self-contained CUDA C++ source (sm_80+: cp.async, ldmatrix, mma.sync).

No headers and no CUTLASS: conversions, copies, ldmatrix and MMAs are inline PTX. Every index
expression comes from ``mapping.py`` and the spec's address functions evaluated on symbolic
values, the same functions the NumPy model (``model.py``) executes. Shapes and strides are
compile-time constants: a kernel is specialised to one matmul or convolution of the graph.

Copy addresses of the main loop take one of the paths ``KernelSpec.copy_path`` names (written
in the kernel's header comment): ``hoisted`` (affine in k: offsets once, a base pointer moves),
``stepped`` (the im2col filter iterator: per copy the output pixel's window origin once, a
(channel, filter position) state shared by the block's copies stepped per k-tile, offsets and
predicates recomputed only when the filter position moves), ``taps`` / ``pixels`` (per-copy
(r, s, c) or (n, p, q) digits stepped by bk with carries) or ``general`` (the full address
function each k-tile). ldmatrix addresses: one offset per stage, the rest an XOR and an
immediate away (``fragment_split``).
"""

from __future__ import annotations

import numpy as np

from ..dtypes import info
from . import mapping as mp
from .epilogue import OPS
from .expr import Sym, all_of, render, select, wide
from .schedule import Event, Op, Schedule
from .spec import KernelSpec, Kind


def _short(dtype: str) -> str:
    """f16 / bf16 / f32: the type suffix of PTX instructions and of the prelude's helpers."""
    return info(dtype).short


def _c_type(dtype: str) -> str:
    """How a buffer of ``dtype`` is declared: 16-bit floats as raw ``u16`` (converted by PTX)."""
    return "u16" if info(dtype).is_low else "float"


def cvt_prefix(dtype: str) -> str:
    """Prefix of the prelude's helper that reads one ``dtype`` element as float:
    ``f16_to_f32``, ``bf16_to_f32``, ``float32_to_f32``."""
    return _short(dtype) if info(dtype).is_low else dtype

# The helpers both kernels' sources start with (``hopper.py`` reuses them): 16/32-bit types and
# the conversions the epilogue table's C statements call (``{cvt_prefix(dtype)}_to_f32``).
CONVERSIONS = r"""
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
__device__ __forceinline__ float float32_to_f32(float v) { return v; }"""

_PRELUDE = CONVERSIONS + r"""
// an integer the optimiser cannot see through: the tile coordinates decoded from the raster are
// kept opaque, or the compiler specialises the main loop on them (128x128 tile: 174 registers
// instead of 120)
__device__ __forceinline__ int opaque(int v) { asm("mov.b32 %0, %0;" : "+r"(v)); return v; }
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
__device__ __forceinline__ void cp_async_n(u32 dst, const void* src, int n) {  // n: 0 or 16
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_if(u32 dst, const void* src, u32 ok) {  // else zeros
  asm volatile("{ .reg .pred p; setp.eq.u32 p, %2, 0;\n"
               "cp.async.cg.shared.global [%0], [%1], 16, p; }\n" :: "r"(dst), "l"(src), "r"(ok));
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


def _operand(spec: KernelSpec, operand: str):
    """(k-contiguous?, vec, smem width, smem rows, copies, copies per thread) of an operand."""
    t = spec.tile
    kcontig = spec.a_kcontig if operand == "a" else spec.b_kcontig
    vec = spec.vec_a if operand == "a" else spec.vec_b
    extent = t.bm if operand == "a" else t.bn
    width, rows = (t.bk, extent) if kcontig else (extent, t.bk)
    n = mp.copies(rows, width, vec)
    return kcontig, vec, width, rows, n, -(-n // t.threads)


def hoisted(spec: KernelSpec, operand: str) -> bool:
    """Are ``operand``'s copy offsets and predicates computed once, before the main loop? When
    its address is affine in k and it is copied with 16-byte ``cp.async``."""
    return spec.copy_path(operand) == "hoisted"


def _coords(spec: KernelSpec, operand: str, width: int, kcontig: bool, k0):
    """(row, col, GEMM row/column, k) of copy ``idx`` of an operand tile whose first k is
    ``k0``."""
    row, col = mp.copy_coords(Sym("idx"), width, _operand(spec, operand)[1])
    tile0 = Sym("m0" if operand == "a" else "n0")
    if kcontig:
        return row, col, tile0 + Sym("row"), k0 + Sym("col")
    return row, col, tile0 + Sym("col"), k0 + Sym("row")


def _at(spec: KernelSpec, operand: str):
    return spec.a_addr if operand == "a" else (lambda mn, k: spec.b_addr(k, mn))


def _setup(spec: KernelSpec, operand: str) -> str:
    if spec.stepped(operand):
        return _stepped_setup(spec, operand)
    if spec.walk(operand):
        return _walk_setup(spec, operand)
    return _loader_setup(spec, operand)


_DIGITS = {"pixels": ("pn", "pp", "pq"), "taps": ("tr", "ts", "tc")}
_ORIGIN = {"pixels": ("tap", "dh", "dw"), "taps": ("base", "h0", "w0")}


def _walk_setup(spec: KernelSpec, operand: str) -> str:
    """Before the main loop, for an operand read through a per-copy iterator (``spec.walk``):
    each copy's origin (computed once), shared-memory offset, k within the tile and digits at
    the first k-tile."""
    t, kind = spec.tile, spec.walk(operand)
    kcontig, vec, width, rows, n, per = _operand(spec, operand)
    p = operand
    row, col, mn, kr = _coords(spec, operand, width, kcontig, 0)
    origin = spec.walk_origin(operand, Sym("g_mn"))
    digits = spec.walk_start(operand, Sym("k_start") + Sym("g_kr"))
    wide_base = kind == "taps" and spec.wide_index(operand)
    names = [f"{p}_{d}" for d in _ORIGIN[kind]] + [f"{p}_{d}" for d in _DIGITS[kind]]
    decl = "\n  ".join(f"{'long long' if wide_base and i == 0 else 'int'} {name}[{per}];"
                       for i, name in enumerate(names))
    sets = "\n    ".join(f"{name}[i] = {render(v)};"
                          for name, v in zip(names, (*origin, *digits)))
    label = "pixel (n, p, q)" if kind == "pixels" else "filter tap (r, s, c)"
    return f"""
  // operand {p}: per-copy iterator, its origin once and its {label} stepped per k-tile
  {decl}
  int {p}_kr[{per}];
  u32 {p}_dst[{per}];
  #pragma unroll
  for (int i = 0; i < {per}; ++i) {{
    const int idx = tid + i * {t.threads};
    const int row = {render(row)};
    const int col = {render(col)};
    const int g_mn = {render(mn)};
    const int g_kr = {render(kr)};
    {sets}
    {p}_kr[i] = g_kr;
    {p}_dst[i] = {render(mp.smem_offset(Sym("row"), Sym("col"), width))} * 2;
  }}
  (void){p}_kr;"""


def _loader_setup(spec: KernelSpec, operand: str) -> str:
    """Before the main loop, for a hoisted operand: each copy's offset at relative k (its
    column or row in the tile), its M/N predicate and its shared-memory byte offset; the base
    pointer then moves ``bk * k_step`` elements per k-tile."""
    if not hoisted(spec, operand):
        return ""
    t = spec.tile
    kcontig, vec, width, rows, n, per = _operand(spec, operand)
    p, ptr = operand, operand.upper()
    row, col, mn, k = _coords(spec, operand, width, kcontig, 0)
    at = _at(spec, operand)
    _, ok = at(Sym("g_mn"), Sym("g_kr"))
    big = spec.wide_index(operand)
    off, _ = at(wide(Sym("g_mn")), wide(Sym("g_kr"))) if big else at(Sym("g_mn"), Sym("g_kr"))
    off_t = "long long" if big else "int"
    return f"""
  // operand {p}: offsets and predicates of this thread's copies, computed once
  const u16* {ptr}_k = {ptr} + (long long)k_start * {spec.k_step(operand)};
  {off_t} {p}_off[{per}];
  u32 {p}_dst[{per}];
  int {p}_n[{per}];
  int {p}_kr[{per}];
  #pragma unroll
  for (int i = 0; i < {per}; ++i) {{
    const int idx = tid + i * {t.threads};
    const int row = {render(row)};
    const int col = {render(col)};
    const int g_mn = {render(mn)};
    const int g_kr = {render(k)};
    const bool ok = {render(ok)};
    {p}_off[i] = ok ? {render(off)} : 0;
    {p}_dst[i] = {render(mp.smem_offset(Sym("row"), Sym("col"), width))} * 2;
    {p}_n[i] = ok ? 16 : 0;
    {p}_kr[i] = g_kr;
  }}
  (void){p}_kr;"""


def _window_code(spec: KernelSpec, operand: str, per: int) -> str:
    """Pointers (at channel 0) and predicates of a stepped operand's copies at the iterator's
    filter position (``spec.im2col_at``): before the main loop and whenever it moves."""
    p = operand
    off, ok = spec.im2col_at(operand, Sym(f"{p}_base[i]"), Sym(f"{p}_h0[i]"), Sym(f"{p}_w0[i]"),
                             Sym(f"{p}_rs"))
    cast = "" if spec.wide_index(operand) else "(u32)"  # never negative: a 32-bit multiply-add
    return f"""
  #pragma unroll
  for (int i = 0; i < {per}; ++i) {{
    const bool ok = {render(ok)};
    {p}_ptr[i] = {p.upper()} + {cast}{render(off)};
    {p}_ok[i] = ok;
  }}"""


def _stepped_setup(spec: KernelSpec, operand: str) -> str:
    """Before the main loop, for an operand read through the filter iterator
    (``spec.stepped``): each copy's window origin (its output pixel: base offset, h0, w0) and
    shared-memory offset, the iterator's (channel, filter position) at ``k_start`` and the
    offsets and predicates there."""
    t = spec.tile
    kcontig, vec, width, rows, n, per = _operand(spec, operand)
    p = operand
    row, col, mn, kr = _coords(spec, operand, width, kcontig, 0)
    base, h0, w0 = spec.im2col_origin(operand, Sym("g_mn"), Sym("g_kr"))
    c0, rs0 = spec.im2col_start(operand, Sym("k_start"))
    off_t = "long long" if spec.wide_index(operand) else "int"
    return f"""
  // operand {p}: filter iterator; the window origin of each copy, computed once
  {off_t} {p}_base[{per}];
  const u16* {p}_ptr[{per}];  // at channel 0 of the filter position
  int {p}_h0[{per}], {p}_w0[{per}];
  u32 {p}_ok[{per}];
  u32 {p}_dst[{per}];
  int {p}_c = {render(c0)};  // channel of the next k-tile
  int {p}_rs = {render(rs0)};  // its filter position r * {spec.conv.s} + s
  #pragma unroll
  for (int i = 0; i < {per}; ++i) {{
    const int idx = tid + i * {t.threads};
    const int row = {render(row)};
    const int col = {render(col)};
    const int g_mn = {render(mn)};
    const int g_kr = {render(kr)};
    {p}_base[i] = {render(base)};
    {p}_h0[i] = {render(h0)};
    {p}_w0[i] = {render(w0)};
    {p}_dst[i] = {render(mp.smem_offset(Sym("row"), Sym("col"), width))} * 2;
  }}{_window_code(spec, operand, per)}"""


def _loader(spec: KernelSpec, operand: str) -> str:
    """The body that copies operand tile ``operand`` into pipeline stage ``stage`` for the
    k-tile ``tile`` starting at ``k0``."""
    t = spec.tile
    kcontig, vec, width, rows, n, per_thread = _operand(spec, operand)
    ptr, smem = ("A", "sA") if operand == "a" else ("B", "sB")
    guard = "" if n % t.threads == 0 else f"if (tid + i * {t.threads} < {n}) "
    if spec.walk(operand):
        p, kind = operand, spec.walk(operand)
        origin = [Sym(f"{p}_{d}[i]") for d in _ORIGIN[kind]]
        digits = [Sym(f"{p}_{d}[i]") for d in _DIGITS[kind]]
        off, ok = spec.walk_at(operand, origin, digits)
        if spec.ragged_k:  # past the end of K the address stays inside the operand too
            ok = all_of(ok, Sym("k0") + Sym(f"{p}_kr[i]") < Sym("k_end"))
            off = select(Sym("ok"), off, 0)
        cast = "" if spec.wide_index(operand) else "(u32)"  # never negative
        nxt = spec.walk_step(operand, *digits)
        names = [f"{p}_{d}" for d in _DIGITS[kind]]
        step = "\n      ".join(f"const int {d}_next = {render(v)};" for d, v in zip(names, nxt))
        move = "\n      ".join(f"{d}[i] = {d}_next;" for d in names)
        return f"""
    const u32 {p}_st = {smem}_u + stage * {rows * width * 2};
    #pragma unroll
    for (int i = 0; i < {per_thread}; ++i) {guard}{{
      const bool ok = {render(ok)};
      cp_async_if({p}_st + {p}_dst[i], {ptr} + {cast}{render(off)}, ok);
      {step}
      {move}  // the digits bk further
    }}"""
    if spec.stepped(operand):
        p = operand
        c, rs, moved = spec.im2col_step(operand, Sym(f"{p}_c"), Sym(f"{p}_rs"))
        moved_decl, recompute = "", ""
        if not spec.im2col_fixed(operand):
            moved_decl = f"const bool moved = {render(moved)};"
            recompute = f"""
      if (moved) {{{_window_code(spec, operand, per_thread)}
      }}"""
        return f"""
    const u32 {p}_st = {smem}_u + stage * {rows * width * 2};
    const int {p}_ch = {render(spec.im2col_chan(operand, Sym(f"{p}_c"), Sym(f"{p}_rs")))};
    #pragma unroll
    for (int i = 0; i < {per_thread}; ++i)
      {guard}cp_async_if({p}_st + {p}_dst[i], {p}_ptr[i] + {p}_ch, {p}_ok[i]);
    {{  // the iterator moves to the next k-tile: the predicates change with (r, s) only
      const int c_next = {render(c)};
      const int rs_next = {render(rs)};
      {moved_decl}
      {p}_c = c_next;
      {p}_rs = rs_next;{recompute}
    }}"""
    if hoisted(spec, operand):
        p = operand
        step = t.bk * spec.k_step(operand)
        bytes_ = f"(k0 + {p}_kr[i] < k_end ? {p}_n[i] : 0)" if spec.ragged_k else f"{p}_n[i]"
        return f"""
    const u16* {p}_src = {ptr}_k + (long long)tile * {step};
    const u32 {p}_st = {smem}_u + stage * {rows * width * 2};
    #pragma unroll
    for (int i = 0; i < {per_thread}; ++i)
      {guard}cp_async_n({p}_st + {p}_dst[i], {p}_src + {p}_off[i], {bytes_});"""
    row, col, mn, k = _coords(spec, operand, width, kcontig, Sym("k0"))
    at = _at(spec, operand)
    _, ok = at(Sym("g_mn"), Sym("g_k"))
    big = spec.wide_index(operand)  # 64-bit offsets only past 2^31-1 elements
    off, _ = at(wide(Sym("g_mn")), wide(Sym("g_k"))) if big else at(Sym("g_mn"), Sym("g_k"))
    ok = all_of(ok, Sym("g_k") < Sym("k_end"))
    dst = mp.smem_offset(Sym("row"), Sym("col"), width)
    if vec == 1:
        copy = (f"{smem}[stage * {rows * width} + {render(dst)}] = ok ? {ptr}[off] : "
                "(u16)0;")
    else:
        copy = (f"cp_async({smem}_u + (stage * {rows * width} + {render(dst)}) * 2, "
                f"{ptr} + off, ok, {vec * 2});")
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
        const {"long long" if big else "int"} off = ok ? {render(off)} : 0;
        {copy}
      }}
    }}"""


FRAG_ALIGN = 64  # elements: the stage buffers start at multiples of 128 bytes


def fragment_split(spec: KernelSpec, operand: str):
    """How a thread addresses its ldmatrix loads of ``operand`` in a k-tile: per load (i, ks)
    (i: the m16 tile mi of A, the n16 pair nj of B) constants (x, y) with element offset
    ``(first ^ x) + y`` (``mapping.xor_add_split`` over every lane of every warp), so one
    offset a stage is computed and the rest are an XOR and an immediate; None (each offset
    computed in full) when no such split exists or the stage buffers are not 128-byte
    aligned."""
    t, lane = spec.tile, np.arange(32)
    a = operand == "a"
    kcontig, width = (spec.a_kcontig, t.bk if spec.a_kcontig else t.bm) if a else \
        (spec.b_kcontig, t.bk if spec.b_kcontig else t.bn)
    if (t.bm * t.bk * 2) % (2 * FRAG_ALIGN) or (t.bn * t.bk * 2) % (2 * FRAG_ALIGN):
        return None
    table = {}
    for i in (range(t.mi) if a else range(0, t.ni, 2)):
        for ks in range(0, t.bk, 16):
            offs = []
            for w in range(t.warps):
                wm0, wn0 = mp.warp_origin(w, t.wtm, t.wtn, t.warps_n)
                r, c = mp.a_ldmatrix(lane, wm0 + i * 16, ks, kcontig) if a else \
                    mp.b_ldmatrix(lane, wn0 + i * 8, ks, kcontig)
                offs.append(mp.smem_offset(r, c, width))
            table[(i, ks)] = np.concatenate(offs)
    return mp.xor_add_split(table, FRAG_ALIGN)


def _fragment_setup(spec: KernelSpec) -> str:
    """Each thread's first ldmatrix offset (bytes) of A and B, when ``fragment_split`` holds."""
    if fragment_split(spec, "a") is None or fragment_split(spec, "b") is None:
        return ""
    t = spec.tile
    a_w = t.bk if spec.a_kcontig else t.bm
    b_w = t.bk if spec.b_kcontig else t.bn
    ar, ac = mp.a_ldmatrix(Sym("lane"), Sym("wm0"), 0, spec.a_kcontig)
    br, bc = mp.b_ldmatrix(Sym("lane"), Sym("wn0"), 0, spec.b_kcontig)
    return f"""
  // ldmatrix: each thread's first offset; the others are an XOR and an immediate away
  const u32 a_fr = {render(mp.smem_offset(ar, ac, a_w))} * 2;
  const u32 b_fr = {render(mp.smem_offset(br, bc, b_w))} * 2;
"""


def _fragments(spec: KernelSpec) -> str:
    split_a, split_b = fragment_split(spec, "a"), fragment_split(spec, "b")
    if split_a is None or split_b is None:
        return _fragments_direct(spec)
    t = spec.tile
    lda = "ldsm_x4" if spec.a_kcontig else "ldsm_x4_t"
    ldb = "ldsm_x4" if spec.b_kcontig else "ldsm_x4_t"
    a_tile, b_tile = t.bm * t.bk, t.bk * t.bn

    def addr(base: str, xy: tuple[int, int]) -> str:
        x, y = xy
        out = f"({base} ^ {2 * x})" if x else base
        return f"{out} + {2 * y}" if y else out

    steps = []
    for ks in range(0, t.bk, 16):
        loads = [f"{lda}({addr('a_fb', split_a[(mi, ks)])}, "
                 f"af[{mi}][0], af[{mi}][1], af[{mi}][2], af[{mi}][3]);" for mi in range(t.mi)]
        loads += [f"{ldb}({addr('b_fb', split_b[(nj, ks)])}, "
                  f"bf[{nj}][0], bf[{nj}][1], bf[{nj + 1}][0], bf[{nj + 1}][1]);"
                  for nj in range(0, t.ni, 2)]
        body = "\n        ".join(loads)
        steps.append(f"""
      {{  // k16 step {ks}
        u32 af[{t.mi}][4];
        u32 bf[{t.ni}][2];
        {body}{_mmas(spec)}
      }}""")
    return f"""
      const u32 a_fb = sA_u + stage * {a_tile * 2} + a_fr;
      const u32 b_fb = sB_u + stage * {b_tile * 2} + b_fr;""" + "".join(steps)


def _mmas(spec: KernelSpec) -> str:
    """The k16 step's MMAs of a warp tile from its fragments ``af`` and ``bf``."""
    t = spec.tile
    low = _short(spec.dtype)  # FP32 accumulators, f16/bf16 operands
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{low}.{low}.f32"
    return f"""
        #pragma unroll
        for (int mi = 0; mi < {t.mi}; ++mi)
          #pragma unroll
          for (int ni = 0; ni < {t.ni}; ++ni)
            asm volatile("{mma} {{%0,%1,%2,%3}}, {{%4,%5,%6,%7}}, {{%8,%9}}, "
                         "{{%0,%1,%2,%3}};\\n"
                         : "+f"(acc[mi][ni][0]), "+f"(acc[mi][ni][1]), "+f"(acc[mi][ni][2]),
                           "+f"(acc[mi][ni][3])
                         : "r"(af[mi][0]), "r"(af[mi][1]), "r"(af[mi][2]), "r"(af[mi][3]),
                           "r"(bf[ni][0]), "r"(bf[ni][1]));"""


def _fragments_direct(spec: KernelSpec) -> str:
    """Every ldmatrix offset computed in full (when ``fragment_split`` is None)."""
    t = spec.tile
    a_w = t.bk if spec.a_kcontig else t.bm
    b_w = t.bk if spec.b_kcontig else t.bn
    ar, ac = mp.a_ldmatrix(Sym("lane"), Sym("wm0") + Sym("mi") * 16, Sym("ks"), spec.a_kcontig)
    br, bc = mp.b_ldmatrix(Sym("lane"), Sym("wn0") + Sym("nj") * 8, Sym("ks"), spec.b_kcontig)
    lda = "ldsm_x4" if spec.a_kcontig else "ldsm_x4_t"
    ldb = "ldsm_x4" if spec.b_kcontig else "ldsm_x4_t"
    a_tile, b_tile = t.bm * t.bk, t.bk * t.bn
    return f"""
      #pragma unroll
      for (int ks = 0; ks < {t.bk}; ks += 16) {{
        u32 af[{t.mi}][4];
        u32 bf[{t.ni}][2];
        #pragma unroll
        for (int mi = 0; mi < {t.mi}; ++mi)
          {lda}(sA_u + (stage * {a_tile} + {render(mp.smem_offset(ar, ac, a_w))}) * 2,
                af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
        #pragma unroll
        for (int nj = 0; nj < {t.ni}; nj += 2)
          {ldb}(sB_u + (stage * {b_tile} + {render(mp.smem_offset(br, bc, b_w))}) * 2,
                bf[nj][0], bf[nj][1], bf[nj + 1][0], bf[nj + 1][1]);{_mmas(spec)}
      }}"""


def _epilogue(spec: KernelSpec) -> str:
    """Each warp applies the epilogue ops to its accumulators, converts them and writes them to
    its own staging buffer in shared memory (the drained stage ring), then stores its tile row
    by row, ``c_vec`` elements (16 bytes) per lane and store; partial chunks at a ragged right
    edge element by element."""
    t, ep = spec.tile, spec.epilogue
    lines = [OPS[op].c.format(low=_short(spec.dtype), bias=cvt_prefix(ep.bias_dtype))
             for op in ep.ops]
    out_t = "float" if spec.out_bytes == 4 else "u16"
    conv = "x" if spec.out_bytes == 4 else f"f32_to_{_short(ep.out)}(x)"
    vec, pitch = spec.c_vec, spec.stage_pitch
    slot = mp.stage_slot(Sym("lane"), Sym("i"), Sym("mi"), Sym("ni"), pitch)
    _, col = mp.c_coords(Sym("lane"), Sym("i"), 0, Sym("n0") + Sym("wn0") + Sym("ni") * 8)
    chunks = t.wtm * t.wtn // vec
    r, c = mp.store_chunk(Sym("lane"), Sym("p"), t.wtn, vec)
    big = spec.wide_index("c")
    c_off = spec.c_addr(wide(Sym("row")) if big else Sym("row"), Sym("col"))
    split = f"(long long)split * {spec.m * spec.c_ld} + " if spec.split_k > 1 else ""
    vtype = {16: "uint4", 8: "uint2", 4: "u32", 2: "u16"}[vec * spec.out_bytes]
    guard = "" if chunks % 32 == 0 else f"if (p * 32 + lane < {chunks}) "
    body = "\n          ".join(lines)
    full = f"*reinterpret_cast<{vtype}*>(C + off) = *reinterpret_cast<const {vtype}*>(src);"
    if spec.n % vec == 0:  # chunks start at multiples of vec: whole chunks in or out
        store = f"if (col < {spec.n}) {full}"
    else:
        store = f"""if (col + {vec} <= {spec.n}) {{
        {full}
      }} else {{
        #pragma unroll
        for (int e = 0; e < {vec}; ++e)
          if (col + e < {spec.n}) C[off + e] = src[e];
      }}"""
    return f"""
  {out_t}* stage_c = reinterpret_cast<{out_t}*>(smem) + warp * {t.wtm * pitch};
  #pragma unroll
  for (int mi = 0; mi < {t.mi}; ++mi)
    #pragma unroll
    for (int ni = 0; ni < {t.ni}; ++ni)
      #pragma unroll
      for (int i = 0; i < 4; ++i) {{
        const int col = min({render(col)}, {spec.n - 1});
        float x = acc[mi][ni][i];
          {body}
        stage_c[{render(slot)}] = {conv};
        (void)col;
      }}
  __syncwarp();
  #pragma unroll
  for (int p = 0; p < {-(-chunks // 32)}; ++p) {guard}{{
    const int row = m0 + wm0 + {render(r)};
    const int col = n0 + wn0 + {render(c)};
    const {out_t}* src = stage_c + {render(r)} * {pitch} + {render(c)};
    if (row < {spec.m}) {{
      const {"long long" if big or split else "int"} off = {split}{render(c_off)};
      {store}
    }}
  }}"""


def _events(spec: KernelSpec, schedule: Schedule, events: tuple[Event, ...], i: str) -> str:
    """C++ for a schedule's events at step ``i`` (see ``schedule.py``): one statement each."""
    t, out = spec.tile, []
    for e in events:
        if e.op is Op.WAIT:
            out.append(f"cp_async_wait<{e.n}>();")
        elif e.op is Op.BARRIER:
            out.append("__syncthreads();")
        elif e.op is Op.COMMIT:
            out.append("cp_async_commit();")
        elif e.op is Op.LOAD:
            out.append(f"""{{  // copies of k-tile {i} + {e.n} into its stage
      const int tile = {i} + {e.n};
      if (tile < k_tiles) {{
        const int stage = tile % {schedule.stages};
        const int k0 = k_start + tile * {t.bk};
        {_loader(spec, "a")}
        {_loader(spec, "b")}
      }}
    }}""")
        else:  # in the loop body, k-tile kt itself always exists: no guard
            guard = "" if (i, e.n) == ("kt", 0) else "if (tile < k_tiles) "
            out.append(f"""{{  // compute k-tile {i} + {e.n}
      const int tile = {i} + {e.n};
      {guard}{{
        const int stage = tile % {schedule.stages};
        {_fragments(spec)}
      }}
    }}""")
    return "\n    ".join(out)


def render_source(spec: KernelSpec, schedule: Schedule | None = None) -> str:
    """The CUDA C++ source of ``spec``'s kernel, entry point ``spec.name``; ``schedule``
    defaults to ``spec.schedule`` (the NumPy model runs the same one)."""
    t, ep = spec.tile, spec.epilogue
    schedule = schedule or spec.schedule
    wm0, wn0 = mp.warp_origin(Sym("warp"), t.wtm, t.wtn, t.warps_n)
    tm, tn, tz = mp.block_coords(Sym("bid"), spec.tiles_m, spec.tiles_n, spec.raster_group)
    c_t = "float" if spec.split_k > 1 else _c_type(ep.out)
    bias_t = _c_type(ep.bias_dtype)
    per_split = spec.k_per_split
    header = (f"// mpcompile kernel {spec.name}: {spec.kind.value} {spec.dtype} "
              f"m={spec.m} n={spec.n} k={spec.k} batch={spec.batch} split_k={spec.split_k}\n"
              f"// tile {t.bm}x{t.bn}x{t.bk}, warps {t.warps_m}x{t.warps_n}, stages {t.stages},"
              f" A {'k' if spec.a_kcontig else 'm'}-contiguous vec {spec.vec_a} "
              f"{spec.copy_path('a')}, B {'k' if spec.b_kcontig else 'n'}-contiguous vec "
              f"{spec.vec_b} {spec.copy_path('b')}\n"
              f"// epilogue {list(ep.ops)} -> {ep.out}; generated, do not edit\n")
    scale = ("  const float scale = *scale_ptr;\n" if "scale" in ep.ops else "")
    batch_off = ""
    if spec.kind is Kind.GEMM and spec.batch > 1:
        batch_off = (f"  A += (long long)batch * {spec.batch_stride_a};\n"
                     f"  B += (long long)batch * {spec.batch_stride_b};\n"
                     f"  C += (long long)batch * {spec.batch_stride_c};\n")
    return header + _PRELUDE + f"""
extern "C" __global__ void __launch_bounds__({t.threads}, {t.ctas_per_sm})
{spec.name}(const u16* __restrict__ A, const u16* __restrict__ B, {c_t}* __restrict__ C,
    const {bias_t}* __restrict__ bias, const float* __restrict__ scale_ptr) {{
  extern __shared__ __align__(128) u16 smem[];
  u16* sA = smem;
  u16* sB = smem + {t.stages * t.bm * t.bk};
  const u32 sA_u = smem_u32(sA);  // 32-bit shared-memory addresses
  const u32 sB_u = smem_u32(sB);
  (void)sA_u; (void)sB_u;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int bid = blockIdx.x;
  const int m0 = opaque({render(tm)}) * {t.bm};
  const int n0 = opaque({render(tn)}) * {t.bn};
  const int z = {render(tz)};
  const int batch = z / {spec.split_k};
  const int split = z % {spec.split_k};
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

{_fragment_setup(spec)}{_setup(spec, "a")}{_setup(spec, "b")}
  // pipeline prologue: {schedule.depth} k-tiles in flight
  #pragma unroll
  for (int s = 0; s < {schedule.depth}; ++s) {{
    {_events(spec, schedule, schedule.prologue, "s")}
  }}
  #pragma unroll 1  // one k-tile per iteration: unrolling doubles the live addresses
  for (int kt = 0; kt < k_tiles; ++kt) {{
    {_events(spec, schedule, schedule.body, "kt")}
  }}
  {_events(spec, schedule, schedule.drain, "k_tiles")}
{_epilogue(spec)}
}}
"""
