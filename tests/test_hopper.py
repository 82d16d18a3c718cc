"""The Hopper (sm_90a) GEMM path: layouts against the PTX ISA, the NumPy model against float64
matmuls on ragged shapes, tensor-map arguments, refusals, and NVRTC -> cubin -> SASS (HGMMA with
FP32 accumulation, TMA, mbarriers, setmaxnreg, no spills). Two kernels compile by default; the
sweep is ``-m slow``; the launch against torch.matmul is ``-m gpu``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mpcompile.codegen import hopper, hopper_model
from mpcompile.codegen import wgmma as wg
from mpcompile.codegen.epilogue import round_to
from mpcompile.codegen.spec import (
    Conv,
    Epilogue,
    KernelSpec,
    SpecError,
    conv_gemm_shape,
    widest_vec,
)
from mpcompile.errors import KernelError
from mpcompile.runtime import sass, tma

# -- helpers ------------------------------------------------------------------------------------


def pad8(x: int) -> int:
    return -(-x // 8) * 8


def gemm(m, n, k, dtype="float16", a_layout="row", b_layout="col", ops=(), out=None,
         bias_dtype="float32", lda=None, ldb=None, ldc=None) -> KernelSpec:
    lda = lda or pad8(k if a_layout == "row" else m)
    ldb = ldb or pad8(n if b_layout == "row" else k)
    ldc = ldc or n
    return KernelSpec("gemm", dtype, m, n, k, a_layout=a_layout, b_layout=b_layout, lda=lda,
                      ldb=ldb, ldc=ldc, epilogue=Epilogue(tuple(ops), out or dtype, bias_dtype),
                      vec_a=widest_vec(k if a_layout == "row" else m, lda),
                      vec_b=widest_vec(n if b_layout == "row" else k, ldb))


def operands(spec: KernelSpec, rng):
    """Random A (m x k), B (k x n) rounded to the dtype, and their flat padded buffers."""
    a_mat = round_to(rng.standard_normal((spec.m, spec.k)), spec.dtype)
    b_mat = round_to(rng.standard_normal((spec.k, spec.n)), spec.dtype)
    if spec.a_layout == "row":
        a = np.full((spec.m, spec.lda), 7.0)
        a[:, :spec.k] = a_mat
    else:
        a = np.full((spec.k, spec.lda), 7.0)
        a[:, :spec.m] = a_mat.T
    if spec.b_layout == "row":
        b = np.full((spec.k, spec.ldb), 7.0)
        b[:, :spec.n] = b_mat
    else:
        b = np.full((spec.n, spec.ldb), 7.0)
        b[:, :spec.k] = b_mat.T
    return a_mat, b_mat, a.ravel(), b.ravel()  # padding holds 7s: reading it shows


def cute(shape, stride, coord_mn, coord_k):
    """Evaluate a 2-mode CuTe layout ((s0, s1, ...), (t0, ...)) : ((d0, ...), (e0, ...)) at
    (mn, k), each mode's coordinate split colexicographically (first sub-mode fastest)."""
    out = 0
    for shapes, strides, c in ((shape[0], stride[0], coord_mn), (shape[1], stride[1], coord_k)):
        for s, d in zip(shapes, strides, strict=True):
            out = out + (c % s) * d
            c = c // s
    return out


# -- layouts against the PTX ISA -----------------------------------------------------------------


def test_accumulator_layout_is_the_isa_figure():
    """Figure 149 (m64nNk16, f32 D) as the CuTe thread/value layout
    ((4,8,4),(2,2,N/8)):((128,1,16),(64,8,512)) over a column-major 64xN tile."""
    n = 256
    t, i = np.meshgrid(np.arange(128), np.arange(n // 2), indexing="ij")
    row, col = wg.acc_coords(t, i)
    flat = cute(((4, 8, 4), (2, 2, n // 8)), ((128, 1, 16), (64, 8, 512)), t, i)
    np.testing.assert_array_equal(row, flat % 64)
    np.testing.assert_array_equal(col, flat // 64)
    seen = np.zeros((64, n), dtype=int)
    np.add.at(seen, (row, col), 1)
    assert (seen == 1).all()


@pytest.mark.parametrize("k_major", [True, False])
def test_canonical_layouts_are_the_isa_table(k_major):
    """9.7.15.5.1.2.1.3, 128B swizzling, T = 8 (16-bit elements), in element units:
    K-major ((8,m),(T,2k)):((8T,SBO),(1,T)); MN-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))."""
    lbo, sbo = 8192, 1024  # bytes
    if k_major:
        shape, stride = ((8, 4), (8, 8)), ((64, sbo // 2), (1, 8))
        mn, k = np.meshgrid(np.arange(32), np.arange(64), indexing="ij")
    else:
        shape, stride = ((8, 8, 4), (8, 2)), ((1, 8, lbo // 2), (64, sbo // 2))
        mn, k = np.meshgrid(np.arange(256), np.arange(16), indexing="ij")
    want = 2 * cute(shape, stride, mn, k)
    np.testing.assert_array_equal(wg.canonical_offset(mn, k, k_major, lbo, sbo), want)


def test_descriptor_bits_are_the_isa_format():
    """9.7.15.5.1.2.2: start, LBO, SBO as (x & 0x3FFFF) >> 4 at bits 0, 16, 32; swizzle at 62;
    the ISA's own example: LBO 256 bf16 -> 32, SBO 512 bf16 -> 64."""
    d = wg.descriptor(0x12400, 256 * 2, 512 * 2)
    assert d == 0x12400 >> 4 | 32 << 16 | 64 << 32 | 1 << 62
    assert wg.decode_descriptor(d) == {"start": 0x12400, "lbo": 512, "sbo": 1024,
                                       "base_offset": 0, "swizzle": 1}
    assert wg.descriptor(0x40000 + 0x400, 16, 1024) == wg.descriptor(0x400, 16, 1024)  # 18 bits
    assert wg.descriptor_constant(16, 1024) | wg.encode_field(0x400) == wg.descriptor(0x400, 16,
                                                                                     1024)


def test_swizzle_is_the_driver_pattern():
    """CU_TENSOR_MAP_SWIZZLE_128B: 16-byte chunk c of 128-byte row r lands in chunk c ^ (r % 8);
    a bijection on every 1024-byte block."""
    r, c, e = np.meshgrid(np.arange(16), np.arange(8), np.arange(16), indexing="ij")
    addr = wg.swizzle_128b(r * 128 + c * 16 + e)
    np.testing.assert_array_equal(addr, r * 128 + (c ^ (r % 8)) * 16 + e)
    np.testing.assert_array_equal(np.sort(addr.ravel()), np.arange(16 * 128))
    inner, outer = np.meshgrid(np.arange(64), np.arange(8), indexing="ij")
    np.testing.assert_array_equal(wg.tma_box_offset(inner, outer),
                                  wg.swizzle_128b(outer * 128 + inner * 2))


@pytest.mark.parametrize("tiles_m,tiles_n,group", [(7, 5, 3), (16, 16, 8), (1, 9, 8), (9, 1, 4)])
def test_tile_order_is_a_grouped_bijection(tiles_m, tiles_n, group):
    t = np.arange(tiles_m * tiles_n)
    m, n = wg.tile_coords(t, tiles_m, tiles_n, group)
    assert len(set(zip(m.tolist(), n.tolist(), strict=True))) == t.size
    assert m.max() < tiles_m and n.max() < tiles_n
    band = t // (group * tiles_n)  # each band of group*tiles_n tiles stays in its M rows
    assert ((m // group) == band).all()


# -- the NumPy model ---------------------------------------------------------------------------

SMALL = hopper.HopperConfig(bm=128, bn=64, stages=2)


@pytest.mark.parametrize("a_layout,b_layout", [("row", "col"), ("col", "row"), ("row", "row"),
                                               ("col", "col")])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_model_matches_float64_on_ragged_shapes(a_layout, b_layout, dtype):
    rng = np.random.default_rng(1)
    spec = gemm(200, 150, 136, dtype, a_layout, b_layout, ops=("scale", "bias_n", "relu"),
                out="float32", ldc=153)
    a_mat, b_mat, a, b = operands(spec, rng)
    bias = rng.standard_normal(spec.n)
    got = hopper_model.run(spec, SMALL, a, b, bias=bias, scale=0.5, grid=4)  # 8 tiles, 4 CTAs
    want = np.maximum((a_mat @ b_mat) * 0.5 + bias, 0)
    np.testing.assert_allclose(got.reshape(spec.m, spec.ldc)[:, :spec.n], want, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("config", [
    hopper.HopperConfig(bm=128, bn=192, stages=3, consumers=1, consumer_regs=240,
                        producer_regs=56),  # two m64 wgmmas per warpgroup, 3 B boxes
    hopper.HopperConfig(bm=256, bn=128, stages=2, group_m=2)])
def test_model_other_tiles_round_the_output(config):
    rng = np.random.default_rng(2)
    spec = gemm(300, 260, 72, "bfloat16", "col", "row", ops=("bias_n",), out="bfloat16",
                bias_dtype="bfloat16")
    a_mat, b_mat, a, b = operands(spec, rng)
    bias = round_to(rng.standard_normal(spec.n), "bfloat16")
    got = hopper_model.run(spec, config, a, b, bias=bias, grid=3).reshape(spec.m, spec.ldc)
    np.testing.assert_array_equal(got, round_to(a_mat @ b_mat + bias, "bfloat16"))


def test_model_long_k_wraps_the_ring_many_times():
    """120 k-tiles through 2 stages (60 phase flips per barrier), 2 tiles on one CTA."""
    rng = np.random.default_rng(5)
    spec = gemm(70, 100, 64 * 120, "float16", "row", "col", out="float32")
    a_mat, b_mat, a, b = operands(spec, rng)
    got = hopper_model.run(spec, SMALL, a, b, grid=1).reshape(spec.m, spec.ldc)
    np.testing.assert_allclose(got, a_mat @ b_mat, rtol=1e-12, atol=1e-9)


def test_model_catches_a_wrong_parity(monkeypatch):
    """A producer waiting for the wrong phase of ``empty`` never starts: deadlock is reported."""
    monkeypatch.setattr(hopper_model.MBarrier, "ready", lambda self, parity: self.phase == parity
                        if self.count > 1 else self.phase != parity)
    spec = gemm(64, 64, 128)
    _, _, a, b = operands(spec, np.random.default_rng(6))
    with pytest.raises(hopper_model.HopperModelError, match="deadlock"):
        hopper_model.run(spec, SMALL, a, b)


def test_model_catches_a_wrong_descriptor(monkeypatch):
    """The model is not the identity: shift the descriptors' K step and it refuses."""
    spec = gemm(64, 64, 64)
    _, _, a, b = operands(spec, np.random.default_rng(3))
    plan = hopper.OperandPlan.desc_offset
    monkeypatch.setattr(hopper.OperandPlan, "desc_offset",
                        lambda self, row0, ks: plan(self, row0, ks) + 16 * (self.operand == "b"))
    with pytest.raises(hopper_model.HopperModelError, match="reads one slot twice|did not"):
        hopper_model.run(spec, SMALL, a, b)


def test_model_catches_a_missing_wait(monkeypatch):
    """Without the mbarrier waits, consumers read stages the producer has not filled (or has
    refilled): the model's stage tags catch it."""
    spec = gemm(64, 64, 64 * 6)
    _, _, a, b = operands(spec, np.random.default_rng(4))
    waits = []

    class NoWait(hopper_model.MBarrier):
        def ready(self, parity):
            waits.append(parity)
            return True

    monkeypatch.setattr(hopper_model, "MBarrier", NoWait)
    with pytest.raises(hopper_model.HopperModelError, match="did not write"):
        hopper_model.run(spec, SMALL, a, b)
    assert waits


# -- tensor maps, configs, refusals --------------------------------------------------------------


@pytest.mark.parametrize("a_layout,b_layout", [("row", "col"), ("col", "row")])
def test_tensor_map_arguments(a_layout, b_layout):
    spec = gemm(1000, 3000, 520, "bfloat16", a_layout, b_layout, lda=1024, ldb=3008)
    cfg = hopper.PRESETS[0]  # 128 x 256 x 64
    ta, tb = tma.tensor_map_args(spec, cfg, "a"), tma.tensor_map_args(spec, cfg, "b")
    assert ta.data_type == tb.data_type == "CU_TENSOR_MAP_DATA_TYPE_BFLOAT16"
    if a_layout == "row":  # both K contiguous: one box per operand and stage
        assert (ta.dims, ta.strides, ta.box) == ((520, 1000), (2048,), (64, 128))
        assert (tb.dims, tb.strides, tb.box) == ((520, 3000), (6016,), (64, 256))
    else:  # M / N contiguous: 64-wide boxes, 2 for A and 4 for B per stage
        assert (ta.dims, ta.strides, ta.box) == ((1000, 520), (2048,), (64, 64))
        assert (tb.dims, tb.strides, tb.box) == ((3000, 520), (6016,), (64, 64))
    for t in (ta, tb):
        assert (t.swizzle, t.interleave, t.oob_fill) == (
            "CU_TENSOR_MAP_SWIZZLE_128B", "CU_TENSOR_MAP_INTERLEAVE_NONE",
            "CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE")
        assert t.element_strides == (1, 1) and t.rank == 2
    plans = [hopper.operand_plan(spec, cfg, o) for o in ("a", "b")]
    assert sum(p.stage_bytes for p in plans) == (cfg.bm + cfg.bn) * cfg.bk * 2  # expect_tx


def test_tensor_map_limits_are_refused():
    with pytest.raises(tma.TensorMapError, match="multiples of 16"):
        tma.TensorMapArgs("a", "CU_TENSOR_MAP_DATA_TYPE_FLOAT16", (10, 10), (20,), (8, 8))
    with pytest.raises(tma.TensorMapError, match="128B swizzle span"):
        tma.TensorMapArgs("a", "CU_TENSOR_MAP_DATA_TYPE_FLOAT16", (128, 10), (256,), (128, 8))
    with pytest.raises(tma.TensorMapError, match="box"):
        tma.TensorMapArgs("b", "CU_TENSOR_MAP_DATA_TYPE_FLOAT16", (64, 512), (128,), (64, 512))


def test_supports_refuses_what_the_kernel_cannot_do():
    assert hopper.supports(gemm(100, 100, 100)) is None
    cv = Conv(n=2, h=8, w=8, c=16, k=32, r=3, s=3, pad=(1, 1))
    m, n, k = conv_gemm_shape("conv_fprop", cv)
    conv = KernelSpec("conv_fprop", "float16", m, n, k, conv=cv)
    assert "convolution" in hopper.supports(conv)
    assert "lda=100" in hopper.supports(gemm(64, 64, 100, lda=100))
    assert "ldb=36" in hopper.supports(gemm(64, 36, 64, b_layout="row", ldb=36))
    batched = KernelSpec("gemm", "float16", 64, 64, 64, lda=64, ldb=64, ldc=64, batch=2,
                         batch_stride_a=4096, batch_stride_b=4096, batch_stride_c=4096)
    assert "batch" in hopper.supports(batched)
    split = KernelSpec("gemm", "float16", 64, 64, 512, lda=512, ldb=64, ldc=64, split_k=2,
                       epilogue=Epilogue((), "float32"))
    assert "split_k" in hopper.supports(split)
    with pytest.raises(KernelError, match="Hopper path: lda=100"):
        hopper.render_hopper(gemm(64, 64, 100, lda=100))


@pytest.mark.parametrize("kwargs,match", [
    ({"bk": 32}, "bk=32"), ({"stages": 5}, "shared memory"), ({"bn": 96}, "bn=96"),
    ({"consumers": 3}, "consumers=3"), ({"consumer_regs": 256}, "register budgets"),
    ({"bm": 512}, "bm=512"), ({"consumer_regs": 160}, "accumulator")])
def test_config_validation(kwargs, match):
    with pytest.raises(SpecError, match=match):
        hopper.HopperConfig(**kwargs)


# -- NVRTC -> cubin -> SASS ----------------------------------------------------------------------


def _sass_checks(spec: KernelSpec, config: hopper.HopperConfig) -> None:
    compiled = hopper.compile_hopper(spec, config)
    assert compiled.arch == "sm_90a"
    info = compiled.info
    assert (info.spill_stores, info.spill_loads, info.stack_frame) == (0, 0, 0), compiled.log
    assert "serialized" not in compiled.log, compiled.log  # ptxas kept the wgmmas async
    code = sass.disassemble(compiled.cubin)
    mma = sass.mma_instructions(code)
    low = "" if spec.dtype == "float16" else ".BF16"
    assert mma and set(mma) == {f"HGMMA.64x{config.bn}x16.F32{low}"}, set(mma)
    hgmma = [line for line in code.splitlines() if "HGMMA" in line]
    k_major_a, k_major_b = spec.a_layout == "row", spec.b_layout == "col"
    assert all((".tnspA" in h) != k_major_a and (".tnspB" in h) != k_major_b for h in hgmma)
    assert "UTMALDG.2D" in code  # TMA loads
    assert "SYNCS.PHASECHK.TRANS64.TRYWAIT" in code  # mbarrier try_wait.parity
    assert "SYNCS.ARRIVE.TRANS64" in code  # expect_tx / arrivals
    assert re.search(r"USETMAXREG\.TRY_ALLOC\.CTAPOOL\S* .*0x" + f"{config.consumer_regs:x}",
                     code), "consumer setmaxnreg.inc missing"
    assert re.search(r"USETMAXREG\.DEALLOC\.CTAPOOL .*0x" + f"{config.producer_regs:x}", code)
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in code  # one wgmma group kept in flight
    assert "HMMA" not in " ".join(m for m in mma if not m.startswith("HGMMA"))


def test_compile_fp16_128x256_m_major_a_bias_relu():
    spec = gemm(1000, 1000, 1000, "float16", "col", "col", ops=("bias_n", "relu"),
                bias_dtype="float16")
    _sass_checks(spec, hopper.PRESETS[0])


def test_compile_bf16_128x128_n_major_b_scale_fp32_out():
    spec = gemm(999, 1001, 1000, "bfloat16", "row", "row", ops=("scale",), out="float32",
                ldc=1001)
    _sass_checks(spec, hopper.PRESETS[1])


def test_sass_summary():
    spec = gemm(1000, 1000, 1000, "float16", "col", "col", ops=("bias_n", "relu"),
                bias_dtype="float16")
    s = hopper.hopper_sass_summary(spec, hopper.PRESETS[0])  # cached by the test above
    assert s["hgmma"] > 0 and s["hgmma_kinds"] == ["HGMMA.64x256x16.F32"]
    assert s["other_mma"] == [] and s["spill_stores"] == s["spill_loads"] == 0
    assert s["smem_bytes"] == hopper.PRESETS[0].smem_bytes <= hopper.SMEM_LIMIT
    assert s["registers"] <= 65536 // hopper.PRESETS[0].threads and not s["wgmma_serialized"]


@pytest.mark.slow
@pytest.mark.parametrize("a_layout,b_layout", [("row", "col"), ("col", "row"), ("row", "row"),
                                               ("col", "col")])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("config", [*hopper.PRESETS,
                                    hopper.HopperConfig(bm=256, bn=128, stages=4),
                                    hopper.HopperConfig(bm=128, bn=128, consumers=1, stages=6,
                                                        consumer_regs=240, producer_regs=56)])
@pytest.mark.parametrize("ops,out", [((), None), (("scale", "bias_n", "gelu"), "float32"),
                                     (("bias_n", "gelu_tanh", "round"), "float32")])
def test_compile_sweep(a_layout, b_layout, dtype, config, ops, out):
    spec = gemm(4096, 4096, 4096, dtype, a_layout, b_layout, ops=ops, out=out)
    _sass_checks(spec, config)


# -- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096, 4096), (1000, 3000, 520), (8192, 8192, 8192)])
@pytest.mark.parametrize("a_layout,b_layout", [("row", "col"), ("row", "row"), ("col", "col")])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_hopper_kernel_matches_torch_on_gpu(shape, a_layout, b_layout, dtype):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs sm_90")
    m, n, k = shape
    dev = torch.device("cuda")
    spec = gemm(m, n, k, dtype, a_layout, b_layout, ops=("scale", "bias_n", "relu"),
                bias_dtype=dtype)
    t = getattr(torch, dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    a_mat = torch.randn(m, k, device=dev, generator=gen).to(t)
    b_mat = torch.randn(k, n, device=dev, generator=gen).to(t)
    a = a_mat.contiguous() if a_layout == "row" else a_mat.t().contiguous()
    b = b_mat.contiguous() if b_layout == "row" else b_mat.t().contiguous()
    bias = torch.randn(n, device=dev, generator=gen).to(t)
    scale = torch.tensor([0.25], device=dev)
    c = torch.full((m, n), float("nan"), device=dev, dtype=t)
    config = hopper.PRESETS[0]
    loaded = tma.HopperLoaded(spec, config, hopper.compile_hopper(spec, config), dev)
    loaded(a, b, c, bias, scale)
    torch.cuda.synchronize()
    exact = a_mat.double() @ b_mat.double()
    ref = torch.relu(exact * 0.25 + bias.double())
    bound = (a_mat.double().abs() @ b_mat.double().abs()) * 0.25 * k * 2.0 ** -22 + \
        ref.abs() * 2 * torch.finfo(t).eps
    err = (c.double() - ref).abs()
    assert torch.isfinite(c).all()
    assert (err <= bound + 1e-6).all(), f"max error {err.max().item()}"
