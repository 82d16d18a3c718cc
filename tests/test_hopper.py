"""The Hopper (sm_90a) GEMM path: layouts against the PTX ISA, the NumPy model against float64
matmuls on ragged shapes, the mbarrier pipeline protocol as data (the model runs it under every
interleaving on ragged work and rejects each single mutation of it; the rendered C++ is read back
and must say what the data says), the staged 16-byte epilogue, tensor-map arguments, refusals,
and NVRTC -> cubin -> SASS (HGMMA with FP32 accumulation, TMA, mbarriers, setmaxnreg, STG.E.128
when staged, no spills). Four kernels compile by default; the sweep is ``-m slow``; the launch
against torch.matmul is ``-m gpu``."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from mpcompile.codegen import hopper, hopper_model, hopper_protocol
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
from mpcompile.dtypes import info as dtype_info
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
    with pytest.raises(hopper_model.HopperModelError, match="did not write|overwritten|read for"):
        hopper_model.run(spec, SMALL, a, b)
    assert waits


# -- the pipeline protocol as data ------------------------------------------------------------

P = hopper_protocol
Op = P.Op


def _mutate(protocol, part, index, **change):
    """``protocol`` with step ``index`` of ``part`` (producer, consumer, drain) replaced by
    a copy with ``change`` (or removed, for ``change == {}``)."""
    steps = list(getattr(protocol, part))
    if change:
        steps[index] = dataclasses.replace(steps[index], **change)
    else:
        del steps[index]
    return dataclasses.replace(protocol, **{part: tuple(steps)})


def _find(protocol, part, op, bar=None):
    return next(i for i, s in enumerate(getattr(protocol, part))
                if s.op is op and (bar is None or s.bar == bar))


def _count(protocol, name, count):
    return dataclasses.replace(protocol, barriers=tuple(
        dataclasses.replace(b, count=count) if b.name == name else b for b in protocol.barriers))


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("stages,consumers", [(2, 1), (2, 2), (4, 2), (6, 1)])
@pytest.mark.parametrize("k_tiles,tiles", [(1, 1), (1, 5), (3, 0), (3, 2), (5, 3), (13, 2)])
def test_protocol_never_deadlocks_under_any_interleaving(stages, consumers, k_tiles, tiles,
                                                         staged):
    """The kernel's protocol on ragged work: a CTA with no tile, a single k-tile, K shorter than
    the ring (k_tiles < stages), the ring wrapping inside and across tiles; every interleaving
    of producer, TMA unit and consumers finishes, every stage read holds its k-tile, no stage is
    overwritten under a wgmma, every barrier phase completes on exactly its arrivals; the
    staged epilogue's stage is not refilled under it."""
    protocol = P.Protocol.for_ring(stages, consumers, 49152, staged=staged)
    hopper_model.check_protocol(protocol, k_tiles, tiles, _BOXES)


@pytest.mark.parametrize("stages,in_flight", [(3, 2), (4, 3), (5, 2)])
@pytest.mark.parametrize("k_tiles", [1, 2, 9])
def test_protocol_with_deeper_wgmma_pipelines(stages, in_flight, k_tiles):
    """``wait_group n`` with the release n k-tiles back and a drain releasing the last n (or
    fewer, when the tile has fewer k-tiles) is sound for stages > n; stages == n deadlocks."""
    p = P.Protocol.for_ring(stages, 2, 49152, in_flight=in_flight)
    hopper_model.check_protocol(p, k_tiles, 3, _BOXES)
    tight = P.Protocol.for_ring(in_flight, 2, 49152, in_flight=in_flight)
    with pytest.raises(hopper_model.HopperModelError, match="deadlock"):
        hopper_model.check_protocol(tight, in_flight + 1, 1, _BOXES)


def test_protocol_of_a_spec_is_what_the_kernel_loads():
    spec = gemm(1000, 1000, 1000, "float16", "col", "row")
    for cfg in hopper.PRESETS:
        p = hopper.protocol_for(spec, cfg)
        assert (p.stages, p.consumers) == (cfg.stages, cfg.consumers)
        tx = [s.n for s in p.producer if s.op is Op.EXPECT_TX]
        assert tx == [(cfg.bm + cfg.bn) * cfg.bk * 2]
        assert p.barrier("empty").count == 4 * cfg.consumers and p.barrier("full").count == 1
        boxes = tuple(pl.box_bytes for o in "ab" for pl in [hopper.operand_plan(spec, cfg, o)]
                      for _ in range(pl.boxes))
        assert sum(boxes) == tx[0]
        hopper_model.check_protocol(p, cfg.stages + 1, 2, boxes)


_BOXES = (16384, 32768)  # A 128x64 and B 256x64 boxes of 16-bit elements: 49152 bytes
_GOOD = P.Protocol.for_ring(3, 2, 49152)
_MUTANTS = {  # name: (mutated protocol, what the model reports)
    "empty count one short": (_count(_GOOD, "empty", 7), "without"),
    "empty count one over": (_count(_GOOD, "empty", 9), "deadlock"),
    "empty count one warpgroup": (_count(_GOOD, "empty", 4), "without"),
    "full count 2": (_count(_GOOD, "full", 2), "deadlock"),
    "producer waits parity phase": (
        _mutate(_GOOD, "producer", _find(_GOOD, "producer", Op.WAIT), n=0), "deadlock"),
    "consumer waits parity phase^1": (
        _mutate(_GOOD, "consumer", _find(_GOOD, "consumer", Op.WAIT), n=1),
        "read for k-tile|overwritten|deadlock"),
    "release before retiring": (
        _mutate(_GOOD, "consumer", _find(_GOOD, "consumer", Op.RELEASE), n=0), "overwritten"),
    "wait_group 2 with release lag 1": (
        _mutate(_GOOD, "consumer", _find(_GOOD, "consumer", Op.WAIT_GROUP), n=2),
        "overwritten"),
    "release lag 3 = stages": (
        _mutate(_GOOD, "consumer", _find(_GOOD, "consumer", Op.RELEASE), n=3), "deadlock"),
    "release per warpgroup": (
        _mutate(_GOOD, "consumer", _find(_GOOD, "consumer", Op.RELEASE), unit="warpgroup"),
        "deadlock"),
    "release per thread": (
        _mutate(_GOOD, "consumer", _find(_GOOD, "consumer", Op.RELEASE), unit="thread"),
        "more arrivals|without"),
    "release of the wrong barrier": (
        _mutate(_GOOD, "consumer", _find(_GOOD, "consumer", Op.RELEASE), bar="full"),
        "more arrivals|without|deadlock"),
    "expect_tx bytes low": (
        _mutate(_GOOD, "producer", _find(_GOOD, "producer", Op.EXPECT_TX), n=49152 - 16),
        "more bytes"),
    "expect_tx bytes high": (
        _mutate(_GOOD, "producer", _find(_GOOD, "producer", Op.EXPECT_TX), n=49152 + 16),
        "deadlock"),
    "no drain release": (_mutate(_GOOD, "drain", _find(_GOOD, "drain", Op.RELEASE)),
                         "deadlock"),
    "no drain wait_group": (_mutate(_GOOD, "drain", _find(_GOOD, "drain", Op.WAIT_GROUP)),
                            "in flight"),
    "no fence": (_mutate(_GOOD, "consumer", _find(_GOOD, "consumer", Op.FENCE)), "fence"),
    "no producer wait": (_mutate(_GOOD, "producer", _find(_GOOD, "producer", Op.WAIT)),
                         "overwritten|read for k-tile"),
}


@pytest.mark.parametrize("name", sorted(_MUTANTS))
def test_model_rejects_a_mutated_protocol(name):
    """Each single mutation of the protocol data makes the model raise (and the original
    passes the same runs: see the test above)."""
    protocol, match = _MUTANTS[name]
    with pytest.raises(hopper_model.HopperModelError, match=match):
        hopper_model.check_protocol(protocol, 7, 3, _BOXES)


def test_model_data_path_runs_the_given_protocol():
    """``run`` executes the protocol it is given: announcing only A's bytes fails on the real
    TMA boxes (B's box completes more bytes than announced)."""
    spec = gemm(64, 64, 128)
    _, _, a, b = operands(spec, np.random.default_rng(7))
    good = hopper.protocol_for(spec, SMALL)
    a_bytes = hopper.operand_plan(spec, SMALL, "a").stage_bytes
    low = _mutate(good, "producer", _find(good, "producer", Op.EXPECT_TX), n=a_bytes)
    with pytest.raises(hopper_model.HopperModelError, match="more bytes"):
        hopper_model.run(spec, SMALL, a, b, protocol=low)
    for policy in hopper_model.POLICIES:  # and the good one under every interleaving
        hopper_model.run(spec, SMALL, a, b, protocol=good, policy=policy)


def test_model_and_sass_of_a_two_group_wgmma_pipeline():
    """The deeper protocol (wait_group 2, release two k-tiles back) computes the product in the
    model, and its kernel's SASS waits with WARPGROUP.DEPBAR.LE gsb0, 0x2: the depth comes from
    the data."""
    cfg = hopper.HopperConfig(bm=128, bn=64, stages=3)
    spec = gemm(150, 100, 64 * 5, "float16", "row", "col", out="float32")
    p = P.Protocol.for_ring(3, 2, (128 + 64) * 64 * 2, in_flight=2)
    a_mat, b_mat, a, b = operands(spec, np.random.default_rng(8))
    got = hopper_model.run(spec, cfg, a, b, grid=2, protocol=p, policy="eager_producer")
    np.testing.assert_allclose(got.reshape(spec.m, spec.ldc), a_mat @ b_mat, rtol=1e-12,
                               atol=1e-9)
    from mpcompile.runtime import nvrtc

    compiled = nvrtc.compile_cubin(hopper.render_hopper(spec, cfg, protocol=p),
                                   hopper.kernel_name(spec, cfg), hopper.ARCH)
    code = sass.disassemble(compiled.cubin)
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x2" in code and "gsb0, 0x1" not in code
    assert (compiled.info.spill_stores, compiled.info.stack_frame) == (0, 0)


@pytest.mark.parametrize("k", [40, 64, 200])
def test_model_k_shorter_than_the_ring(k):
    """A single (partial) k-tile, exactly one, and 4 k-tiles through a 6-stage ring."""
    cfg = hopper.PRESETS[1]  # 128 x 128, 6 stages
    rng = np.random.default_rng(k)
    spec = gemm(130, 140, k, "bfloat16", "row", "row", out="float32")
    a_mat, b_mat, a, b = operands(spec, rng)
    got = hopper_model.run(spec, cfg, a, b, grid=2, policy="lazy_tma")
    np.testing.assert_allclose(got.reshape(spec.m, spec.ldc), a_mat @ b_mat, rtol=1e-12,
                               atol=1e-9)


_STAGED = P.Protocol.for_ring(3, 2, 49152, staged=True)


@pytest.mark.parametrize("mutation,match", [
    ("release before the store", "released before the epilogue|overwritten"),
    ("release in the drain", "released before the epilogue|overwritten"),
    ("store through the stage 2 back", "released before the epilogue|overwritten"),
    ("store before the drain's wait_group", "in flight")])
def test_model_rejects_a_misplaced_staged_epilogue(mutation, match):
    """The staged epilogue reuses the last k-tile's stage: released any earlier, the producer
    refills it under the epilogue's feet (the good protocol passes the same runs)."""
    hopper_model.check_protocol(_STAGED, 7, 3, _BOXES)
    store, release = _STAGED.epilogue
    p = {"release before the store": dataclasses.replace(_STAGED, epilogue=(release, store)),
         "release in the drain": dataclasses.replace(
             _STAGED, drain=(*_STAGED.drain, release), epilogue=(store,)),
         "store through the stage 2 back": dataclasses.replace(
             _STAGED, epilogue=(dataclasses.replace(store, n=2), release)),
         "store before the drain's wait_group": dataclasses.replace(
             _STAGED, drain=(), epilogue=(store, release))}[mutation]
    with pytest.raises(hopper_model.HopperModelError, match=match):
        hopper_model.check_protocol(p, 7, 3, _BOXES)


@pytest.mark.parametrize("out,n,ldc", [("bfloat16", 203, 208), ("float32", 130, 132),
                                       ("float16", 64, 64)])
def test_model_staged_epilogue_matches_the_direct_one(out, n, ldc):
    """16-byte stores through shared memory, ragged N inside an aligned ldc, two m64 blocks per
    warpgroup: the same output as the register epilogue and the float64 product."""
    cfg = hopper.HopperConfig(bm=256, bn=128, stages=2)
    spec = gemm(300, n, 100, "float16", "row", "col", ops=("bias_n", "relu"), out=out,
                ldc=ldc)
    assert hopper.staged_epilogue(spec)
    rng = np.random.default_rng(n)
    a_mat, b_mat, a, b = operands(spec, rng)
    bias = rng.standard_normal(spec.n)
    staged = hopper.protocol_for(spec, cfg)
    assert staged.epilogue[0] == P.Step(Op.STORE, n=1)
    direct = P.Protocol.for_ring(cfg.stages, cfg.consumers, staged.producer[1].n)
    got = hopper_model.run(spec, cfg, a, b, bias=bias, grid=3, protocol=staged)
    np.testing.assert_array_equal(got, hopper_model.run(spec, cfg, a, b, bias=bias, grid=3,
                                                        protocol=direct))
    want = np.maximum(a_mat @ b_mat + bias, 0)
    want = want if out == "float32" else round_to(want, out)  # the model keeps FP32 in float64
    np.testing.assert_allclose(got.reshape(spec.m, ldc)[:, :n], want, rtol=1e-12, atol=1e-12)
    assert (got.reshape(spec.m, ldc)[:, n:] == 0).all()  # the padding columns are not written


def test_model_refuses_a_staged_epilogue_on_unaligned_rows():
    spec = gemm(64, 60, 64, ldc=60)  # 120-byte rows: the kernel uses the register epilogue
    _, _, a, b = operands(spec, np.random.default_rng(9))
    staged = P.Protocol.for_ring(SMALL.stages, SMALL.consumers, (128 + 64) * 128, staged=True)
    with pytest.raises(hopper_model.HopperModelError, match="misaligned"):
        hopper_model.run(spec, SMALL, a, b, protocol=staged)
    hopper_model.run(spec, SMALL, a, b)  # its own protocol stores from registers


def test_staged_epilogue_needs_aligned_rows():
    assert hopper.staged_epilogue(gemm(64, 64, 64, ldc=64))
    assert not hopper.staged_epilogue(gemm(64, 60, 64, ldc=60))  # 120 bytes per row
    assert hopper.staged_epilogue(gemm(64, 60, 64, out="float32", ldc=60))  # 240 bytes
    assert tma.c_alignment(gemm(64, 64, 64, ldc=64)) == 16
    assert tma.c_alignment(gemm(64, 60, 64, ldc=60)) == 4


def _protocol_in_source(src: str) -> dict:
    """What the rendered kernel does with its mbarriers, read back from the C++."""
    producer = src[src.index("// producer warpgroup"):src.index("// consumer warpgroups")]
    consumer = src[src.index("// consumer warpgroups"):]
    body = consumer[consumer.index("for (int kt"):consumer.index("wgmma_wait<", consumer.index(
        "wgmma_commit"))]
    loop_end = consumer.index("\n      }\n", consumer.index("for (int kt"))
    epilogue_at = min(consumer.find(mark, loop_end) % len(consumer)
                      for mark in ("{  // staged epilogue", "#pragma unroll"))
    drain, epilogue = consumer[loop_end:epilogue_at], consumer[epilogue_at:]
    waits = r"mbar_wait\((\w+)0 \+ 8 \* stage, phase( \^ 1)?\)"
    release = r"mbar_arrive\((\w+)0 \+ 8 \* \((?:\(stage \+ (\d+)\) % \d+|stage)\)\)"
    stages = int(re.search(r"if \(\+\+stage == (\d+)\)", producer).group(1))
    return {
        "init": dict((n, int(c)) for n, c in re.findall(r"mbar_init\((\w+)0 \+ 8 \* s, (\d+)\)",
                                                       src)),
        "producer_waits": [(n, int(bool(f))) for n, f in re.findall(waits, producer)],
        "consumer_waits": [(n, int(bool(f))) for n, f in re.findall(waits, body)],
        "expect_tx": [(n, int(b)) for n, b in
                      re.findall(r"mbar_expect_tx\((\w+)0 \+ 8 \* stage, (\d+)u\)", producer)],
        "tma_barrier": re.findall(r"const u32 bar = (\w+)0 \+ 8 \* stage", producer),
        "wait_groups": [int(n) for n in re.findall(r"wgmma_wait<(\d+)>", consumer)],
        "releases": [(n, (stages - int(s or stages)) % stages)
                     for n, s in re.findall(release, consumer[:loop_end])],
        "drain_releases": [(n, (stages - int(s or stages)) % stages)
                           for n, s in re.findall(release, drain)],
        "epilogue_releases": [(n, (stages - int(s or stages)) % stages)
                              for n, s in re.findall(release, epilogue)],
        "staged_through": [(stages - int(s or stages)) % stages for s in re.findall(
            r"16-byte stores through stage (?:\(stage \+ (\d+)\) % \d+|stage)", epilogue)],
        "guards": re.findall(r"if \((.*)\) mbar_arrive", consumer),
    }


def _protocol_expected(p, k_tiles: int) -> dict:
    def waits(steps):
        return [(s.bar, s.n) for s in steps if s.op is Op.WAIT]

    def releases(steps):
        return [(s.bar, s.n % p.stages) for s in steps if s.op is Op.RELEASE]

    def guards(steps, i):
        out, advanced = [], False
        for s in steps:
            advanced |= s.op is Op.ADVANCE
            if s.op is Op.RELEASE:  # the k-tile s.n back exists from k-tile s.n (- 1) on
                first = [f"kt{' + 1' if advanced else ''} >= {s.n}"] if s.n > advanced else []
                if i is None or i >= s.n:
                    out.append(" && ".join(first * (i is None) + [
                        {"warp": "(threadIdx.x & 31) == 0", "warpgroup": "t == 0"}[s.unit]]))
        return out

    return {
        "guards": guards(p.consumer, None) + guards(p.drain, k_tiles) +
        guards(p.epilogue, k_tiles),
        "init": {b.name: b.count for b in p.barriers},
        "producer_waits": waits(p.producer), "consumer_waits": waits(p.consumer),
        "expect_tx": [(s.bar, s.n) for s in p.producer if s.op is Op.EXPECT_TX],
        "tma_barrier": [s.bar for s in p.producer if s.op is Op.LOAD],
        "wait_groups": [s.n for s in (*p.consumer, *p.drain) if s.op is Op.WAIT_GROUP],
        "releases": releases(p.consumer),
        "drain_releases": releases(s for s in p.drain if s.op is not Op.RELEASE
                                   or s.n <= k_tiles),
        "epilogue_releases": releases(p.epilogue),
        "staged_through": [s.n % p.stages for s in p.epilogue if s.op is Op.STORE and s.n],
    }


_DEEP = P.Protocol.for_ring(3, 2, (128 + 64) * 64 * 2, in_flight=2)


@pytest.mark.parametrize("k", [500, 64])
@pytest.mark.parametrize("mutant", ["", "in flight 2", "staged lag 2", "direct",
                                    "empty count one short", "full count 2",
                                    "producer waits parity phase",
                                    "consumer waits parity phase^1", "release lag 3 = stages",
                                    "wait_group 2 with release lag 1", "expect_tx bytes low",
                                    "release of the wrong barrier", "release per warpgroup"])
def test_rendered_kernel_takes_its_protocol_from_the_data(mutant, k):
    """Not a snapshot: the init counts, wait parities, expect_tx bytes, the TMA loads' barrier,
    wait_group depths, release stages and which threads release from which k-tile on, read back
    from the C++, are the protocol's, for the
    kernel's own protocol and for mutants of it (so none is a constant in the renderer)."""
    spec = gemm(300, 200, k, "float16", "row", "col")  # 8 k-tiles or 1
    cfg = hopper.HopperConfig(bm=128, bn=64, stages=3)
    own = hopper.protocol_for(spec, cfg)
    store, release = own.epilogue
    p = {"": own, "in flight 2": _DEEP,
         "staged lag 2": dataclasses.replace(own, epilogue=(
             dataclasses.replace(store, n=2), release)),
         "direct": P.Protocol.for_ring(3, 2, (128 + 64) * 64 * 2)}.get(mutant) or \
        _MUTANTS[mutant][0]
    if not mutant:  # ldc * 2 bytes = 400: a multiple of 16, so the epilogue is staged
        assert p == P.Protocol.for_ring(3, 2, (128 + 64) * 64 * 2, staged=True)
    got = _protocol_in_source(hopper.render_hopper(spec, cfg, protocol=p))
    assert got == _protocol_expected(p, -(-k // 64))


def test_renderer_refuses_a_protocol_that_does_not_fit_the_config():
    spec = gemm(300, 200, 500)
    with pytest.raises(P.ProtocolError, match="does not fit"):
        hopper.render_hopper(spec, SMALL, protocol=P.Protocol.for_ring(3, 2, 1024))
    with pytest.raises(P.ProtocolError, match="exactly one load"):
        P.Protocol(2, 1, (P.Barrier("full", 1),), (P.Step(Op.ADVANCE),),
                   (P.Step(Op.MMA), P.Step(Op.ADVANCE)), ())
    with pytest.raises(P.ProtocolError, match="no barrier 'half'"):
        _mutate(_GOOD, "consumer", _find(_GOOD, "consumer", Op.RELEASE), bar="half")
    with pytest.raises(P.ProtocolError, match="parity flip"):
        P.Step(Op.WAIT, "full", 2)


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
    # fence.mbarrier_init, and in the staged epilogue fence.proxy.async before the stage refill
    fences = code.count("FENCE.VIEW.ASYNC.S")
    if hopper.staged_epilogue(spec):  # 16-byte stores from the named-barrier-synced staging
        ob = dtype_info(spec.epilogue.out).torch.itemsize
        chunks = config.m_repeats * config.bn * ob // 128
        assert code.count("STG.E.128") == code.count("LDS.128") == 4 * chunks  # 4 passes
        assert code.count("BAR.SYNC") == 1 + 2 * chunks  # __syncthreads + 2 per chunk
        assert fences == 2
    else:
        assert "STG.E.128" not in code and code.count("BAR.SYNC") == 1 and fences == 1


def test_compile_fp16_128x256_m_major_a_bias_relu():
    spec = gemm(1000, 1000, 1000, "float16", "col", "col", ops=("bias_n", "relu"),
                bias_dtype="float16")
    _sass_checks(spec, hopper.PRESETS[0])


def test_compile_bf16_128x128_n_major_b_scale_fp32_out():
    spec = gemm(999, 1001, 1000, "bfloat16", "row", "row", ops=("scale",), out="float32",
                ldc=1001)
    _sass_checks(spec, hopper.PRESETS[1])


def test_compile_fp16_staged_fp32_out_two_m64_blocks():
    spec = gemm(1000, 1001, 1000, "float16", "row", "col", ops=("bias_n",), out="float32",
                ldc=1004)  # 4016-byte rows: the 16-byte staged stores
    _sass_checks(spec, hopper.HopperConfig(bm=256, bn=128, stages=4))


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
