"""Generated tensor-core kernels, checked without a GPU.

- the PTX ISA fragment layouts and ldmatrix delivery, transcribed from the ISA's tables;
- the NumPy model of a kernel (same mapping functions the renderer emits) against a float64
  matmul / torch convolution, on shapes that are not tile multiples, every layout and copy width;
- spec validation;
- snapshots of the generated source;
- NVRTC -> cubin for sm_80 and sm_90 of every kernel the lowering chooses for the test models:
  ptxas reports no spills, SASS has HMMA.16816.F32 and no FP16-accumulating HMMA;
- the lowering pass: every matmul/conv of the test models (forward and training step) becomes a
  kernel call, and on CPU (the reference contract) the lowered graph gives the unlowered results.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import mpcompile
from mpcompile import Policy
from mpcompile.codegen import mapping as mp
from mpcompile.codegen import model
from mpcompile.codegen.render import render_source
from mpcompile.codegen.spec import SMEM_LIMIT, Conv, Epilogue, KernelSpec, SpecError, Tile
from mpcompile.examples import EXAMPLES, batch
from mpcompile.passes.lower import LOWERABLE
from mpcompile.runtime import nvrtc, sass
from mpcompile.runtime.kernel import KernelCall

F16, BF16 = torch.float16, torch.bfloat16
U = {F16: 2.0**-11, BF16: 2.0**-8}
SNAPSHOTS = Path(__file__).parent / "snapshots"
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
    np.testing.assert_allclose(out, model.gelu(a @ b + bias), rtol=1e-12, atol=1e-12)


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
def test_generated_source_snapshot(name):
    src = render_source(SNAPSHOT_SPECS[name])
    path = SNAPSHOTS / f"{name}.cu"
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(src)
    assert path.exists(), "run with UPDATE_SNAPSHOTS=1 to create the snapshot"
    assert src == path.read_text(), f"{name}: generated source changed (UPDATE_SNAPSHOTS=1)"
    assert "#include" not in src and "cutlass" not in src.lower()
    assert "mma.sync.aligned.m16n8k16.row.col.f32" in src and "ldmatrix" in src


# --- compiling every kernel the lowering chooses ----------------------------------------------


def lowered_specs() -> dict[str, KernelSpec]:
    specs = {}
    for name in sorted(EXAMPLES):
        for low in (F16, BF16):
            ex = EXAMPLES[name]
            x, y = batch(ex)
            policy = Policy(dtype=low, kernels="on")
            mpm = mpcompile.convert(ex.build().eval(), x, policy=policy)
            m = ex.build().train()
            step = mpcompile.compile_train_step(m, ex.loss, x, y, policy=policy,
                                                optimizer=torch.optim.SGD(m.parameters(), 0.1))
            for gm in (mpm.graph_module, step.graph_module):
                for mod in gm.modules():
                    if isinstance(mod, KernelCall):
                        specs[mod.spec.name] = mod.spec
    return specs


@needs_nvrtc
def test_every_lowered_kernel_compiles_for_sm80_and_sm90(tmp_path, monkeypatch):
    monkeypatch.setenv("MPCOMPILE_CACHE", str(tmp_path))
    specs = {**lowered_specs(), **{s.name: s for s in SNAPSHOT_SPECS.values()}}
    assert len(specs) > 50
    for spec in specs.values():
        src = render_source(spec)
        for arch in ("sm_80", "sm_90"):
            c = nvrtc.compile_cubin(src, spec.name, arch)
            assert c.info.spill_stores == c.info.spill_loads == 0, (spec.name, arch, c.log)
            assert c.info.stack_frame == 0 and 0 < c.info.registers <= 255, (spec.name, c.info)
            assert spec.tile.smem_bytes <= SMEM_LIMIT[arch]  # dynamic shared memory per block
            mma = set(sass.mma_instructions(sass.disassemble(c.cubin)))
            assert mma and all(i.startswith("HMMA.16816.F32") for i in mma), (spec.name, mma)
    # the disk cache answers a second request
    spec = next(iter(specs.values()))
    assert nvrtc.compile_cubin(render_source(spec), spec.name, "sm_80").cached


@needs_nvrtc
def test_compile_errors_name_the_kernel():
    with pytest.raises(nvrtc.CompileError, match="mpk_broken does not compile for sm_80"):
        nvrtc.compile_cubin("extern \"C\" __global__ void mpk_broken() { oops; }",
                            "mpk_broken", "sm_80", use_cache=False)


# --- lowering ---------------------------------------------------------------------------------


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("low", [F16, BF16], ids=str)
def test_lowering_replaces_every_matmul_and_conv(name, low):
    ex = EXAMPLES[name]
    x, y = batch(ex)
    plain = mpcompile.convert(ex.build().eval(), x, dtype=low)
    lowered = mpcompile.convert(ex.build().eval(), x, policy=Policy(dtype=low, kernels="on"))
    gm = lowered.graph_module
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LOWERABLE]
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    n_dots = len([n for n in plain.graph_module.graph.nodes if n.target in LOWERABLE])
    assert len(calls) == n_dots > 0
    with torch.no_grad():
        a, b = _logits(plain(*x)), _logits(lowered(*x))
    assert ((a - b).abs().max() / a.abs().max()).item() <= 2 * U[low]
    rep = lowered.report(measure=False)
    assert len(rep.kernels) == len(calls)
    assert all(k.backend.startswith("reference (tensors on cpu") for k in rep.kernels)
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
    gm = steps[1].graph_module
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LOWERABLE]
    kernels = [m for m in gm.modules() if isinstance(m, KernelCall)]
    # weight gradients: the cast to FP32 and the 1/S unscale run in the kernel's epilogue
    assert any(k.spec.epilogue.ops == ("round", "scale") for k in kernels)
    for i in range(3):
        a, b = steps[0].step(*batch(ex, seed=i)), steps[1].step(*batch(ex, seed=i))
        assert abs(a.loss.item() - b.loss.item()) <= 4 * U[F16] * abs(a.loss.item())
    assert "generated kernels in the training graph" in str(steps[1].report())


def test_kernels_auto_lowers_only_on_cuda():
    ex = EXAMPLES["mlp"]
    mpm = mpcompile.convert(ex.build(), batch(ex)[0])
    assert not [n for n in mpm.graph_module.graph.nodes if n.op == "call_module"]
    with pytest.raises(mpcompile.PolicyError, match="kernels='sometimes'"):
        Policy(kernels="sometimes")


# --- the GPU code paths, driven on CPU through the NumPy model of the kernels ---------------------


@pytest.mark.parametrize("name", ["cnn", "transformer", "catindex"])
def test_kernel_call_gpu_path_through_the_model(name, monkeypatch):
    """KernelCall's GPU path (operand strides, NHWC/KRSC conversions, split-K sums, output
    permutes) with the NumPy model in place of the CUDA launch: it must give what the reference
    path gives."""
    import dataclasses

    from mpcompile.codegen.model import ModelLauncher

    ex = EXAMPLES[name]
    x, y = batch(ex)
    m = ex.build().train()
    step = mpcompile.compile_train_step(m, ex.loss, x, y, policy=Policy(kernels="on"),
                                        optimizer=torch.optim.SGD(m.parameters(), lr=0.05))
    calls = [mod for mod in step.graph_module.modules() if isinstance(mod, KernelCall)]
    ref = step.graph_module(*step._state, torch.tensor(0.05, dtype=torch.float64), *x, y)
    for call in calls:
        if call.role == "wgrad":  # exercise the split-K path too (FP32 partials, summed)
            call.spec = dataclasses.replace(call.spec, split_k=3, epilogue=dataclasses.replace(
                call.spec.epilogue, out="float32"))
        monkeypatch.setattr(call, "_why_not_gpu", lambda *a: None)
        monkeypatch.setattr(call, "_kernel", lambda dev, call=call: ModelLauncher(call.spec))
        call.autotune = False
    got = step.graph_module(*step._state, torch.tensor(0.05, dtype=torch.float64), *x, y)
    assert all(c.backend.startswith("generated kernel (checked on first use") for c in calls)
    assert any(c.spec.split_k > 1 for c in calls) or name != "cnn"
    for a, b in zip(got, ref):
        if a.is_floating_point():
            scale = b.double().abs().max().clamp(min=1e-30)
            assert ((a.double() - b.double()).abs().max() / scale).item() <= 4 * U[F16]


def test_gpu_check_plumbing_through_the_model():
    """scripts/gpu_check.py's launch plumbing and error bound, with the model as the kernel."""
    import dataclasses
    import sys

    from mpcompile.codegen.model import ModelLauncher
    from mpcompile.codegen.spec import Kind

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import gpu_check as gc

    cases = [gc.Case("gemm", gc.gemm_spec("float16", 70, 45, 40)),
             gc.Case("gemm cc", gc.gemm_spec("bfloat16", 72, 48, 40, "col", "col",
                                             ("bias_n", "relu"))),
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
    for case in cases:
        r = gc.check_case(case, torch.device("cpu"), None, 1, loader=ModelLauncher)
        assert r["ok"] and r["unwritten"] == 0, (case.name, r)
    assert len(gc.catalog(quick=False)) >= 40


@needs_nvrtc
def test_gpu_check_compile_only_mode():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import gpu_check as gc

    assert gc.main(["--compile-only", "--quick"]) == 0


def test_a_wrong_kernel_is_caught_on_first_use(monkeypatch):
    """A kernel whose result disagrees with the library op is dropped for the library, loudly."""
    from mpcompile.codegen.model import ModelLauncher

    class Broken(ModelLauncher):
        def __call__(self, a, b, c, bias=None, scale=None):
            super().__call__(a, b, c, bias, scale)
            c.mul_(1.01)  # 1% off: far beyond 16 u of FP16

    ex = EXAMPLES["mlp"]
    x, _ = batch(ex)
    mpm = mpcompile.convert(ex.build().eval(), x, policy=Policy(kernels="on"))
    calls = [m for m in mpm.graph_module.modules() if isinstance(m, KernelCall)]
    for call in calls:
        monkeypatch.setattr(call, "_why_not_gpu", lambda *a: None)
        monkeypatch.setattr(call, "_kernel", lambda dev, call=call: Broken(call.spec))
        call.autotune = False
    with torch.no_grad():
        out = mpm(*x)
    assert all(c.choice == "library" and "differed from cuBLAS/cuDNN" in c.backend
               for c in calls)
    with torch.no_grad():
        ref = mpcompile.convert(ex.build().eval(), x)(*x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 4 * U[F16]
