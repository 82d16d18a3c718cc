"""Generated tensor-core kernels, checked without a GPU: the PTX ISA fragment and ldmatrix
layouts; the epilogue table against formulas written here; the NumPy model of a kernel (the
mapping functions the renderer emits) against float64 matmuls and torch convolutions on ragged
shapes; spec validation; source snapshots (change detectors only); NVRTC -> cubin with no spills,
registers within the tile's budget and HMMA.16816.F32 only (default: one model's kernels, sm_80;
``-m slow``: every lowered kernel of every test model, sm_80 and sm_90)."""
import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mpcompile
from mpcompile import Policy
from mpcompile.codegen import mapping as mp
from mpcompile.codegen import model, tiles
from mpcompile.codegen.epilogue import NAMES, OPS, Operands
from mpcompile.codegen.render import render_source
from mpcompile.codegen.schedule import Event, ModelCheckError, Op, Schedule
from mpcompile.codegen.spec import SMEM_LIMIT, Conv, Epilogue, KernelSpec, Kind, SpecError, Tile
from mpcompile.codegen.tiles import TILES
from mpcompile.errors import KernelError
from mpcompile.examples import EXAMPLES, batch
from mpcompile.runtime import nvrtc, sass
from mpcompile.runtime.kernel import KernelCall

F16, BF16 = torch.float16, torch.bfloat16
SNAPSHOTS = Path(__file__).parent / "snapshots"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gpu_check as gc  # noqa: E402

needs_nvrtc = pytest.mark.skipif(not (nvrtc.available() and sass.available()),
                                 reason="NVRTC / cuobjdump wheels not installed")
rng = np.random.default_rng(0)


# --- PTX ISA layouts --------------------------------------------------------------------------


def test_fragment_layouts_match_the_ptx_isa_tables():
    """mma.m16n8k16 (.f16/.bf16 inputs): groupID = lane >> 2, threadID_in_group = lane % 4.
    A: a0,a1 row groupID cols 2t..2t+1; a2,a3 row groupID+8; a4,a5 row groupID cols 2t+8..;
    a6,a7 row groupID+8 cols 2t+8... B: b0,b1 rows 2t..2t+1, b2,b3 rows 2t+8.., col groupID.
    C: c0,c1 row groupID cols 2t..2t+1; c2,c3 row groupID+8."""
    lane = 5  # groupID 1, threadID_in_group 1
    assert [mp.frag_a(lane, i) for i in range(8)] == [
        (1, 2), (1, 3), (9, 2), (9, 3), (1, 10), (1, 11), (9, 10), (9, 11)]
    assert [mp.frag_b(lane, i) for i in range(4)] == [(2, 1), (3, 1), (10, 1), (11, 1)]
    assert [mp.frag_c(lane, i) for i in range(4)] == [(1, 2), (1, 3), (9, 2), (9, 3)]
    lane = 31  # groupID 7, threadID_in_group 3
    assert mp.frag_a(lane, 7) == (15, 15) and mp.frag_b(lane, 3) == (15, 7)
    assert mp.frag_c(lane, 3) == (15, 7)


def test_ldmatrix_delivery_matches_the_ptx_isa():
    """ldmatrix: "each thread receives two elements of row lane/4 ... at columns 2*(lane%4)";
    with .trans the matrix is transposed."""
    assert [mp.ldmatrix_element(9, e, False) for e in (0, 1)] == [(2, 2), (2, 3)]
    assert [mp.ldmatrix_element(9, e, True) for e in (0, 1)] == [(2, 2), (3, 2)]


@pytest.mark.parametrize("cpr", [2, 4, 8, 16])
def test_swizzle_is_a_bijection_and_spreads_banks(cpr):
    rows = np.arange(64)[:, None]
    chunks = np.arange(cpr)[None, :]
    sw = mp.swizzle(rows, chunks, cpr)
    assert all(sorted(r) == list(range(cpr)) for r in sw)  # a permutation of each row
    # the 8 rows of one ldmatrix phase land in 8 different 16-byte bank groups
    for c in range(cpr):
        offs = mp.smem_offset(np.arange(8), c * 8, cpr * 8) * 2
        assert len({(o // 16) % 8 for o in offs}) == 8


# --- the epilogue table ----------------------------------------------------------------------


def _phi(x):  # the standard normal CDF, through erfc (the table's gelu uses erf)
    return 0.5 * np.vectorize(math.erfc)(-x / math.sqrt(2))


MEANING = {  # what each epilogue op computes, written independently of the table
    "scale": lambda x, bias: 0.25 * x,
    "bias_n": lambda x, bias: x + bias,
    "relu": lambda x, bias: np.where(x > 0, x, 0.0),
    "gelu": lambda x, bias: x * _phi(x),
    "gelu_tanh": lambda x, bias: x / (1 + np.exp(-2 * math.sqrt(2 / math.pi)
                                                 * (x + 0.044715 * x ** 3))),
    "round": lambda x, bias: x.astype(np.float16).astype(np.float64),
}


@pytest.mark.parametrize("name", NAMES)
def test_epilogue_ops_compute_what_they_mean(name):
    """The NumPy form (the kernel's model) and the torch form (the reference contract) of each op
    against its definition; the torch form keeps FP32 in FP32."""
    assert set(MEANING) == set(NAMES)
    x = rng.standard_normal(257) * 4
    bias = rng.standard_normal(257)
    want = MEANING[name](x, bias)
    np.testing.assert_allclose(OPS[name].numpy(x, Operands("float16", bias, 0.25)), want,
                               rtol=1e-12, atol=1e-12)
    o = Operands("float16", torch.from_numpy(bias), torch.tensor(0.25))
    got = OPS[name].torch(torch.from_numpy(x), o)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    assert OPS[name].torch(torch.from_numpy(x).float(), o).dtype is torch.float32
    assert OPS[name].linear == (name == "scale") and OPS[name].rounds == (name == "round")


# --- the NumPy model of the kernels -----------------------------------------------------------


def _low(x, dt="float16"):
    return model.round_to(x, dt)


@pytest.mark.parametrize("a_layout", ["row", "col"])
@pytest.mark.parametrize("b_layout", ["row", "col"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_model_gemm_on_ragged_shapes(a_layout, b_layout, dtype):
    m, n, k = 70, 45, 40  # no tile multiple
    a, b = _low(rng.standard_normal((m, k)), dtype), _low(rng.standard_normal((k, n)), dtype)
    bias = _low(rng.standard_normal(n), dtype)
    a_mem = (a if a_layout == "row" else a.T).copy().ravel()
    b_mem = (b if b_layout == "row" else b.T).copy().ravel()
    lda, ldb = (k if a_layout == "row" else m), (n if b_layout == "row" else k)
    spec = KernelSpec("gemm", dtype, m, n, k, tile=Tile(64, 64, 32, 2, 2, 3),
                      epilogue=Epilogue(("bias_n", "gelu"), "float32", dtype),
                      a_layout=a_layout, b_layout=b_layout, lda=lda, ldb=ldb, ldc=n,
                      vec_a=2 if lda % 8 else 8, vec_b=1 if ldb % 8 else 8)
    out = model.run(spec, a_mem, b_mem, bias=bias).reshape(m, n)
    np.testing.assert_allclose(out, MEANING["gelu"](a @ b + bias, None), rtol=1e-12, atol=1e-12)


def test_model_batched_gemm_with_broadcast_operand_and_fp16_output():
    bt, m, n, k = 3, 33, 24, 48
    a = _low(rng.standard_normal((bt, m, k)))
    b = _low(rng.standard_normal((k, n)))  # one B for every batch: batch stride 0
    spec = KernelSpec("gemm", "float16", m, n, k, batch=bt, tile=Tile(32, 32, 16, 1, 2, 2),
                      epilogue=Epilogue(("relu",), "float16"), lda=k, ldb=n, ldc=n,
                      batch_stride_a=m * k, batch_stride_b=0, batch_stride_c=m * n)
    out = model.run(spec, a.ravel(), b.ravel()).reshape(bt, m, n)
    np.testing.assert_array_equal(out, _low(np.maximum(a @ b, 0)))  # one rounding


def test_model_split_k_with_scale():
    m, n, k = 40, 56, 300
    a, b = _low(rng.standard_normal((m, k))), _low(rng.standard_normal((k, n)))
    spec = KernelSpec("gemm", "float16", m, n, k, tile=Tile(32, 32, 32, 1, 2, 3),
                      epilogue=Epilogue(("scale",), "float32"), lda=k, ldb=n, ldc=n,
                      split_k=4, vec_a=4)
    out = model.run(spec, a.ravel(), b.ravel(), scale=0.25).reshape(m, n)
    np.testing.assert_allclose(out, 0.25 * (a @ b), rtol=1e-12, atol=1e-12)


def _with(schedule: Schedule, part: str, events) -> Schedule:
    return dataclasses.replace(schedule, **{part: tuple(events)})


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_pipeline_schedule_mutations_fail_the_model(stages):
    """Not a snapshot: the model executes the schedule the renderer emits, event by event, and
    tracks each stage buffer. The correct schedule matches a float64 matmul; a wait that leaves
    one group too many in flight (stages-1) reads a stage before its copies complete; with the
    barrier removed, no warp may read another's copies; with the barrier moved after the refill,
    a stage is refilled while other warps may still read it; without the drain's wait, copies
    are still in flight at the epilogue; without its barrier, the epilogue's staging overwrites
    stages other warps may still read."""
    m, n, k = 40, 48, 160  # 5 k-tiles of 32: every stage of the ring is reused
    a, b = _low(rng.standard_normal((m, k))), _low(rng.standard_normal((k, n)))
    spec = KernelSpec("gemm", "float16", m, n, k, tile=Tile(32, 32, 32, 1, 2, stages),
                      epilogue=Epilogue((), "float32"), lda=k, ldb=n, ldc=n)
    good = spec.schedule
    assert good == Schedule.for_stages(stages, smem_epilogue=True)
    out = model.run(spec, a.ravel(), b.ravel(), schedule=good).reshape(m, n)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)
    src = render_source(spec, good)
    assert src == render_source(spec) and f"cp_async_wait<{stages - 2}>();" in src
    wrong_wait = _with(good, "body", [Event(Op.WAIT, stages - 1) if e.op is Op.WAIT else e
                                      for e in good.body])
    no_barrier = _with(good, "body", [e for e in good.body if e.op is not Op.BARRIER])
    refill_first = _with(good, "body", [Event(Op.WAIT, stages - 2), Event(Op.LOAD, stages - 1),
                                        Event(Op.COMMIT), Event(Op.BARRIER), Event(Op.COMPUTE)])
    no_drain = _with(good, "drain", [e for e in good.drain if e.op is not Op.WAIT])
    no_drain_barrier = _with(good, "drain", [e for e in good.drain if e.op is not Op.BARRIER])
    for bad, why in ((wrong_wait, "read for k-tile .* before its copies completed"),
                     (no_barrier, "before a barrier made them visible"),
                     (refill_first, "overwritten while being read"),
                     (no_drain, "still in flight"),
                     (no_drain_barrier, "reused by the epilogue while warps may still read")):
        with pytest.raises(ModelCheckError, match=why):
            model.run(spec, a.ravel(), b.ravel(), schedule=bad)
        assert render_source(spec, bad) != src  # the renderer emits what the model ran
    assert f"cp_async_wait<{stages - 1}>();" in render_source(spec, wrong_wait)
    # copies issued before the barrier that follows their wait are not visible to other warps
    late_barrier = _with(good, "body", [Event(Op.WAIT, stages - 2), Event(Op.LOAD, stages - 1),
                                        Event(Op.COMMIT), Event(Op.COMPUTE), Event(Op.BARRIER)])
    with pytest.raises(ModelCheckError, match="before a barrier made them visible"):
        model.run(spec, a.ravel(), b.ravel(), schedule=late_barrier)


CONVS = [
    Conv(2, 7, 6, 8, 16, 3, 3, (1, 1), (1, 1), (1, 1)),
    Conv(1, 9, 9, 16, 8, 3, 3, (2, 2), (1, 1), (1, 1)),
    Conv(2, 8, 7, 8, 8, 3, 2, (2, 1), (0, 1), (2, 1)),
    Conv(1, 5, 5, 3, 4, 3, 3, (1, 1), (1, 1), (1, 1)),  # C=3: element-wise copies
    Conv(2, 6, 6, 8, 24, 1, 1, (1, 1), (0, 0), (1, 1)),
]


@pytest.mark.parametrize("cv", CONVS, ids=lambda c: f"{c.h}x{c.w}c{c.c}k{c.k}r{c.r}s{c.s}"
                         f"st{c.stride[0]}{c.stride[1]}")
def test_model_convolutions_against_torch(cv):
    x = _low(rng.standard_normal((cv.n, cv.c, cv.h, cv.w)))
    w = _low(rng.standard_normal((cv.k, cv.c, cv.r, cv.s)))
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    y = torch.nn.functional.conv2d(xt, wt, None, cv.stride, cv.pad, cv.dil)
    dy = _low(rng.standard_normal(tuple(y.shape)))
    y.backward(torch.from_numpy(dy))
    vec = 8 if cv.c % 8 == 0 and cv.k % 8 == 0 else 1
    nhwc = lambda t: t.transpose(0, 2, 3, 1).copy().ravel()  # noqa: E731
    tile = Tile(32, 32, 16, 1, 2, 2)
    fprop = KernelSpec("conv_fprop", "float16", cv.n * cv.p * cv.q, cv.k, cv.r * cv.s * cv.c,
                       tile=tile, epilogue=Epilogue((), "float32"), conv=cv, vec_a=vec,
                       vec_b=vec)
    out = model.run(fprop, nhwc(x), nhwc(w)).reshape(cv.n, cv.p, cv.q, cv.k)
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), y.detach().numpy(), atol=1e-10)
    dgrad = KernelSpec("conv_dgrad", "float16", cv.n * cv.h * cv.w, cv.c, cv.r * cv.s * cv.k,
                       tile=tile, epilogue=Epilogue((), "float32"), conv=cv, vec_a=vec,
                       vec_b=vec)
    dx = model.run(dgrad, nhwc(dy), nhwc(w)).reshape(cv.n, cv.h, cv.w, cv.c)
    np.testing.assert_allclose(dx.transpose(0, 3, 1, 2), xt.grad.numpy(), atol=1e-10)
    wgrad = KernelSpec("conv_wgrad", "float16", cv.k, cv.r * cv.s * cv.c, cv.n * cv.p * cv.q,
                       tile=tile, epilogue=Epilogue(("scale",), "float32"), conv=cv,
                       split_k=3, vec_a=vec, vec_b=vec)
    dw = model.run(wgrad, nhwc(dy), nhwc(x), scale=0.5).reshape(cv.k, cv.r, cv.s, cv.c)
    np.testing.assert_allclose(dw.transpose(0, 3, 1, 2), 0.5 * wt.grad.numpy(), atol=1e-10)


def _conv_data(cv):
    """x, w, y = conv(x, w), dy and torch's dx, dw (float64 holding FP16 values), NCHW."""
    x = _low(rng.standard_normal((cv.n, cv.c, cv.h, cv.w)))
    w = _low(rng.standard_normal((cv.k, cv.c, cv.r, cv.s)))
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    y = torch.nn.functional.conv2d(xt, wt, None, cv.stride, cv.pad, cv.dil)
    dy = _low(rng.standard_normal(tuple(y.shape)))
    y.backward(torch.from_numpy(dy))
    return x, w, y.detach().numpy(), dy, xt.grad.numpy(), wt.grad.numpy()


def _nhwc(t):
    return t.transpose(0, 2, 3, 1).copy().ravel()


STEPPED_CONVS = [  # channel counts that are multiples of bk: the filter iterator's fast path
    (Conv(2, 7, 6, 16, 32, 3, 3, (1, 1), (1, 1), (1, 1)), Tile(32, 32, 16, 1, 2, 2), 1),
    (Conv(1, 9, 9, 32, 16, 3, 3, (2, 2), (1, 1), (1, 1)), Tile(32, 32, 16, 1, 2, 3), 1),
    (Conv(2, 8, 7, 16, 16, 3, 2, (1, 1), (0, 1), (2, 1)), Tile(32, 64, 16, 1, 4, 2), 1),
    (Conv(2, 6, 6, 32, 32, 1, 1, (1, 1), (0, 0), (1, 1)), Tile(32, 32, 32, 1, 2, 2), 1),
    (Conv(1, 6, 5, 32, 16, 3, 3, (1, 1), (2, 1), (1, 2)), Tile(32, 32, 16, 1, 2, 3), 4),
]


@pytest.mark.parametrize("cv,tile,split", STEPPED_CONVS,
                         ids=lambda v: f"{v.h}x{v.w}c{v.c}k{v.k}r{v.r}s{v.s}"
                         f"st{v.stride[0]}{v.stride[1]}" if isinstance(v, Conv) else None)
def test_model_stepped_convolutions_against_torch(cv, tile, split):
    """The filter iterator (incremental (r, s, c) stepping, predicates recomputed only when the
    filter position moves) for the fprop activation, the stride-1 dgrad output gradient and
    the dgrad weight: the model runs the iterator the kernel renders and checks every copy of
    every k-tile against the full address function; ragged M, strides, padding, dilation, 1x1,
    a copy count that does not fill the block (32x64 tile), split-K starting mid-window."""
    x, w, y, dy, dx, dw = _conv_data(cv)
    ep = Epilogue((), "float32")
    fprop = KernelSpec("conv_fprop", "float16", cv.n * cv.p * cv.q, cv.k, cv.r * cv.s * cv.c,
                       tile=tile, epilogue=ep, conv=cv, split_k=split)
    dgrad = KernelSpec("conv_dgrad", "float16", cv.n * cv.h * cv.w, cv.c, cv.r * cv.s * cv.k,
                       tile=tile, epilogue=ep, conv=cv, split_k=split)
    assert fprop.copy_path("a") == "stepped" and fprop.copy_path("b") == "hoisted"
    assert dgrad.copy_path("b") == "stepped"
    assert dgrad.copy_path("a") == ("stepped" if cv.stride == (1, 1) else "general")
    assert "stepped" in render_source(fprop).splitlines()[1]  # the header names the path
    out = model.run(fprop, _nhwc(x), _nhwc(w)).reshape(cv.n, cv.p, cv.q, cv.k)
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), y, atol=1e-10)
    got = model.run(dgrad, _nhwc(dy), _nhwc(w)).reshape(cv.n, cv.h, cv.w, cv.c)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), dx, atol=1e-10)
    wgrad = KernelSpec("conv_wgrad", "float16", cv.k, cv.r * cv.s * cv.c, cv.n * cv.p * cv.q,
                       tile=tile, epilogue=ep, conv=cv, split_k=split + 1)
    assert wgrad.copy_path("a") == "hoisted" and wgrad.copy_path("b") == "pixels"
    got = model.run(wgrad, _nhwc(dy), _nhwc(x)).reshape(cv.k, cv.r, cv.s, cv.c)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), dw, atol=1e-10)


WALKED_CONVS = [  # channels a multiple of 8, not of bk: per-copy (r, s, c) iterators
    (Conv(2, 7, 6, 24, 40, 3, 3, (1, 1), (1, 1), (1, 1)), Tile(32, 32, 32, 1, 2, 2), 1),
    (Conv(1, 9, 8, 8, 24, 3, 2, (2, 1), (1, 0), (1, 2)), Tile(32, 64, 16, 1, 4, 3), 2),
    (Conv(2, 5, 5, 48, 8, 1, 1, (1, 1), (0, 0), (1, 1)), Tile(32, 32, 32, 1, 2, 2), 3),
]


@pytest.mark.parametrize("cv,tile,split", WALKED_CONVS,
                         ids=lambda v: f"{v.h}x{v.w}c{v.c}k{v.k}r{v.r}s{v.s}"
                         f"st{v.stride[0]}{v.stride[1]}" if isinstance(v, Conv) else None)
def test_model_walked_convolutions_against_torch(cv, tile, split):
    """The per-copy tap iterator ((r, s, c) + bk in mixed radix, one carry a digit; bk may
    pass several channel blocks at once; K ragged in two cases) for the fprop activation, the dgrad
    operands (A only at stride 1) and the pixel iterator of the wgrad activation, against
    torch through the model, which checks every copy of every k-tile."""
    x, w, y, dy, dx, dw = _conv_data(cv)
    ep = Epilogue((), "float32")
    fprop = KernelSpec("conv_fprop", "float16", cv.n * cv.p * cv.q, cv.k, cv.r * cv.s * cv.c,
                       tile=tile, epilogue=ep, conv=cv, split_k=split)
    dgrad = KernelSpec("conv_dgrad", "float16", cv.n * cv.h * cv.w, cv.c, cv.r * cv.s * cv.k,
                       tile=tile, epilogue=ep, conv=cv, split_k=split)
    wgrad = KernelSpec("conv_wgrad", "float16", cv.k, cv.r * cv.s * cv.c, cv.n * cv.p * cv.q,
                       tile=tile, epilogue=ep, conv=cv, split_k=split)
    assert fprop.copy_path("a") == "taps" and dgrad.copy_path("b") == "taps"
    assert dgrad.copy_path("a") == ("taps" if cv.stride == (1, 1) else "general")
    assert wgrad.copy_path("b") == "pixels"
    out = model.run(fprop, _nhwc(x), _nhwc(w)).reshape(cv.n, cv.p, cv.q, cv.k)
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), y, atol=1e-10)
    got = model.run(dgrad, _nhwc(dy), _nhwc(w)).reshape(cv.n, cv.h, cv.w, cv.c)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), dx, atol=1e-10)
    got = model.run(wgrad, _nhwc(dy), _nhwc(x)).reshape(cv.k, cv.r, cv.s, cv.c)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), dw, atol=1e-10)


@pytest.mark.parametrize("kind", ["conv_fprop", "conv_dgrad", "conv_wgrad", "taps"])
def test_filter_iterator_mutations_fail_the_model(kind, monkeypatch):
    """The renderer and the model share the iterators' functions: a step that forgets to move
    the filter position (fprop, dgrad), to carry into the next output row (wgrad) or into the
    next filter column (the per-copy taps of C=24 with bk 16), a window offset with the wrong
    sign, a mirrored tap or a pixel without its stride changes the kernel source and fails
    the model's per-copy check against the address function."""
    cv = Conv(2, 7, 6, 24 if kind == "taps" else 16, 32, 3, 3,
              (2, 1) if kind == "conv_wgrad" else (1, 1), (1, 1))
    taps, kind = kind == "taps", "conv_fprop" if kind == "taps" else kind
    x, w, _, dy, _, _ = _conv_data(cv)
    m, n, k = {"conv_fprop": (cv.n * cv.p * cv.q, cv.k, cv.r * cv.s * cv.c),
               "conv_dgrad": (cv.n * cv.h * cv.w, cv.c, cv.r * cv.s * cv.k),
               "conv_wgrad": (cv.k, cv.r * cv.s * cv.c, cv.n * cv.p * cv.q)}[kind]
    spec = KernelSpec(kind, "float16", m, n, k, tile=Tile(32, 32, 16, 1, 2, 2),
                      epilogue=Epilogue((), "float32"), conv=cv)
    a, b = {"conv_fprop": (x, w), "conv_dgrad": (dy, w), "conv_wgrad": (dy, x)}[kind]
    a, b = _nhwc(a), _nhwc(b)
    src = render_source(spec)
    model.run(spec, a, b)
    step, at = KernelSpec.im2col_step, KernelSpec.im2col_at
    pstep, pat = KernelSpec.pixel_step, KernelSpec.pixel_at
    tstep, tat = KernelSpec.tap_step, KernelSpec.tap_at

    def stuck(self, operand, c, rs):
        c, _, moved = step(self, operand, c, rs)
        return c, rs, moved

    def flipped(self, operand, base, h0, w0, rs):
        return at(self, operand, base, h0, w0, (rs // cv.s) * cv.s + (cv.s - 1 - rs % cv.s))

    def no_carry(self, operand, n_, p, q):
        n1, _, q1 = pstep(self, operand, n_, p, q)
        return n1, p, q1

    def no_stride(self, operand, tap, dh, dw, n_, p, q):
        return pat(self, operand, tap, dh, dw, n_, p // 2, q)

    def tap_no_carry(self, operand, r, s, c):
        r1, _, c1 = tstep(self, operand, r, s, c)
        return r1, s, c1

    def tap_flipped(self, operand, base, h0, w0, r, s, c):
        return tat(self, operand, base, h0, w0, r, cv.s - 1 - s, c)

    bads = {"im2col_step": stuck, "im2col_at": flipped}
    if kind == "conv_wgrad":
        bads = {"pixel_step": no_carry, "pixel_at": no_stride}
    if taps:
        assert spec.copy_path("a") == "taps"
        bads = {"tap_step": tap_no_carry, "tap_at": tap_flipped}
    for name, bad in bads.items():
        monkeypatch.setattr(KernelSpec, name, bad)
        assert render_source(spec) != src
        with pytest.raises(ModelCheckError, match="iterator.s copy offsets or predicates"):
            model.run(spec, a, b)
        monkeypatch.undo()


def test_ldmatrix_offset_split_is_checked_by_the_model(monkeypatch):
    """Each thread computes one ldmatrix offset per operand and stage and reaches the others by
    an XOR and an immediate (``render.fragment_split``); the model forms the same addresses
    and compares them with the shared-memory layout: a wrong constant fails it, and without a
    split (every offset computed in full) the kernel is still right."""
    m, n, k = 40, 48, 64
    a, b = _low(rng.standard_normal((m, k))), _low(rng.standard_normal((k, n)))
    split = mp.xor_add_split

    def off_by_8(table, align):
        out = split(table, align)
        key = list(out)[-1]
        return {**out, key: (out[key][0], out[key][1] + 8)}

    for a_layout, b_layout in (("row", "col"), ("col", "row")):
        spec = KernelSpec("gemm", "float16", m, n, k, tile=Tile(32, 32, 32, 1, 2, 2),
                          epilogue=Epilogue((), "float32"), a_layout=a_layout,
                          b_layout=b_layout, lda=k if a_layout == "row" else m,
                          ldb=n if b_layout == "row" else k, ldc=n)
        a_mem = (a if a_layout == "row" else a.T).copy().ravel()
        b_mem = (b if b_layout == "row" else b.T).copy().ravel()
        src = render_source(spec)
        assert "a_fr" in src and "^ 32" in src  # the k16 step 16: an XOR of 16 elements
        np.testing.assert_allclose(model.run(spec, a_mem, b_mem).reshape(m, n), a @ b,
                                   rtol=1e-12, atol=1e-12)
        monkeypatch.setattr(mp, "xor_add_split", off_by_8)
        assert render_source(spec) != src
        with pytest.raises(ModelCheckError, match="ldmatrix offsets reached by XOR"):
            model.run(spec, a_mem, b_mem)
        monkeypatch.setattr(mp, "xor_add_split", lambda table, align: None)
        assert "a_fr" not in render_source(spec)
        np.testing.assert_allclose(model.run(spec, a_mem, b_mem).reshape(m, n), a @ b,
                                   rtol=1e-12, atol=1e-12)
        monkeypatch.undo()


@needs_nvrtc
def test_ldmatrix_direct_addresses_compile(tmp_path, monkeypatch):
    """The fallback without the XOR split (no preset needs it today) still compiles to HMMA
    without spills."""
    monkeypatch.setenv("MPCOMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(mp, "xor_add_split", lambda table, align: None)
    spec = SNAPSHOT_SPECS["gemm_f16_nt_bias_relu"]
    assert "a_fr" not in render_source(spec)
    _check_cubin(spec, "sm_80")


# --- spec validation --------------------------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: Tile(100, 64, 32, 2, 2, 3), "not a multiple of 16 x warps_m"),
    (lambda: Tile(64, 64, 24, 2, 2, 3), "bk=24"),
    (lambda: Tile(64, 80, 32, 2, 2, 3), "multiple of 16 x warps_n"),
    (lambda: Tile(64, 96, 32, 2, 2, 3), "chunks per row must be 1, 2, 4 or a multiple of 8"),
    (lambda: Tile(64, 64, 32, 2, 2, 9), "stages=9"),
    (lambda: Tile(64, 64, 32, 8, 8, 2), "not a multiple of 16 x warps_m"),
    (lambda: KernelSpec("gemm", "float16", 64, 64, 64, tile=Tile(256, 256, 64, 4, 4, 6),
                        lda=64, ldb=64, ldc=64), "shared memory"),
    (lambda: KernelSpec("gemm", "float16", 64, 64, 60, lda=60, ldb=64, ldc=64),
     "vec_a=8 does not divide"),
    (lambda: KernelSpec("gemm", "float32", 64, 64, 64, lda=64, ldb=64, ldc=64), "dtype"),
    (lambda: KernelSpec("gemm", "float16", 64, 64, 64, lda=32, ldb=64, ldc=64),
     "leading dimensions"),
    (lambda: KernelSpec("gemm", "float16", 64, 64, 64, lda=64, ldb=64, ldc=64, split_k=2,
                        epilogue=Epilogue(("relu",), "float32")), "split-K"),
    (lambda: KernelSpec("conv_fprop", "float16", 10, 16, 72, conv=CONVS[0]), "m, n, k must"),
    (lambda: Epilogue(("softmax",)), "unknown"),
])
def test_impossible_specs_are_rejected(make, match):
    with pytest.raises(SpecError, match=match):
        make()
    assert issubclass(SpecError, KernelError) and issubclass(SpecError, ValueError)


# --- grid limits and index widths --------------------------------------------------------------


@pytest.mark.parametrize("tiles_m,tiles_n", [(1, 1), (3, 5), (8, 2), (17, 3), (100, 1)])
def test_block_raster_is_a_bijection_in_groups_of_tile_rows(tiles_m, tiles_n):
    """Each linear block id maps to one (tile row, tile column, z) and back; consecutive blocks
    walk ``group`` tile rows column by column (what puts B columns in L2 for 8 A rows)."""
    z = 3
    bid = np.arange(tiles_m * tiles_n * z)
    tm, tn, tz = mp.block_coords(bid, tiles_m, tiles_n, 8)
    assert sorted(zip(tz.tolist(), tm.tolist(), tn.tolist())) == [
        (c, i, j) for c in range(z) for i in range(tiles_m) for j in range(tiles_n)]
    first = min(8, tiles_m)
    assert set(tm[: first * tiles_n].tolist()) == set(range(first))
    assert tn[:first].tolist() == [0] * first


def _grid_ok(spec: KernelSpec) -> None:
    gx, gy, gz = spec.grid()
    assert 0 < gx <= 2**31 - 1 and gy <= 65535 and gz <= 65535
    assert gx * gy * gz == spec.tiles_m * spec.tiles_n * spec.batch * spec.split_k


HUGE = {  # what the old (N, M, batch x split) grid and 32-bit offsets could not launch
    "fprop_n512_112": tiles.conv_spec(Kind.CONV_FPROP, "float16",
                                      Conv(512, 112, 112, 64, 64, 3, 3, (1, 1), (1, 1))),
    "logits_32768x128256": gc.gemm_spec("bfloat16", 32768, 128256, 4096, "row", "col"),
    # activations past 2^31 elements: the filter and pixel iterators with 64-bit offsets
    "fprop_n2048_112": tiles.conv_spec(Kind.CONV_FPROP, "float16",
                                       Conv(2048, 112, 112, 128, 64, 3, 3, (1, 1), (1, 1))),
    "wgrad_n2048_112": tiles.conv_spec(Kind.CONV_WGRAD, "float16",
                                       Conv(2048, 112, 112, 128, 64, 3, 3, (1, 1), (1, 1))),
}


def test_grid_and_index_widths_of_huge_problems():
    fprop, logits = HUGE["fprop_n512_112"], HUGE["logits_32768x128256"]
    assert fprop.tiles_m > 65535  # a y dimension of tile rows would not launch
    assert logits.m * logits.n > 2**31 - 1  # 32-bit output offsets would wrap
    for spec in HUGE.values():
        _grid_ok(spec)
    assert [logits.wide_index(o) for o in "abc"] == [False, False, True]
    assert not any(fprop.wide_index(o) for o in "abc")  # 411 M elements: 32-bit math suffices
    src = render_source(logits)
    assert "((((long long)row) * 128256) + col)" in src  # the output offset
    assert "  int a_off[" in src and "  int b_off[" in src  # the operands' copy offsets
    # an operand past 2^31 elements (a 70000 x 40000 A) gets 64-bit loader offsets
    big_a = gc.gemm_spec("float16", 70000, 256, 40000, "row", "row")
    assert big_a.wide_index("a") and not big_a.wide_index("b")
    src = render_source(big_a)
    assert "long long a_off[" in src and "a_off[i] = ok ? ((((long long)g_mn) * 40000)" in src
    assert "  int b_off[" in src
    for name in ("fprop_n2048_112", "wgrad_n2048_112"):  # x: 3.3 G elements
        spec = HUGE[name]
        operand = "a" if spec.kind is Kind.CONV_FPROP else "b"
        assert spec.wide_index(operand) and spec.copy_path(operand) in ("stepped", "pixels")
        src = render_source(spec)
        ptr = operand.upper()
        assert f"long long {operand}_base[" in src or "(long long)b_pn[i]" in src
        assert f"{ptr} + (u32)" not in src  # 32-bit offsets only below 2^31 elements
    small = SNAPSHOT_SPECS["gemm_f16_nt_bias_relu"]
    src = render_source(small)
    assert "long long a_off" not in src and "long long b_off" not in src
    assert "(long long)row" not in src and "(long long)g_" not in src
    with pytest.raises(SpecError, match="2\\^31-1"):
        KernelSpec("gemm", "float16", 2**31 - 8, 64, 64, lda=64, ldb=64, ldc=64)


@needs_nvrtc
def test_huge_problems_compile(tmp_path, monkeypatch):
    """NVRTC accepts the 64-bit index code (sm_80, no spills)."""
    monkeypatch.setenv("MPCOMPILE_CACHE", str(tmp_path))
    for spec in HUGE.values():
        c = nvrtc.compile_cubin(render_source(spec), spec.name, "sm_80")
        assert c.info.registers > 0 and not (c.info.spill_stores or c.info.stack_frame), c.info


# --- generated source -------------------------------------------------------------------------


SNAPSHOT_SPECS = {
    "gemm_f16_nt_bias_relu": KernelSpec(
        "gemm", "float16", 256, 512, 128, tile=Tile(128, 128, 32, 2, 4, 3),
        epilogue=Epilogue(("bias_n", "relu"), "float16"), a_layout="row", b_layout="col",
        lda=128, ldb=128, ldc=512),
    "gemm_bf16_tn_round_scale": KernelSpec(
        "gemm", "bfloat16", 96, 80, 200, tile=Tile(64, 64, 32, 2, 2, 3),
        epilogue=Epilogue(("round", "scale"), "float32"), a_layout="col", b_layout="row",
        lda=96, ldb=80, ldc=80),
    "conv_wgrad_f16_split": KernelSpec(
        "conv_wgrad", "float16", 16, 72, 84, tile=Tile(32, 32, 32, 1, 2, 2),
        epilogue=Epilogue((), "float32"), conv=CONVS[0], split_k=2),
}


@pytest.mark.parametrize("name", sorted(SNAPSHOT_SPECS))
def test_source_snapshot_change_detector(name):
    """A change detector, not a correctness oracle: the expected text is the renderer's own
    earlier output, so this only says that the source changed (review the diff, then
    UPDATE_SNAPSHOTS=1). Correctness comes from the model, compile and GPU tests."""
    src = render_source(SNAPSHOT_SPECS[name])
    path = SNAPSHOTS / f"{name}.cu"
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(src)
    assert path.exists(), "run with UPDATE_SNAPSHOTS=1 to create the snapshot"
    assert src == path.read_text(), f"{name}: generated source changed (UPDATE_SNAPSHOTS=1)"
    assert "#include" not in src and "cutlass" not in src.lower()
    assert "mma.sync.aligned.m16n8k16.row.col.f32" in src and "ldmatrix" in src


# --- compiling the kernels the lowering chooses -----------------------------------------------


def lowered_specs(names, lows) -> dict[str, KernelSpec]:
    """The specs of every KernelCall in the forward and training-step graphs that run."""
    specs = {}
    for name in names:
        for low in lows:
            ex = EXAMPLES[name]
            x, y = batch(ex)
            policy = Policy(dtype=low, kernels="on")
            mpm = mpcompile.convert(ex.build().eval(), x, policy=policy, backend="eager")
            m = ex.build().train()
            step = mpcompile.compile_train_step(m, ex.loss, x, y, policy=policy,
                                                optimizer=torch.optim.SGD(m.parameters(), 0.1),
                                                backend="eager")
            for gm in (mpm.executable, step.executable):
                for mod in gm.modules():
                    if isinstance(mod, KernelCall):
                        specs[mod.spec.name] = mod.spec
    return specs


def _check_cubin(spec: KernelSpec, arch: str) -> None:
    """No spills or stack, registers within ``tiles.register_budget`` (a real bound: unrolling
    the K loop twice trips it), shared memory within the arch, HMMA.16816.F32 only."""
    c = nvrtc.compile_cubin(render_source(spec), spec.name, arch)
    info = c.info
    assert not (info.spill_stores or info.spill_loads or info.stack_frame), (spec.name, info)
    budget = tiles.register_budget(spec.tile, min(spec.vec_a, spec.vec_b) == 1)
    assert 0 < info.registers <= budget, (spec.name, arch, info)
    assert spec.smem_bytes <= SMEM_LIMIT[arch]
    mma = set(sass.mma_instructions(sass.disassemble(c.cubin)))
    assert mma and all(i.startswith("HMMA.16816.F32") for i in mma), (spec.name, mma)


EXTRA_SPECS = {  # what the test models do not reach: the large preset, every epilogue op
    "large": gc.gemm_spec("float16", 1024, 1024, 256),
    "all_ops": KernelSpec("gemm", "bfloat16", 96, 64, 64, tile=TILES["small"], lda=64, ldb=64,
                          ldc=64, epilogue=Epilogue(NAMES, "float32", "float32")),
}


@needs_nvrtc
def test_representative_kernels_compile(tmp_path, monkeypatch):
    """Default run, sm_80: the cnn example's kernels (GEMMs and a conv fprop, dgrad and wgrad,
    the last with element-wise copies of its 3-channel input: the most registers), the snapshot
    specs, the large preset and every epilogue op."""
    monkeypatch.setenv("MPCOMPILE_CACHE", str(tmp_path))
    specs = {**lowered_specs(["cnn"], [F16]),
             **{s.name: s for s in [*SNAPSHOT_SPECS.values(), *EXTRA_SPECS.values()]}}
    assert {s.kind for s in specs.values()} == set(Kind)
    assert EXTRA_SPECS["large"].tile == TILES["large"]
    for spec in specs.values():
        _check_cubin(spec, "sm_80")
    spec = next(iter(specs.values()))  # the disk cache answers a second request
    assert nvrtc.compile_cubin(render_source(spec), spec.name, "sm_80").cached


@needs_nvrtc
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_large_gemm_main_loop_from_sass(dtype, tmp_path, monkeypatch):
    """The 4096^3 GEMM's kernel (the large preset: 128x256x64, 64x64 warp tiles), read from the
    SASS: HMMA is at least 40 % of the K loop's instructions (the copy offsets and predicates
    are hoisted out of it), every global store of the epilogue is 128-bit, no spills."""
    monkeypatch.setenv("MPCOMPILE_CACHE", str(tmp_path))
    spec = gc.gemm_spec(dtype, 4096, 4096, 4096)
    assert spec.tile == TILES["large"] and spec.c_vec == 8
    c = nvrtc.compile_cubin(render_source(spec), spec.name, "sm_80")
    text = sass.disassemble(c.cubin)
    loop = sass.main_loop(text)
    assert loop.hmma == 128 and loop.ldsm == 32 and loop.ldgsts == 12, loop
    assert loop.hmma_share >= 0.40, loop
    assert sass.global_stores(text) == {"STG.E.128": 16}
    assert not (c.info.spill_stores or c.info.spill_loads or c.info.stack_frame), c.info


def _loop(spec: KernelSpec):
    c = nvrtc.compile_cubin(render_source(spec), spec.name, "sm_80")
    assert not (c.info.spill_stores or c.info.spill_loads or c.info.stack_frame), c.info
    return sass.main_loop(sass.disassemble(c.cubin))


@needs_nvrtc
def test_conv_main_loops_from_sass(tmp_path, monkeypatch):
    """ResNet-50 res4 3x3 at batch 32 (the medium preset, 128x128x32): with the filter
    iterator the fprop K loop is at least 32 % HMMA (64 HMMA, 16 LDSM, 8 LDGSTS; static
    count, including the recomputation when (r, s) moves), the stride-1 dgrad (both operands
    stepped) at least 31 %, the wgrad (pixel iterator) at least 27 %, no spills. With the
    filter iterator off, the fprop takes the per-copy tap iterator and falls below its floor;
    with the per-copy iterators off too (the general path: the full im2col address of every
    copy every k-tile) fprop and wgrad fall further."""
    monkeypatch.setenv("MPCOMPILE_CACHE", str(tmp_path))
    cv = Conv(32, 14, 14, 256, 256, 3, 3, (1, 1), (1, 1))
    fprop = tiles.conv_spec(Kind.CONV_FPROP, "float16", cv)
    dgrad = tiles.conv_spec(Kind.CONV_DGRAD, "float16", cv)
    assert fprop.tile == TILES["medium"] and fprop.copy_path("a") == "stepped"
    assert dgrad.copy_path("a") == dgrad.copy_path("b") == "stepped"
    wgrad = tiles.conv_spec(Kind.CONV_WGRAD, "float16", cv)
    assert wgrad.copy_path("b") == "pixels"
    loop = _loop(fprop)
    assert (loop.hmma, loop.ldsm, loop.ldgsts) == (64, 16, 8), loop
    assert loop.hmma_share >= 0.32, loop
    assert _loop(dgrad).hmma_share >= 0.31
    assert _loop(wgrad).hmma_share >= 0.27
    monkeypatch.setattr(KernelSpec, "stepped", lambda self, operand: False)
    assert fprop.copy_path("a") == "taps"  # the per-copy (r, s, c) iterator
    assert _loop(fprop).hmma_share < 0.32
    monkeypatch.setattr(KernelSpec, "walk", lambda self, operand: None)
    assert fprop.copy_path("a") == "general" and wgrad.copy_path("b") == "general"
    assert _loop(fprop).hmma_share < 0.25 and _loop(wgrad).hmma_share < 0.27


def test_large_presets_on_ragged_shapes_through_the_model():
    """The 64x64-warp-tile presets, ragged in M, N and K (bk 64), FP16 output through the
    staged 16-byte epilogue (a ragged right edge: element stores) and FP32."""
    m, n, k, ldc = 130, 260, 72, 264  # C rows padded to 16 bytes; N % 8 = 4
    a, b = _low(rng.standard_normal((m, k))), _low(rng.standard_normal((k, n)))
    bias = _low(rng.standard_normal(n))
    for name, out in (("large", "float16"), ("wide", "float32")):
        spec = KernelSpec("gemm", "float16", m, n, k, tile=TILES[name], b_layout="col", lda=k,
                          ldb=k, ldc=ldc, epilogue=Epilogue(("bias_n", "relu"), out))
        assert spec.ragged_k and spec.c_vec == 16 // spec.out_bytes
        got = model.run(spec, a.ravel(), b.T.copy().ravel(), bias=bias)[: m * ldc]
        got = got.reshape(m, ldc)[:, :n]
        want = np.maximum(a @ b + bias, 0)
        np.testing.assert_array_equal(got, _low(want) if out == "float16" else got)
        np.testing.assert_allclose(got, want, rtol=1e-3 if out == "float16" else 1e-12,
                                   atol=1e-12)


def test_output_vector_width_and_smem_budget():
    base = dict(lda=64, ldb=64, epilogue=Epilogue((), "float16"))
    assert KernelSpec("gemm", "float16", 64, 64, 64, ldc=64, **base).c_vec == 8
    assert KernelSpec("gemm", "float16", 64, 60, 64, ldc=60, b_layout="col",
                      **base).c_vec == 1  # rows of C unaligned: element stores
    f32 = KernelSpec("gemm", "float16", 64, 64, 64, ldc=68, lda=64, ldb=64,
                     epilogue=Epilogue((), "float32"))
    assert f32.c_vec == 4 and f32.out_bytes == 4
    for tile in TILES.values():  # the FP32 staging buffers fit where the stage ring does
        spec = KernelSpec("gemm", "float16", 4096, 4096, 4096, tile=tile, lda=4096, ldb=4096,
                          ldc=4096, epilogue=Epilogue((), "float32"))
        assert spec.smem_bytes <= SMEM_LIMIT["sm_80"]


def test_split_k_fills_a_wave():
    """A weight gradient's small output gets enough K slices to give every SM a CTA (from K
    alone, ResNet-50's 14x14 3x3 wgrad at batch 32 got one slice: 36 CTAs on 132 SMs)."""
    cv = Conv(32, 14, 14, 256, 256, 3, 3, (1, 1), (1, 1))
    spec = tiles.conv_spec(Kind.CONV_WGRAD, "float16", cv)
    ctas = spec.tiles_m * spec.tiles_n
    assert tiles.choose_split_k(spec.k) == 1 and ctas < 132
    assert spec.split_k > 1 and ctas * spec.split_k >= 132
    assert spec.k_per_split >= 2 * spec.tile.bk and spec.epilogue.out == "float32"
    assert tiles.choose_split_k(spec.k, spec.m, spec.n, spec.tile, sms=108) * ctas >= 108
    assert tiles.choose_split_k(1 << 20, 8192, 8192, TILES["large"]) == 1  # already > a wave
    assert tiles.choose_split_k(128, 32, 32, TILES["tiny"]) == 2  # two k-tiles a slice at least


@pytest.mark.slow
@needs_nvrtc
def test_every_lowered_kernel_compiles_for_sm80_and_sm90(tmp_path, monkeypatch):
    monkeypatch.setenv("MPCOMPILE_CACHE", str(tmp_path))
    specs = {**lowered_specs(sorted(EXAMPLES), [F16, BF16]),
             **{s.name: s for s in [*SNAPSHOT_SPECS.values(), *EXTRA_SPECS.values()]}}
    assert len(specs) > 50
    for spec in specs.values():
        for arch in ("sm_80", "sm_90"):
            _check_cubin(spec, arch)


@needs_nvrtc
def test_compile_errors_name_the_kernel():
    with pytest.raises(nvrtc.CompileError, match="mpk_broken does not compile for sm_80"):
        nvrtc.compile_cubin("extern \"C\" __global__ void mpk_broken() { oops; }",
                            "mpk_broken", "sm_80", use_cache=False)


def test_wide_warp_tiles_need_wide_copies():
    """The 64x64-warp-tile presets spill with copies narrower than 4 elements (measured on
    sm_80: 1.5 KB a thread at vec 1, 0 at vec 4); the spec refuses them and choose_tile falls
    back to a 32x32-warp-tile preset. A data gradient keeps bm <= 128 (254 registers + 8 B of
    spills at 256x128)."""
    from mpcompile.codegen.spec import WIDE_TILE_MIN_VEC
    from mpcompile.codegen.tiles import choose_tile, conv_spec

    def spec(tile, vec_a, vec_b):
        return KernelSpec(Kind.GEMM, "float16", 1024, 1024, 1024, tile=tile,
                          epilogue=Epilogue((), "float16", "float16"), lda=1024, ldb=1024,
                          ldc=1024, vec_a=vec_a, vec_b=vec_b)

    for name in ("large", "wide", "medium"):
        assert TILES[name].accumulator_registers == 128
        spec(TILES[name], WIDE_TILE_MIN_VEC, 8)
        for va, vb in ((1, 8), (8, 2), (2, 2)):
            with pytest.raises(SpecError, match="64x64 warp tiles"):
                spec(TILES[name], va, vb)
    assert choose_tile(4096, 4096, vec=8) == TILES["large"]
    assert choose_tile(4096, 4096, vec=2) == TILES["small"]
    assert choose_tile(4096, 2048, vec=8) == TILES["wide"]
    assert choose_tile(4096, 2048, vec=8, kind=Kind.CONV_DGRAD) == TILES["large"]
    spec(choose_tile(4096, 4096, vec=1), 1, 1)  # the fallback builds
    cv = Conv(32, 28, 28, 256, 1024, 3, 3, (1, 1), (1, 1))
    with pytest.raises(SpecError, match="data gradient"):
        dataclasses.replace(conv_spec(Kind.CONV_DGRAD, "float16", cv), tile=TILES["wide"])
