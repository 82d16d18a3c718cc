"""The Hopper (sm_90a) GEMM kernel: TMA loads, an mbarrier pipeline and wgmma, persistent.

``C[M, N] = epilogue(A[M, K] @ B[K, N])`` with f16/bf16 operands and FP32 accumulation, rendered
as self-contained CUDA C++ with inline PTX (no headers, no CUTLASS):

- one producer warpgroup (its register budget lowered with ``setmaxnreg.dec``) of which one thread
  issues ``cp.async.bulk.tensor.2d`` (TMA) loads of each operand tile into a ring of ``stages``
  shared-memory buffers, 128-byte swizzled, each stage's ``full`` mbarrier told the byte count
  (``mbarrier.arrive.expect_tx``) and completed by the TMA unit (``complete_tx``); out-of-bounds
  elements of a box arrive as zeros, so ragged M, N and K need no predicates;
- ``consumers`` consumer warpgroups (``setmaxnreg.inc``) that wait on ``full``
  (``try_wait.parity``), issue ``wgmma.mma_async.m64nNk16.f32`` on shared-memory matrix
  descriptors, keep one wgmma group in flight (``wgmma.wait_group 1``) and release the stage
  read before it (each consumer warp arrives on the stage's ``empty`` mbarrier), then apply
  the epilogue in FP32 and store with bounds checks: when C's rows are 16-byte aligned, staged
  through the last k-tile's stage (released only afterwards) and written as 16-byte vectors
  (each warpgroup syncing on its own named barrier), else straight from the registers;
- a persistent grid (one CTA per SM, launched by ``runtime.tma.HopperLoaded``) walking the output
  tiles ``blockIdx.x, blockIdx.x + gridDim.x, ...`` in grouped (L2-friendly) order.

All layout math (the swizzle, descriptors, the accumulator fragment, the tile order) is in
``wgmma.py``, shared with the NumPy model ``hopper_model.py``. The mbarrier pipeline (init
counts, wait parities, expect_tx bytes, wait_group depth, which stage a release arrives on) is
rendered step by step from a :class:`~.hopper_protocol.Protocol`, which the model executes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from ..dtypes import FLOAT32, info
from ..errors import KernelError
from . import wgmma as wg
from .epilogue import OPS
from .expr import Sym, render
from .hopper_protocol import Op, Protocol, ProtocolError, Step
from .render import CONVERSIONS, cvt_prefix
from .spec import KernelSpec, Kind, SpecError

ARCH = "sm_90a"
SMEM_LIMIT = 227 * 1024  # max dynamic shared memory per block on sm_90
REGISTERS = 64 * 1024  # register file per SM (one CTA per SM)
_ALIGN_SLACK = 1024  # the dynamic buffer is rounded up to the swizzle pattern's 1024 bytes
_BARRIERS_PER_STAGE = 2  # full and empty: 8 bytes each


@dataclass(frozen=True)
class HopperConfig:
    """CTA tile ``bm x bn x bk`` (bk = 64: one 128-byte swizzled row of 16-bit elements), a ring
    of ``stages`` buffers, ``consumers`` warpgroups splitting the tile's rows (each issues
    m64nBNk16 wgmmas for its ``bm / consumers`` rows), tiles taken in bands of ``group_m``
    M-blocks, and the register budgets ``setmaxnreg`` gives producer and consumer threads."""

    bm: int = 128
    bn: int = 256
    bk: int = 64
    stages: int = 4
    consumers: int = 2
    group_m: int = 8
    producer_regs: int = 40
    consumer_regs: int = 232

    def __post_init__(self) -> None:
        if self.bk != wg.ROW_ELEMS:
            raise SpecError(f"Hopper tile bk={self.bk}: must be {wg.ROW_ELEMS} (one 128-byte "
                            "swizzled row of 16-bit elements per K step)")
        if self.consumers not in (1, 2):
            raise SpecError(f"Hopper consumers={self.consumers}: use 1 or 2 warpgroups")
        if self.bm % (64 * self.consumers) or self.m_repeats not in (1, 2):
            raise SpecError(f"Hopper tile bm={self.bm}: each of the {self.consumers} consumer "
                            "warpgroups takes 64 or 128 rows (m64 wgmmas)")
        if self.bn % 64 or not 64 <= self.bn <= 256:
            raise SpecError(f"Hopper tile bn={self.bn}: use 64, 128, 192 or 256 (wgmma n <= 256, "
                            "64-column TMA boxes)")
        if not 2 <= self.stages <= 8:
            raise SpecError(f"Hopper stages={self.stages}: use 2..8")
        if self.group_m < 1:
            raise SpecError(f"Hopper group_m={self.group_m}: must be >= 1")
        for name in ("producer_regs", "consumer_regs"):
            r = getattr(self, name)
            if r % 8 or not 24 <= r <= 256:
                raise SpecError(f"Hopper {name}={r}: setmaxnreg takes a multiple of 8 in 24..256")
        total = wg.WARPGROUP * (self.producer_regs + self.consumers * self.consumer_regs)
        if total > REGISTERS:
            raise SpecError(f"Hopper register budgets need {total} registers (> {REGISTERS} per "
                            "SM): lower consumer_regs or producer_regs")
        if self.accumulators + 40 > self.consumer_regs:
            raise SpecError(f"Hopper tile {self.bm}x{self.bn}: {self.accumulators} accumulator "
                            f"registers leave too few of consumer_regs={self.consumer_regs}")
        if self.smem_bytes > SMEM_LIMIT:
            raise SpecError(f"Hopper tile {self.bm}x{self.bn}x{self.bk} x {self.stages} stages "
                            f"needs {self.smem_bytes} B of shared memory (> {SMEM_LIMIT}): use "
                            "fewer stages")

    @property
    def threads(self) -> int:
        return wg.WARPGROUP * (1 + self.consumers)

    @property
    def rows_per_consumer(self) -> int:
        return self.bm // self.consumers

    @property
    def m_repeats(self) -> int:
        return self.rows_per_consumer // 64

    @property
    def accumulators(self) -> int:
        """FP32 accumulator registers per consumer thread."""
        return self.m_repeats * self.bn // 2

    @property
    def a_stage_bytes(self) -> int:
        return self.bm * self.bk * wg.ELEM_BYTES

    @property
    def b_stage_bytes(self) -> int:
        return self.bn * self.bk * wg.ELEM_BYTES

    @property
    def barrier_offset(self) -> int:
        return self.stages * (self.a_stage_bytes + self.b_stage_bytes)

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory to request: tiles, 2 mbarriers per stage, alignment slack."""
        return self.barrier_offset + 8 * _BARRIERS_PER_STAGE * self.stages + _ALIGN_SLACK


PRESETS = (HopperConfig(), HopperConfig(bn=128, stages=6))

# The architectures on which scripts/gpu_check.py has passed this kernel. Unlike the mma.sync
# kernel, whose waits cannot block forever, this one spins on mbarriers: a protocol mistake
# hangs the launch instead of giving a wrong answer that verification would catch. So
# Policy(kernels="auto") tries it only on an architecture listed here; kernels="on" tries it
# wherever ``supports`` allows. Empty until a GPU run passes it.
PROVEN_ON: tuple[str, ...] = ()


@dataclass(frozen=True)
class OperandPlan:
    """How one operand tile travels: TMA boxes of ``box = (inner, outer)`` elements (inner: the
    operand's contiguous dimension, 64 elements = 128 bytes), ``boxes`` of them per stage, each
    ``box_bytes`` after the previous; wgmma reads it K-major (``k_major``) or MN-major through
    descriptors with ``lbo`` / ``sbo``."""

    operand: str
    k_major: bool
    extent: int  # rows of the tile along M (A) or N (B)
    box: tuple[int, int]
    boxes: int
    lbo: int
    sbo: int

    @property
    def box_bytes(self) -> int:
        return self.box[0] * self.box[1] * wg.ELEM_BYTES

    @property
    def stage_bytes(self) -> int:
        return self.boxes * self.box_bytes

    @property
    def trans(self) -> int:
        """wgmma imm-trans-a / imm-trans-b: 1 for an MN-major operand."""
        return 0 if self.k_major else 1

    def load_coords(self, mn0, k0, j):
        """TMA coordinates (innermost first) of box ``j`` of the tile at (``mn0``, ``k0``)."""
        if self.k_major:
            return k0, mn0
        return mn0 + j * wg.ROW_ELEMS, k0

    def desc_offset(self, row0, ks):
        """Byte offset in the stage buffer where the wgmma operand starting at tile row ``row0``
        (a multiple of 64) and K step ``ks`` (16 elements each) begins."""
        if self.k_major:  # rows of 128 bytes; K advances inside the row (32 bytes per k16)
            return row0 * wg.SWIZZLE_BYTES + ks * 16 * wg.ELEM_BYTES
        return (row0 // wg.ROW_ELEMS) * self.box_bytes + ks * 16 * wg.SWIZZLE_BYTES

    @property
    def desc_constant(self) -> int:
        return wg.descriptor_constant(self.lbo, self.sbo)


def operand_plan(spec: KernelSpec, config: HopperConfig, operand: str) -> OperandPlan:
    """The plan of operand ``a`` or ``b``: A row-major / B column-major are K-major."""
    k_major = spec.a_layout == "row" if operand == "a" else spec.b_layout == "col"
    extent = config.bm if operand == "a" else config.bn
    if k_major:  # one box: 64 K-elements x all rows; 8-row groups 1024 bytes apart
        return OperandPlan(operand, True, extent, (wg.ROW_ELEMS, extent), 1, 16,
                           wg.SWIZZLE_ATOM_BYTES)
    box = (wg.ROW_ELEMS, config.bk)  # 64 MN-elements x bk K-rows per box, one box per 64 rows
    return OperandPlan(operand, False, extent, box, extent // wg.ROW_ELEMS,
                       box[0] * box[1] * wg.ELEM_BYTES, wg.SWIZZLE_ATOM_BYTES)


def supports(spec: KernelSpec) -> str | None:
    """None if the Hopper kernel computes ``spec``, else why not (for the caller's log)."""
    if spec.kind is not Kind.GEMM:
        return f"{spec.kind.value}: only plain GEMMs are on the Hopper path (convolutions: sm_80)"
    if spec.batch != 1:
        return f"batch={spec.batch}: batched GEMMs are not on the Hopper path yet"
    if spec.split_k != 1:
        return f"split_k={spec.split_k}: the persistent Hopper kernel does not split K"
    for name, ld in (("lda", spec.lda), ("ldb", spec.ldb)):
        if (ld * wg.ELEM_BYTES) % 16:
            return (f"{name}={ld}: TMA needs row strides that are multiples of 16 bytes "
                    "(8 elements); pad the operand")
    if max(spec.m, spec.n, spec.k, spec.lda, spec.ldb) >= 2 ** 31:
        return "a dimension or stride >= 2^31 does not fit the kernel's 32-bit coordinates"
    return None


def kernel_name(spec: KernelSpec, config: HopperConfig) -> str:
    key = json.dumps([spec.as_dict(), asdict(config)], sort_keys=True).encode()
    return f"mph_gemm_{spec.dtype}_{hashlib.sha256(key).hexdigest()[:12]}"


def check(spec: KernelSpec, config: HopperConfig) -> None:
    why = supports(spec)
    if why is not None:
        raise KernelError(f"kernel {spec.name} cannot use the Hopper path: {why}")
    if not isinstance(config, HopperConfig):
        raise KernelError(f"kernel {spec.name}: config must be a HopperConfig, got {config!r}")


def tiles(spec: KernelSpec, config: HopperConfig) -> tuple[int, int]:
    return -(-spec.m // config.bm), -(-spec.n // config.bn)


def protocol_for(spec: KernelSpec, config: HopperConfig) -> Protocol:
    """The mbarrier pipeline protocol of the kernel (``hopper_protocol``): ``full`` expects the
    bytes of both operands' boxes per stage."""
    a, b = operand_plan(spec, config, "a"), operand_plan(spec, config, "b")
    return Protocol.for_ring(config.stages, config.consumers, a.stage_bytes + b.stage_bytes,
                             staged=staged_epilogue(spec))


def _check_protocol(protocol: Protocol, config: HopperConfig) -> None:
    if (protocol.stages, protocol.consumers) != (config.stages, config.consumers):
        raise ProtocolError(f"protocol for {protocol.stages} stages / {protocol.consumers} "
                            f"consumers does not fit config {config}")
    if len(protocol.barriers) > _BARRIERS_PER_STAGE:
        raise ProtocolError(f"protocol has {len(protocol.barriers)} barriers per stage; the "
                            f"config reserves shared memory for {_BARRIERS_PER_STAGE}")


# Which threads arrive in a RELEASE (the first of each unit), as a C++ condition.
_UNIT_GUARD = {"thread": "", "warp": "(threadIdx.x & 31) == 0", "warpgroup": "t == 0"}


def _render_steps(steps: tuple[Step, ...], stages: int, i, code: dict) -> list[str]:
    """C++ statements of protocol steps run at k-tile position ``i`` (the loop variable ``kt``,
    or the int ``k_tiles`` in the drain and epilogue); ``stage`` / ``phase`` are the ring
    counters and ``code`` holds the statements of LOAD and MMA (which use ``bar`` / the stage)
    and, for STORE, a function of its lag."""
    out, advanced = [], False
    for s in steps:
        bar = f"{s.bar}0 + 8 * stage"
        if s.op is Op.WAIT:
            out.append(f"mbar_wait({bar}, phase{' ^ 1' if s.n else ''});")
        elif s.op is Op.EXPECT_TX:
            out.append(f"mbar_expect_tx({bar}, {s.n}u);")
        elif s.op is Op.LOAD:
            out.append(f"{{ const u32 bar = {bar};\n{code[Op.LOAD]}\n          }}")
        elif s.op is Op.FENCE:
            out.append("wgmma_fence();")
        elif s.op is Op.MMA:
            out.append(code[Op.MMA])
        elif s.op is Op.COMMIT:
            out.append("wgmma_commit();")
        elif s.op is Op.WAIT_GROUP:
            out.append(f"wgmma_wait<{s.n}>();")
        elif s.op is Op.RELEASE:  # the k-tile s.n before position i (+1 once advanced)
            back = s.n % stages
            target = f"(stage + {stages - back}) % {stages}" if back else "stage"
            conds = [_UNIT_GUARD[s.unit]] if _UNIT_GUARD[s.unit] else []
            if isinstance(i, int):
                if i + advanced < s.n:
                    continue
            elif s.n > int(advanced):
                conds.insert(0, f"{i}{' + 1' if advanced else ''} >= {s.n}")
            arrive = f"mbar_arrive({s.bar}0 + 8 * ({target}));"
            out.append(f"if ({' && '.join(conds)}) {arrive}" if conds else arrive)
        elif s.op is Op.ADVANCE:
            out.append(f"if (++stage == {stages}) {{ stage = 0; phase ^= 1; }}")
            advanced = True
        elif s.op is Op.STORE:
            out.append(code[Op.STORE](s.n))
    return out


_PRELUDE = CONVERSIONS + r"""
typedef unsigned long long u64;
struct __align__(64) TmaDesc { u64 opaque[16]; };  // CUtensorMap: 128 opaque bytes
struct __align__(8) f32x2 { float x, y; };

__device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 r; asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile("{\n .reg .pred done;\n WAIT:\n"
               " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               " @!done bra WAIT;\n}" :: "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void tma_load(u32 dst, const TmaDesc* map, u32 bar, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
               " [%0], [%1, {%3, %4}], [%2];"
               :: "r"(dst), "l"((u64)map), "r"(bar), "r"(c0), "r"(c1) : "memory");
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
struct __align__(16) u32x4 { u32 x, y, z, w; };
__device__ __forceinline__ void st_shared_b32(u32 a, u32 v) {
  asm volatile("st.shared.b32 [%0], %1;" :: "r"(a), "r"(v) : "memory");
}
__device__ __forceinline__ void st_shared_f32x2(u32 a, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};" :: "r"(a), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ u32x4 ld_shared_v4(u32 a) {
  u32x4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ u16 ld_shared_u16(u32 a) {
  u16 v; asm volatile("ld.shared.b16 %0, [%1];" : "=h"(v) : "r"(a) : "memory"); return v;
}
__device__ __forceinline__ float ld_shared_f32(u32 a) {
  float v; asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(a) : "memory"); return v;
}
__device__ __forceinline__ void fence_proxy_async() {  // generic-proxy smem use before TMA
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void bar_sync_warpgroup(int id) {  // named barrier, 128 threads
  asm volatile("bar.sync %0, 128;" :: "r"(id) : "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory");
}
"""


def _wgmma_fn(spec: KernelSpec, config: HopperConfig, a: OperandPlan, b: OperandPlan) -> str:
    """``wgmma_tile(acc, desc_a, desc_b)``: one m64nBNk16 MMA, FP32 accumulate (scale-d = 1)."""
    n_regs = config.bn // 2
    low = info(spec.dtype).short
    regs = ", ".join(f"%{i}" for i in range(n_regs))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n_regs))
    instr = (f"wgmma.mma_async.sync.aligned.m64n{config.bn}k16.f32.{low}.{low} "
             f"{{{regs}}}, %{n_regs}, %{n_regs + 1}, 1, 1, 1, {a.trans}, {b.trans};")
    return f"""
__device__ __forceinline__ void wgmma_tile(float (&d)[{n_regs}], u64 da, u64 db) {{
  asm volatile("{instr}"
      : {outs}
      : "l"(da), "l"(db));
}}"""


def _desc(plan: OperandPlan, base: str, row0, ks) -> str:
    """C++ u64 expression of the descriptor of ``plan``'s operand at (row0, ks) of a stage whose
    shared address is ``base``."""
    addr = Sym(base) + plan.desc_offset(row0, ks)
    return f"({plan.desc_constant:#x}ull | (u64){render(wg.encode_field(addr))})"


def staged_epilogue(spec: KernelSpec) -> bool:
    """Whether the kernel stages its output through shared memory and stores 16-byte vectors:
    every row of C must start 16-byte aligned (``ldc`` a multiple of 16 bytes; the launcher
    checks C's address)."""
    return spec.ldc * info(spec.epilogue.out).torch.itemsize % wg.STORE_BYTES == 0


def staging_base(config: HopperConfig, cw: int) -> int:
    """Where consumer ``cw`` stages its output in a stage's A buffer: over the first 64 of its own
    A rows (128 bytes each, K-major or in 64-row MN-major boxes alike), which no other
    consumer's wgmmas read."""
    return cw * config.rows_per_consumer * wg.SWIZZLE_BYTES


def _ops_code(spec: KernelSpec) -> str:
    ep = spec.epilogue
    low = info(spec.dtype).short
    return "\n              ".join(OPS[op].c.format(low=low, bias=cvt_prefix(ep.bias_dtype))
                                  for op in ep.ops)


def _staged_epilogue(spec: KernelSpec, config: HopperConfig, lag: int) -> str:
    """The epilogue through the A buffer of the stage ``lag`` k-tiles back (the last k-tile's,
    not released yet): per 64 x (128 bytes) chunk of the consumer's output, each thread writes
    its accumulator pairs (epilogue applied, converted) into the 128B-swizzled chunk, the
    warpgroup syncs on its named barrier (id 1 + cw, 128 threads), each thread copies 16-byte
    vectors to global memory (element stores at the ragged right edge), and syncs again before
    the chunk buffer is rewritten or the stage released; a proxy fence orders these generic
    shared-memory accesses before the TMA (async proxy) load that will refill the stage."""
    ep = spec.epilogue
    ob = info(ep.out).torch.itemsize
    cols = wg.SWIZZLE_BYTES // ob  # columns per chunk
    vec = wg.STORE_BYTES // ob
    stages = config.stages
    back = lag % stages
    target = f"(stage + {stages - back}) % {stages}" if back else "stage"
    row_t, col_t = wg.acc_coords(Sym("t"), Sym("i"))
    w_off = wg.staging_offset(Sym("rt"), Sym("ct") - Sym("j") * cols, ob)
    rr, cc = wg.store_vector(Sym("t"), Sym("p"))
    r_off = wg.staging_offset(Sym("rr"), Sym("cc") * vec, ob)
    off = render(spec.c_addr(Sym("row"), Sym("col")))
    own_rows = render(staging_base(config, Sym("cw")))
    if ob == 4:
        write = "st_shared_f32x2(so + wo, v[0], v[1]);"
        one = "C[off + e] = ld_shared_f32(so + ro + 4 * e);"
    else:
        cvt = f"f32_to_{info(ep.out).short}"
        write = f"st_shared_b32(so + wo, (u32){cvt}(v[0]) | ((u32){cvt}(v[1]) << 16));"
        one = "C[off + e] = ld_shared_u16(so + ro + 2 * e);"
    wide = "*(u32x4*)(C + off) = ld_shared_v4(so + ro);"
    if spec.n % vec == 0:  # a vector is all in or all out
        store = f"if (col < {spec.n}) {wide}"
    else:  # element stores at the ragged right edge
        store = (f"if (col + {vec} <= {spec.n}) {{ {wide} }} else {{ for (int e = 0; e < {vec}; "
                 f"++e) if (col + e < {spec.n}) {one} }}")
    return f"""
      {{  // staged epilogue: 16-byte stores through stage {target}'s A buffer
        const u32 so = smem + ({target}) * {config.a_stage_bytes} + {own_rows};
        #pragma unroll
        for (int r = 0; r < {config.m_repeats}; ++r)
          #pragma unroll
          for (int j = 0; j < {config.bn // cols}; ++j) {{
            #pragma unroll
            for (int i = j * {cols // 2}; i < (j + 1) * {cols // 2}; i += 2) {{
              const int rt = {render(row_t)};
              const int ct = {render(col_t)};
              float v[2];
              #pragma unroll
              for (int e = 0; e < 2; ++e) {{
                const int col = min(n0 + ct + e, {spec.n - 1});  // bias reads stay in bounds
                float x = acc[r][i + e];
              {_ops_code(spec)}
                (void)col;
                v[e] = x;
              }}
              const u32 wo = {render(w_off)};
              {write}
            }}
            bar_sync_warpgroup(1 + cw);
            #pragma unroll
            for (int p = 0; p < {wg.STORE_PASSES}; ++p) {{
              const int rr = {render(rr)};
              const int cc = {render(cc)};
              const int row = m0 + cw * {config.rows_per_consumer} + r * 64 + rr;
              const int col = n0 + j * {cols} + cc * {vec};
              const u32 ro = {render(r_off)};
              if (row < {spec.m}) {{
                const int off = {off};
                {store}
              }}
            }}
            bar_sync_warpgroup(1 + cw);
          }}
        fence_proxy_async();  // the producer's next TMA load into this stage follows our use
      }}"""


def _epilogue(spec: KernelSpec, config: HopperConfig) -> str:
    ep = spec.epilogue
    low = info(spec.dtype).short
    ops = "\n          ".join(OPS[op].c.format(low=low, bias=cvt_prefix(ep.bias_dtype))
                             for op in ep.ops)
    row, col = wg.acc_coords(Sym("t"), Sym("i"))
    paired = spec.n % 2 == 0 and spec.ldc % 2 == 0  # a column pair is all in or all out
    off = render(spec.c_addr(Sym("row"), Sym("col0")))
    if ep.out == FLOAT32.name:
        pair_store = "*(f32x2*)(C + off) = f32x2{v[0], v[1]};"
        one = "C[off + e] = v[e];"
    else:
        cvt = f"f32_to_{info(ep.out).short}"
        pair_store = f"*(u32*)(C + off) = (u32){cvt}(v[0]) | ((u32){cvt}(v[1]) << 16);"
        one = f"C[off + e] = {cvt}(v[e]);"
    if paired:
        store = f"if (col0 < {spec.n}) {{ {pair_store} }}"
    else:
        store = f"for (int e = 0; e < 2; ++e) if (col0 + e < {spec.n}) {one}"
    return f"""
      #pragma unroll
      for (int r = 0; r < {config.m_repeats}; ++r)
        #pragma unroll
        for (int i = 0; i < {config.bn // 2}; i += 2) {{
          const int row = m0 + cw * {config.rows_per_consumer} + r * 64 + {render(row)};
          const int col0 = n0 + {render(col)};
          if (row < {spec.m}) {{
            float v[2];
            #pragma unroll
            for (int e = 0; e < 2; ++e) {{
              const int col = min(col0 + e, {spec.n - 1});  // bias reads stay in bounds
              float x = acc[r][i + e];
              {ops}
              (void)col;
              v[e] = x;
            }}
            const int off = {off};
            {store}
          }}
        }}"""



def render_hopper(spec: KernelSpec, config: HopperConfig = PRESETS[0],
                  protocol: Protocol | None = None) -> str:
    """CUDA C++ source of the Hopper kernel for ``spec``, entry point ``kernel_name(...)``.
    Parameters: two ``const __grid_constant__`` tensor maps (A, B; see ``runtime.tma``), C, the
    bias vector and the scale pointer (either may be null when unused). The mbarrier pipeline is
    rendered step by step from ``protocol`` (default :func:`protocol_for`)."""
    check(spec, config)
    protocol = protocol or protocol_for(spec, config)
    _check_protocol(protocol, config)
    ep = spec.epilogue
    a, b = operand_plan(spec, config, "a"), operand_plan(spec, config, "b")
    tiles_m, tiles_n = tiles(spec, config)
    k_tiles = -(-spec.k // config.bk)
    mb, nb = wg.tile_coords(Sym("tile"), tiles_m, tiles_n, config.group_m)
    c_t = "float" if ep.out == FLOAT32.name else "u16"
    bias_t = "float" if ep.bias_dtype == FLOAT32.name else "u16"
    b_base = config.stages * a.stage_bytes
    bar = config.barrier_offset
    name = kernel_name(spec, config)
    loads = []
    for plan, mn0, tm, base, stride in ((a, "m0", "tmA", "0", a.stage_bytes),
                                        (b, "n0", "tmB", str(b_base), b.stage_bytes)):
        for j in range(plan.boxes):
            c0, c1 = plan.load_coords(Sym(mn0), Sym("k0"), j)
            loads.append(f"tma_load(smem + {base} + stage * {stride} + {j * plan.box_bytes}, "
                         f"&{tm}, bar, {render(c0)}, {render(c1)});")
    row0 = Sym("cw") * config.rows_per_consumer + Sym("r") * 64
    mma = f"""{{ const u32 sa = smem + stage * {a.stage_bytes};
          const u32 sb = smem + {b_base} + stage * {b.stage_bytes};
          #pragma unroll
          for (int ks = 0; ks < {config.bk // 16}; ++ks) {{
            const u64 db = {_desc(b, "sb", 0, Sym("ks"))};
            #pragma unroll
            for (int r = 0; r < {config.m_repeats}; ++r)
              wgmma_tile(acc[r], {_desc(a, "sa", row0, Sym("ks"))}, db);
          }}
        }}"""
    code = {Op.LOAD: "          " + "\n          ".join(loads), Op.MMA: mma,
            Op.STORE: lambda lag: (_staged_epilogue(spec, config, lag) if lag
                                   else _epilogue(spec, config))}
    ind = "\n          "
    producer = ind.join(_render_steps(protocol.producer, config.stages, "kt", code))
    consumer = "\n        ".join(_render_steps(protocol.consumer, config.stages, "kt", code))
    drain = "\n      ".join(_render_steps(protocol.drain, config.stages, k_tiles, code))
    epilogue = "\n      ".join(_render_steps(protocol.epilogue, config.stages, k_tiles, code))
    bars = "\n  ".join(f"const u32 {bar_.name}0 = smem + {bar + 8 * config.stages * j};"
                       for j, bar_ in enumerate(protocol.barriers))
    inits = "\n      ".join(f"mbar_init({bar_.name}0 + 8 * s, {bar_.count});"
                          for bar_ in protocol.barriers)
    tile_loop = f"for (int tile = blockIdx.x; tile < {tiles_m * tiles_n}; tile += gridDim.x)"
    scale = "  const float scale = *scale_ptr;\n" if "scale" in ep.ops else ""
    header = (f"// mpcompile Hopper kernel {name} (spec {spec.name}): gemm {spec.dtype} "
              f"m={spec.m} n={spec.n} k={spec.k}, A {spec.a_layout} lda={spec.lda}, "
              f"B {spec.b_layout} ldb={spec.ldb}, ldc={spec.ldc}\n"
              f"// tile {config.bm}x{config.bn}x{config.bk}, {config.stages} stages, "
              f"{config.consumers} consumer warpgroups, group_m {config.group_m}; epilogue "
              f"{list(ep.ops)} -> {ep.out}; generated, do not edit\n")
    return header + _PRELUDE + _wgmma_fn(spec, config, a, b) + f"""

extern "C" __global__ void __launch_bounds__({config.threads}, 1)
{name}(const __grid_constant__ TmaDesc tmA, const __grid_constant__ TmaDesc tmB,
    {c_t}* __restrict__ C, const {bias_t}* __restrict__ bias,
    const float* __restrict__ scale_ptr) {{
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const u32 smem = (smem_u32(smem_raw) + {_ALIGN_SLACK - 1}) & ~{_ALIGN_SLACK - 1}u;
  {bars}
  const int wgi = threadIdx.x / {wg.WARPGROUP};
  (void)bias; (void)scale_ptr;
  if (threadIdx.x == 0) {{
    #pragma unroll
    for (int s = 0; s < {config.stages}; ++s) {{
      {inits}
    }}
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }}
  __syncthreads();
  if (wgi == 0) {{  // producer warpgroup: one thread issues every TMA load
    asm volatile("setmaxnreg.dec.sync.aligned.u32 {config.producer_regs};");
    if (threadIdx.x == 0) {{
      asm volatile("prefetch.tensormap [%0];" :: "l"((u64)&tmA) : "memory");
      asm volatile("prefetch.tensormap [%0];" :: "l"((u64)&tmB) : "memory");
      int stage = 0;
      u32 phase = 0;
      {tile_loop} {{
        const int m0 = ({render(mb)}) * {config.bm};
        const int n0 = ({render(nb)}) * {config.bn};
        for (int kt = 0; kt < {k_tiles}; ++kt) {{
          const int k0 = kt * {config.bk};
          {producer}
        }}
      }}
    }}
  }} else {{  // consumer warpgroups
    asm volatile("setmaxnreg.inc.sync.aligned.u32 {config.consumer_regs};");
    const int cw = wgi - 1;
    const int t = threadIdx.x % {wg.WARPGROUP};
{scale}    int stage = 0;
    u32 phase = 0;
    {tile_loop} {{
      const int m0 = ({render(mb)}) * {config.bm};
      const int n0 = ({render(nb)}) * {config.bn};
      float acc[{config.m_repeats}][{config.bn // 2}];
      #pragma unroll
      for (int r = 0; r < {config.m_repeats}; ++r)
        #pragma unroll
        for (int i = 0; i < {config.bn // 2}; ++i) acc[r][i] = 0.f;
      for (int kt = 0; kt < {k_tiles}; ++kt) {{
        {consumer}
      }}
      {drain}
      {epilogue}
    }}
  }}
}}
"""


def compile_hopper(spec: KernelSpec, config: HopperConfig = PRESETS[0], use_cache: bool = True):
    """NVRTC -> cubin for sm_90a (``runtime.nvrtc.Compiled``)."""
    from ..runtime import nvrtc

    return nvrtc.compile_cubin(render_hopper(spec, config), kernel_name(spec, config), ARCH,
                               use_cache=use_cache)


def hopper_sass_summary(spec: KernelSpec, config: HopperConfig = PRESETS[0]) -> dict:
    """What the compiled kernel is, from ptxas and its SASS: HGMMA instructions (count and
    distinct mnemonics), registers, spills, stack, shared memory, and whether ptxas serialized
    the wgmmas (it warns when it must insert waits between them)."""
    from ..runtime import sass

    compiled = compile_hopper(spec, config)
    mma = sass.mma_instructions(sass.disassemble(compiled.cubin))
    hgmma = [m for m in mma if m.startswith("HGMMA")]
    return {
        "kernel": compiled.name, "arch": compiled.arch,
        "tile": f"{config.bm}x{config.bn}x{config.bk}", "stages": config.stages,
        "hgmma": len(hgmma), "hgmma_kinds": sorted(set(hgmma)),
        "other_mma": sorted(set(mma) - set(hgmma)),
        "registers": compiled.info.registers, "spill_stores": compiled.info.spill_stores,
        "spill_loads": compiled.info.spill_loads, "stack_frame": compiled.info.stack_frame,
        "smem_bytes": config.smem_bytes,
        "wgmma_serialized": "serialized" in compiled.log,
    }


__all__ = ["ARCH", "PRESETS", "HopperConfig", "OperandPlan", "compile_hopper",
           "hopper_sass_summary", "kernel_name", "operand_plan", "protocol_for", "render_hopper",
           "staged_epilogue", "supports", "tiles"]
