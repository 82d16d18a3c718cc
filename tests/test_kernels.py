"""Generated tensor-core kernels, checked without a GPU: the PTX ISA fragment and ldmatrix
layouts; the epilogue table against formulas written here; the NumPy model of a kernel (the
mapping functions the renderer emits) against float64 matmuls and torch convolutions on ragged
shapes; spec validation; source snapshots (change detectors only); NVRTC -> cubin with no spills,
registers within the tile's budget and HMMA.16816.F32 only (default: one model's kernels, sm_80;
``-m slow``: every lowered kernel of every test model, sm_80 and sm_90); the lowering pass and
the GPU code paths of KernelCall and gpu_check, run on CPU through the model."""

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
from mpcompile.codegen import model
from mpcompile.codegen.epilogue import NAMES, OPS, Operands
from mpcompile.codegen.model import ModelLauncher
from mpcompile.codegen.render import render_source
from mpcompile.codegen.spec import Conv, Epilogue, KernelSpec, Kind, SpecError, Tile
from mpcompile.codegen.tiles import TILES
from mpcompile.dtypes import unit_roundoff
from mpcompile.errors import KernelError
from mpcompile.examples import EXAMPLES, batch
from mpcompile.passes.kernels import LOWERABLE
from mpcompile.runtime import nvrtc, sass
from mpcompile.runtime.kernel import KernelCall, KernelState

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
            mpm = mpcompile.convert(ex.build().eval(), x, policy=policy)
            m = ex.build().train()
            step = mpcompile.compile_train_step(m, ex.loss, x, y, policy=policy,
                                                optimizer=torch.optim.SGD(m.parameters(), 0.1))
            for gm in (mpm.executable, step.executable):
                for mod in gm.modules():
                    if isinstance(mod, KernelCall):
                        specs[mod.spec.name] = mod.spec
    return specs


def _check_cubin(spec: KernelSpec, arch: str) -> None:
    """No spills or stack, registers within ``gc.register_budget`` (a real bound: unrolling the
    K loop twice trips it), shared memory within the arch, HMMA.16816.F32 only."""
    assert not gc.cubin_problems(spec, arch), (spec.name, arch, gc.cubin_problems(spec, arch))


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


# --- lowering ---------------------------------------------------------------------------------


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out


def _lowerable(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LOWERABLE]


def _calls(gm) -> list[KernelCall]:
    return [m for m in gm.modules() if isinstance(m, KernelCall)]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("low", [F16, BF16], ids=str)
def test_lowering_replaces_every_matmul_and_conv(name, low):
    ex = EXAMPLES[name]
    x, y = batch(ex)
    plain = mpcompile.convert(ex.build().eval(), x, dtype=low)
    lowered = mpcompile.convert(ex.build().eval(), x, policy=Policy(dtype=low, kernels="on"))
    gm = lowered.executable
    assert not _lowerable(gm)
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert len(calls) == len(_lowerable(lowered.graph_module)) > 0  # one per matmul/conv
    assert len(_lowerable(plain.executable)) == len(calls)  # kernels="off" by default on CPU
    with torch.no_grad():
        a, b = _logits(plain(*x)), _logits(lowered(*x))
    assert ((a - b).abs().max() / a.abs().max()).item() <= 2 * unit_roundoff(low)
    rep = lowered.report(measure=False)
    assert len(rep.kernels) == len(calls)
    assert all(k.backend.startswith("reference (tensors on cpu") for k in rep.kernels)
    assert all(c.state is KernelState.REFERENCE for c in _calls(gm))
    assert "generated tensor-core kernels" in str(rep)
    assert "lowered" in lowered.explain(calls[0].name)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_lowered_training_step(name):
    ex = EXAMPLES[name]
    x, y = batch(ex)
    steps = []
    for kernels in ("off", "on"):
        m = ex.build().train()
        steps.append(mpcompile.compile_train_step(
            m, ex.loss, x, y, policy=Policy(kernels=kernels),
            optimizer=torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)))
    gm = steps[1].executable
    assert not _lowerable(gm) and _lowerable(steps[1].graph_module)
    kernels = _calls(gm)
    # weight gradients: the cast to FP32 and the 1/S unscale run in the kernel's epilogue
    assert any(k.spec.epilogue.ops == ("round", "scale") for k in kernels)
    for i in range(3):
        a, b = steps[0].step(*batch(ex, seed=i)), steps[1].step(*batch(ex, seed=i))
        assert abs(a.loss.item() - b.loss.item()) <= 4 * unit_roundoff(F16) * abs(a.loss.item())
    assert "generated kernels in the training graph" in str(steps[1].report())


def test_kernels_auto_lowers_only_on_cuda():
    ex = EXAMPLES["mlp"]
    x = batch(ex)[0]
    auto = mpcompile.convert(ex.build(), x)
    assert _lowerable(auto.executable) and not _calls(auto.executable)
    assert _calls(mpcompile.convert(ex.build(), x, policy=Policy(kernels="on")).executable)
    with pytest.raises(mpcompile.PolicyError, match="kernels='sometimes'"):
        Policy(kernels="sometimes")


# --- the GPU code paths, driven on CPU through the NumPy model of the kernels ---------------------


def _through_the_model(calls, monkeypatch, launcher=ModelLauncher) -> None:
    """Route each call's GPU path to ``launcher`` (the NumPy model) instead of CUDA."""
    for call in calls:
        monkeypatch.setattr(call, "_why_not_gpu", lambda *a: None)
        monkeypatch.setattr(call, "_kernel", lambda dev, call=call: launcher(call.spec))
        call.autotune = False


@pytest.mark.parametrize("name", ["cnn", "transformer", "catindex"])
def test_kernel_call_gpu_path_through_the_model(name, monkeypatch):
    """KernelCall's GPU path (operand strides, NHWC/KRSC conversions, split-K sums, output
    permutes) with the NumPy model in place of the CUDA launch: it must give what the reference
    path gives."""
    ex = EXAMPLES[name]
    x, y = batch(ex)
    m = ex.build().train()
    step = mpcompile.compile_train_step(m, ex.loss, x, y, policy=Policy(kernels="on"),
                                        optimizer=torch.optim.SGD(m.parameters(), lr=0.05))
    calls = _calls(step.executable)
    lr = torch.tensor(0.05, dtype=torch.float64)
    ref = step.executable(*step.state, lr, *x, y)
    wgrads = [c for c in calls if c.role is Kind.CONV_WGRAD]
    assert bool(wgrads) == (name == "cnn")
    for call in wgrads:  # exercise the split-K path too (FP32 partials, summed)
        call.spec = dataclasses.replace(call.spec, split_k=3, epilogue=dataclasses.replace(
            call.spec.epilogue, out="float32"))
    _through_the_model(calls, monkeypatch)
    got = step.executable(*step.state, lr, *x, y)
    assert all(c.state is KernelState.KERNEL for c in calls), [c.backend for c in calls]
    assert all(c.backend.startswith("generated kernel (checked on first use") for c in calls)
    for a, b in zip(got, ref):
        if a.is_floating_point():
            scale = b.double().abs().max().clamp(min=1e-30)
            assert ((a.double() - b.double()).abs().max() / scale).item() <= \
                4 * unit_roundoff(F16)


class _Broken(ModelLauncher):
    def __call__(self, a, b, c, bias=None, scale=None):
        super().__call__(a, b, c, bias, scale)
        c.mul_(1.01)  # 1% off: far beyond 16 u of FP16


class _Idle(ModelLauncher):
    def __call__(self, *args):
        pass  # writes nothing


def test_gpu_check_plumbing_through_the_model():
    """scripts/gpu_check.py's launch plumbing and error bound, with the model as the kernel; a
    kernel 1% off or one that writes nothing must fail the same check."""
    cases = [gc.Case("gemm", gc.gemm_spec("float16", 70, 45, 40)),
             gc.Case("gemm cc", gc.gemm_spec("bfloat16", 72, 48, 40, "col", "col",
                                             ("bias_n", "relu"))),
             gc.Case("gemm gelu", gc.gemm_spec("float16", 64, 40, 48, ops=("bias_n", "gelu"))),
             gc.Case("gemm rs", gc.gemm_spec("float16", 64, 80, 96, "col", "row",
                                             ("round", "scale"), "float32")),
             gc.Case("bmm", gc.gemm_spec("float16", 40, 24, 16, batch=3))]
    cv = Conv(2, 9, 9, 8, 16, 3, 3, (2, 2), (1, 1))
    for kind in (Kind.CONV_FPROP, Kind.CONV_DGRAD, Kind.CONV_WGRAD):
        spec = gc.conv_spec(kind, "float16", cv)
        if kind is Kind.CONV_WGRAD:
            spec = dataclasses.replace(spec, split_k=3, epilogue=dataclasses.replace(
                spec.epilogue, out="float32"))
        cases.append(gc.Case(kind.value, spec))
    cpu = torch.device("cpu")
    for case in cases:
        r = gc.check_case(case, cpu, None, 1, loader=ModelLauncher)
        assert r["ok"] and r["unwritten"] == 0, (case.name, r)
    for case in (cases[0], cases[3], cases[-1]):
        r = gc.check_case(case, cpu, None, 1, loader=_Broken)
        assert not r["ok"] and r["err/bound"] > 1, (case.name, r)
        r = gc.check_case(case, cpu, None, 1, loader=_Idle)
        assert not r["ok"] and r["unwritten"] > 0, (case.name, r)
    assert len(gc.catalog(quick=False)) >= 40


@needs_nvrtc
def test_gpu_check_compile_only_mode(capsys, monkeypatch):
    """The mode's plumbing on one GEMM and the three convolution kinds (``-m slow``: all)."""
    quick = gc.catalog(quick=True)
    some = quick[:1] + [c for c in quick if c.spec.kind is not Kind.GEMM][:3]
    monkeypatch.setattr(gc, "catalog", lambda quick: some)
    assert gc.main(["--compile-only", "--arch", "sm_80"]) == 0
    assert "compiled 4 kernels for sm_80" in capsys.readouterr().out
    monkeypatch.setattr(gc, "register_budget", lambda tile: 16)  # now every kernel is over
    assert gc.main(["--compile-only", "--arch", "sm_80"]) == 1


@pytest.mark.slow
@needs_nvrtc
def test_gpu_check_compile_only_mode_whole_catalog():
    assert gc.main(["--compile-only"]) == 0


def test_a_wrong_kernel_is_caught_on_first_use(monkeypatch):
    """A kernel whose result disagrees with the library op is dropped for the library, loudly."""
    ex = EXAMPLES["mlp"]
    x, _ = batch(ex)
    mpm = mpcompile.convert(ex.build().eval(), x, policy=Policy(kernels="on"))
    calls = _calls(mpm.executable)
    _through_the_model(calls, monkeypatch, launcher=_Broken)
    with torch.no_grad():
        out = mpm(*x)
    assert all(c.state is KernelState.LIBRARY and "differed from cuBLAS/cuDNN" in c.backend
               for c in calls)
    with torch.no_grad():
        ref = mpcompile.convert(ex.build().eval(), x)(*x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 4 * unit_roundoff(F16)

