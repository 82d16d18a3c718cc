"""The generated kernels as the custom op ``torch.ops.mpcompile.kernel``, on CPU: autograd
through converted models and through each kind against an independent float64 oracle, opcheck,
Inductor keeping the op as an extern call, the training step; the first-use verification
functions fed correct and broken "kernels"; the runtime's decisions (verified kernels only,
autotune among passing candidates, no NVRTC); operand realignment; the lowering decision."""

import dataclasses
import logging
import math
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import mpcompile
from mpcompile import Policy
from mpcompile.codegen.epilogue import OPS, Operands, channel_view
from mpcompile.codegen.model import ModelLauncher
from mpcompile.codegen.spec import Conv, Epilogue, KernelSpec, Kind, widest_vec
from mpcompile.codegen.tiles import choose_tile, conv_spec
from mpcompile.dtypes import unit_roundoff
from mpcompile.errors import KernelError
from mpcompile.examples import EXAMPLES, batch
from mpcompile.passes import kernels as kernels_pass
from mpcompile.runtime import verify
from mpcompile.runtime.kernel import (
    KernelCall,
    KernelState,
    Runtime,
    check_launchable,
    launch_result,
    library_result,
    realign,
    reference_result,
    using,
)
from mpcompile.runtime.launch import LaunchError
from mpcompile.runtime.ops import Call, ConvArgs, encode, kernel

F16, BF16 = torch.float16, torch.bfloat16
U16 = unit_roundoff(F16)
OP_CALL = re.compile(r"= torch\.ops\.mpcompile\.kernel\.default\(")


def gemm_call(m, n, k, ops=(), out="float16", dtype="float16", a_layout="row", b_layout="row",
              batch=1, bias_dtype=None, final=None) -> Call:
    lda = k if a_layout == "row" else m
    ldb = n if b_layout == "row" else k
    vec_a = widest_vec(k if a_layout == "row" else m, lda)
    vec_b = widest_vec(n if b_layout == "row" else k, ldb)
    spec = KernelSpec(Kind.GEMM, dtype, m, n, k, tile=choose_tile(m, n, min(vec_a, vec_b)),
                      epilogue=Epilogue(tuple(ops), out, bias_dtype or dtype), batch=batch,
                      a_layout=a_layout, b_layout=b_layout, lda=lda, ldb=ldb, ldc=n,
                      batch_stride_a=m * k if batch > 1 else 0,
                      batch_stride_b=k * n if batch > 1 else 0,
                      batch_stride_c=m * n if batch > 1 else 0,
                      vec_a=vec_a, vec_b=vec_b)
    return Call(spec, "bias_n" in ops, "scale" in ops, final=final or out)


CV = Conv(2, 9, 9, 8, 16, 3, 3, (2, 2), (1, 1))
CONV_ARGS = ConvArgs(CV.stride, CV.pad, CV.dil, (CV.n, CV.c, CV.h, CV.w), (CV.k, CV.c, CV.r, CV.s))


def conv_call(kind, ops=(), out=None, split_k=1) -> Call:
    spec = conv_spec(kind, "float16", CV, tuple(ops), out)
    final = spec.epilogue.out
    if split_k > 1:
        spec = dataclasses.replace(spec, split_k=split_k, epilogue=dataclasses.replace(
            spec.epilogue, out="float32"))
    return Call(spec, "bias_n" in ops, "scale" in ops, CONV_ARGS, final)


CALLS = {
    "gemm": gemm_call(40, 24, 32),
    "gemm bias relu": gemm_call(48, 40, 32, ("bias_n", "relu")),
    "gemm bias gelu": gemm_call(40, 32, 48, ("bias_n", "gelu"), b_layout="col"),
    "gemm gelu_tanh cc": gemm_call(32, 24, 40, ("gelu_tanh",), a_layout="col", b_layout="col"),
    "gemm round scale": gemm_call(32, 48, 64, ("round", "scale"), out="float32"),
    "bmm": gemm_call(24, 16, 32, batch=3),
    "gemm bf16 f32 bias": gemm_call(32, 24, 40, ("bias_n",), dtype="bfloat16",
                                    bias_dtype="float32"),
    "conv fprop bias relu": conv_call(Kind.CONV_FPROP, ("bias_n", "relu")),
    "conv dgrad": conv_call(Kind.CONV_DGRAD),
    "conv wgrad split-K": conv_call(Kind.CONV_WGRAD, split_k=3),
}


def operands(call: Call, seed=0, requires_grad=False):
    """(a, b, bias, scale) as the op takes them: random values, the spec's strides."""
    a, b, bias, scale = verify.make_operands(call.problem, "random", "cpu",
                                             torch.Generator().manual_seed(seed))
    if scale is not None:
        scale = torch.tensor(0.75)
    if requires_grad:
        for t in (a, b, bias, scale):
            if t is not None:
                t.requires_grad_()
    return a, b, bias, scale


def relerr(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def _calls(gm) -> list[KernelCall]:
    return [m for m in gm.modules() if isinstance(m, KernelCall)]


# --- autograd ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_convert_backward_with_kernels_matches_off(name):
    """convert(kernels="on") + backward runs the kernel op's autograd formula; its parameter
    gradients match kernels="off" (torch's own autograd). Not bit-exact: the kernel rounds the
    accumulator once after its epilogue, the unlowered graph after the product and again after
    bias/activation, so outputs differ by O(u) per layer (measured worst 1.74 u, CNN); 4 u."""
    ex = EXAMPLES[name]
    x, y = batch(ex)
    grads, calls = [], []
    for kernels in ("off", "on"):
        m = ex.build().train()
        mp = mpcompile.convert(m, x, policy=Policy(kernels=kernels), backend="eager")
        ex.loss(mp(*x), y).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
        calls.append(_calls(mp.executable))
    assert not calls[0] and calls[1]
    assert all(c.state is KernelState.REFERENCE for c in calls[1])
    for n, want in grads[0].items():
        assert grads[1][n] is not None and grads[1][n].dtype == want.dtype, n
        assert relerr(grads[1][n], want) <= 4 * U16, n


def _oracle_grads(call: Call, a, b, bias, scale, g):
    """Gradients in float64 by torch autograd through the contract written with torch's own
    differentiable ops: independent of the op's hand-written backward."""
    sp, cv = call.spec, call.conv
    leaves = [t.detach().double().requires_grad_() if t is not None else None
              for t in (a, b, bias, scale)]
    a64, b64, bias64, scale64 = leaves
    args = (cv.stride, cv.padding, cv.dilation) if cv else ()
    if sp.kind is Kind.GEMM:
        x = a64 @ b64
    elif sp.kind is Kind.CONV_FPROP:
        x = torch.nn.functional.conv2d(a64, b64, None, *args)
    elif sp.kind is Kind.CONV_DGRAD:  # the input gradient of conv(x, w) seeded with dy
        xin = torch.zeros(cv.input_shape, dtype=torch.float64, requires_grad=True)
        y = torch.nn.functional.conv2d(xin, b64, None, *args)
        (x,) = torch.autograd.grad(y, xin, a64, create_graph=True)
    else:
        w = torch.zeros(cv.weight_shape, dtype=torch.float64, requires_grad=True)
        y = torch.nn.functional.conv2d(b64, w, None, *args)
        (x,) = torch.autograd.grad(y, w, a64, create_graph=True)
    dim = {Kind.GEMM: -1, Kind.CONV_WGRAD: 0}.get(sp.kind, 1)
    o = Operands(sp.dtype, None if bias64 is None else channel_view(bias64, x.dim(), dim),
                 scale64)
    for op in sp.epilogue.ops:
        x = OPS[op].torch(x, o)
    live = [t for t in leaves if t is not None]
    return torch.autograd.grad(x, live, g.double())


@pytest.mark.parametrize("name", sorted(CALLS))
def test_kernel_op_gradients_against_float64_autograd(name):
    """The op's backward (every kind, every epilogue op, scale gradient included) against torch
    autograd of the same contract in float64. The op computes gradients as the unlowered graph
    does: the accumulator's gradient rounded to FP16, one library product (FP32 accumulation,
    one rounding), gelu's derivative at the FP16-rounded pre-activation: a few u; 4 u."""
    call = CALLS[name]
    a, b, bias, scale = operands(call, requires_grad=True)
    with using(Runtime()):
        out = kernel(a, b, bias, scale, encode(call), "on", False)
    assert out.dtype == getattr(torch, call.final)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    live = [t for t in (a, b, bias, scale) if t is not None]
    got = torch.autograd.grad(out, live, g)
    want = _oracle_grads(call, a, b, bias, scale, g)
    for t, gt, wt in zip(live, got, want):
        assert gt.dtype == t.dtype and gt.shape == t.shape
        u = unit_roundoff(call.spec.dtype)
        assert relerr(gt, wt) <= 4 * u, (name, tuple(t.shape), relerr(gt, wt) / u)


@pytest.mark.parametrize("name", ["gemm bias relu", "gemm bias gelu", "gemm round scale", "bmm",
                                  "conv fprop bias relu", "conv dgrad", "conv wgrad split-K"])
def test_opcheck(name):
    """torch.library.opcheck: schema, autograd registration, fake tensor vs real (shapes,
    strides, dtypes), AOT dispatch with dynamic shapes."""
    call = CALLS[name]
    a, b, bias, scale = operands(call, requires_grad=True)
    with using(Runtime()):
        torch.library.opcheck(torch.ops.mpcompile.kernel.default,
                              (a, b, bias, scale, encode(call), "on", False))


# --- compilers --------------------------------------------------------------------------------


def test_inductor_keeps_the_kernel_op_as_an_extern_call():
    """torch.compile (Inductor) of a converted model with kernels="on": each KernelCall is one
    call of the custom op in the generated code (the reference inside it is not inlined: no
    matmul in the forward code), forward and backward match the eager kernel path."""
    ex = EXAMPLES["mlp"]
    x, y = batch(ex)
    models, outs = [], []
    for backend in ("eager", "inductor"):
        m = ex.build().train()
        mp = mpcompile.convert(m, x, policy=Policy(kernels="on"), backend=backend)
        loss, codes = run_and_get_code(lambda mp=mp: ex.loss(mp(*x), y))
        loss.backward()
        models.append(m)
        outs.append((loss, codes, mp))
    (loss_e, _, _), (loss_i, codes, mp) = outs
    assert mp.execution.backend == "inductor"
    n_calls = len(_calls(mp.executable))
    assert n_calls == 2
    # forward code: one op call per KernelCall; backward code (if compiled yet): none, its
    # products are the library's
    assert [len(OP_CALL.findall(c)) for c in codes] == [n_calls] + [0] * (len(codes) - 1)
    assert "extern_kernels.mm" not in codes[0] and "aten.mm" not in codes[0]
    assert relerr(loss_i, loss_e) <= 2 * U16
    for (n, pe), pi in zip(models[0].named_parameters(), models[1].parameters()):
        assert relerr(pi.grad, pe.grad) <= 4 * U16, n


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_training_step_with_kernels_matches_off(backend):
    """compile_train_step with kernels="on" (the step graph lowered, Inductor keeping the op)
    runs and tracks kernels="off" over 3 steps (losses within 4 u, as the lowering tests)."""
    ex = EXAMPLES["cnn"]
    x, y = batch(ex)
    steps = []
    for kernels in ("off", "on"):
        m = ex.build().train()
        steps.append(mpcompile.compile_train_step(
            m, ex.loss, x, y, policy=Policy(kernels=kernels), backend=backend,
            optimizer=torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)))
    calls = _calls(steps[1].executable)
    assert {c.role for c in calls} == {Kind.CONV_FPROP, Kind.CONV_DGRAD, Kind.CONV_WGRAD,
                                       Kind.GEMM}
    for i in range(3):
        if i == 0 and backend == "inductor":
            (b,), codes = run_and_get_code(lambda: (steps[1].step(*batch(ex, seed=0)),))
            assert sum(len(OP_CALL.findall(c)) for c in codes) == len(calls)
            a = steps[0].step(*batch(ex, seed=0))
        else:
            a, b = steps[0].step(*batch(ex, seed=i)), steps[1].step(*batch(ex, seed=i))
        assert abs(a.loss.item() - b.loss.item()) <= 4 * U16 * abs(a.loss.item())
    assert all(c.state is KernelState.REFERENCE for c in calls)


def test_fake_tensors_leave_the_runtime_alone():
    call = CALLS["conv fprop bias relu"]
    a, b, bias, scale = operands(call)
    rt = Runtime()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with using(rt), FakeTensorMode() as mode:
        fa, fb, fbias = (mode.from_tensor(t) for t in (a, b, bias))
        out = kernel(fa, fb, fbias, None, encode(call), "on", False)
    assert out.shape == (CV.n, CV.k, CV.p, CV.q) and out.dtype == F16
    assert not rt.last


# --- verification -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,out", [("float16", "float16"), ("bfloat16", "bfloat16"),
                                       ("float16", "float32"), ("bfloat16", "float32")])
@pytest.mark.parametrize("k", [16, 100, 4096, 100352])
def test_integer_limit_keeps_every_sum_exact(dtype, out, k):
    """The worst case (every operand and the bias = v, K terms) is exact in FP32 and finite in
    the output; v + 1 would break one of the conditions (or v is the dtype's exact limit)."""
    v = verify.integer_limit(k, dtype, out)
    if v is None:
        assert (k + 1) > torch.finfo(getattr(torch, out)).max
        return
    worst = (k + 1) * v * v
    assert worst < 2 ** 24 and worst <= torch.finfo(getattr(torch, out)).max
    assert float(torch.tensor(float(v)).to(getattr(torch, dtype))) == v
    nxt = (k + 1) * (v + 1) ** 2
    assert v == verify.max_exact_integer(dtype) or nxt >= 2 ** 24 or \
        nxt > torch.finfo(getattr(torch, out)).max


def test_integer_limit_values():
    assert verify.integer_limit(64, "float16", "float16") == 31  # 65 * 31^2 <= 65504
    assert verify.integer_limit(16, "float16", "float32") == 993  # 17 * 993^2 < 2^24
    assert verify.integer_limit(4, "bfloat16", "float32") == 256  # bf16's exact integers
    assert verify.integer_limit(100352, "float16", "float32") == 12  # res2 weight gradient
    assert verify.integer_limit(70000, "float16", "float16") is None


def _through_model(call: Call, launcher_cls=ModelLauncher):
    """A ``launch`` for verify(): the runtime's launch path with ``launcher_cls`` as kernel."""
    def launch(a, b, bias, scale, alloc):
        return launch_result(launcher_cls(call.spec), call, call.spec, a, b, bias, scale, alloc)
    return launch


class _Idle(ModelLauncher):
    def __call__(self, a, b, c, bias=None, scale=None):
        keep = c.clone()
        super().__call__(a, b, c, bias, scale)
        c.view(-1)[-1] = keep.view(-1)[-1]  # leaves its last output element unwritten


class _OneUlp(ModelLauncher):
    def __call__(self, a, b, c, bias=None, scale=None):
        super().__call__(a, b, c, bias, scale)
        flat = c.view(-1)
        i = flat.numel() // 2
        flat[i] = torch.nextafter(flat[i:i + 1], torch.full_like(flat[i:i + 1], math.inf))[0]


class _Percent(ModelLauncher):
    def __call__(self, a, b, c, bias=None, scale=None):
        super().__call__(a, b, c, bias, scale)
        c.mul_(1.01)


class _ShortK(ModelLauncher):
    """Drops the last K element: a wrong loop bound."""

    def __call__(self, a, b, c, bias=None, scale=None):
        sp = self.spec
        if sp.kind is Kind.GEMM and sp.a_layout == "row" and sp.b_layout == "row":
            a = a.clone()
            a[..., -1] = 0
        super().__call__(a, b, c, bias, scale)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_verify_accepts_the_reference_and_the_model(name):
    call = CALLS[name]

    def reference(a, b, bias, scale, alloc):
        return reference_result(call, a, b, bias, scale)

    v = verify.verify(call.problem, reference, "cpu")
    assert v.ok, v.detail
    v = verify.verify(call.problem, _through_model(call), "cpu")
    assert v.ok and "exact on integers" in v.detail, v.detail


@pytest.mark.parametrize("name", ["gemm", "gemm bias relu", "gemm round scale",
                                  "conv fprop bias relu", "conv wgrad split-K"])
def test_verify_rejects_broken_kernels(name):
    """An unwritten element (poisoned output), one ulp off in one element (exact-integer check),
    1 % off everywhere (both checks)."""
    call = CALLS[name]
    v = verify.verify(call.problem, _through_model(call, _Idle), "cpu")
    assert not v.ok and "NaN" in v.detail, v.detail
    v = verify.verify(call.problem, _through_model(call, _Percent), "cpu")
    assert not v.ok, v.detail
    if call.spec.split_k == 1:  # split-K partials: one ulp of one partial may vanish in the sum
        v = verify.verify(call.problem, _through_model(call, _OneUlp), "cpu")
        assert not v.ok and "differ from the exact integer result" in v.detail, v.detail


def test_verify_rejects_a_lost_k_slice_on_random_inputs_too():
    call = CALLS["gemm"]
    ops = verify.make_operands(call.problem, "random", "cpu", torch.Generator().manual_seed(0))
    got = _through_model(call, _ShortK)(*ops, alloc=verify.poisoned)
    want, bound = verify.expected(call.problem, *ops)
    why, worst = verify.check_bounded(call.problem, got, want, bound)
    assert why is not None and worst > 1
    good = _through_model(call)(*ops, alloc=verify.poisoned)
    assert verify.check_bounded(call.problem, good, want, bound) == (None, pytest.approx(
        verify.check_bounded(call.problem, good, want, bound)[1]))
    assert verify.check_bounded(call.problem, good, want, bound)[1] < 1


@pytest.mark.parametrize("out", ["float32", "float16"])
def test_the_sqrt_k_bound_catches_a_lost_k_slice_at_long_k(out):
    """K = 100352 (the res2 weight gradient): an FP32 accumulation passes the shared bound with a
    wide margin, one lost k-slice of 32 products fails it (a K u32 bound would accept it)."""
    call = gemm_call(16, 16, 100352, out=out)
    a, b, bias, scale = verify.make_operands(call.problem, "random", "cpu",
                                             torch.Generator().manual_seed(0))
    want, bound = verify.expected(call.problem, a, b, bias, scale)
    dt = getattr(torch, out)
    honest = (a.float() @ b.float()).to(dt)
    why, worst = verify.check_bounded(call.problem, honest, want, bound)
    assert why is None and worst < 0.5, worst
    lost = (a[:, 32:].float() @ b[32:].float()).to(dt)
    why, worst = verify.check_bounded(call.problem, lost, want, bound)
    assert why is not None and worst > 1, worst


def _truncating_accumulation(a: torch.Tensor, b: torch.Tensor, step: int = 16) -> torch.Tensor:
    """A @ B as a tensor core might accumulate it: exact products of each k16 block summed in
    float64, then the FP32 accumulator rounded toward zero after every block (the worst
    documented rounding; round-to-nearest errs less)."""
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    a64, b64 = a.double(), b.double()
    for k0 in range(0, a.shape[1], step):
        exact = acc + a64[:, k0:k0 + step] @ b64[k0:k0 + step]
        r = exact.float()
        toward_zero = torch.nextafter(r, torch.zeros_like(r))
        acc = torch.where(r.double().abs() > exact.abs(), toward_zero, r).double()
    return acc.float()


@pytest.mark.parametrize("k", [4096, 100352])
def test_a_truncating_fp32_accumulator_passes_the_shared_bound(k):
    """The reason C_SQRT_K is 2 and not smaller: a correct kernel whose FP32 accumulator
    truncates after every k16 step must pass, with margin (measured: 0.05 of the bound at
    K = 4096, 0.06 at K = 100352), on the verification's own random inputs, while one lost
    k-slice of 32 products fails (measured: 565x and 5.2x the bound)."""
    call = gemm_call(8, 8, k, out="float32")
    a, b, bias, scale = verify.make_operands(call.problem, "random", "cpu",
                                             torch.Generator().manual_seed(1))
    want, bound = verify.expected(call.problem, a, b, bias, scale)
    why, worst = verify.check_bounded(call.problem, _truncating_accumulation(a, b), want, bound)
    assert why is None and worst < 0.25, worst
    lost = _truncating_accumulation(a[:, 32:], b[32:])
    why, worst = verify.check_bounded(call.problem, lost, want, bound)
    assert why is not None and worst > 1, worst


def test_poisoning_is_what_catches_an_unwritten_element():
    """With a zero-filled output the idle kernel's element can pass; poisoned, it cannot."""
    call = CALLS["gemm bias relu"]
    ops = verify.make_operands(call.problem, "int", "cpu", torch.Generator().manual_seed(0), v=3)
    want, bound = verify.expected(call.problem, *ops, exact=True)
    zeros = lambda shape, dtype, device: torch.zeros(shape, dtype=dtype)  # noqa: E731
    idle = _through_model(call, _Idle)
    # relu makes many exact results 0, so a zero-filled buffer can hide the element
    got_zero = idle(*ops, alloc=zeros)
    got_nan = idle(*ops, alloc=verify.poisoned)
    assert verify.check_exact(call.problem, got_nan, want, bound)[0] is not None
    got_guarded = idle(*ops, alloc=verify.Guarded())
    assert verify.check_exact(call.problem, got_guarded, want, bound)[0] is not None
    if want.view(-1)[-1] == 0:
        assert verify.check_exact(call.problem, got_zero, want, bound) == (None, 0)


class _Overrun(ModelLauncher):
    """Right output, plus one store just past its end (or before its start)."""

    offset = 1

    def __call__(self, a, b, c, bias=None, scale=None):
        super().__call__(a, b, c, bias, scale)
        if self.offset > 0:
            torch.as_strided(c, (c.numel() + 1,), (1,))[-1] = 0
        else:
            torch.as_strided(c, (1,), (1,), c.storage_offset() - 1)[0] = 0


class _Underrun(_Overrun):
    offset = -1


@pytest.mark.parametrize("name", ["gemm", "conv wgrad split-K"])
def test_verify_catches_a_write_outside_the_output(name):
    """The runtime's verification allocates outputs between canaries (``verify.Guarded``
    through ``launch_result``'s ``alloc``): a kernel whose output is right but that also stores
    one element past its end, or before its start, fails; the canaries alone catch it."""
    call = CALLS[name]
    for cls in (_Overrun, _Underrun):
        r = verify.run_checks(call.problem, _through_model(call, cls), "cpu")
        assert not r.ok and r.canary_damage == 2, r  # one per launch (integers, random)
        assert r.int_mismatches in (0, None) and r.err_bound <= 1 and r.unwritten == 0, r
        v = verify.verify(call.problem, _through_model(call, cls), "cpu")
        assert not v.ok and "canary" in v.detail, v.detail
    assert verify.run_checks(call.problem, _through_model(call), "cpu").canary_damage == 0


def test_verify_pads_gemm_operands_with_nan():
    """A spec with padded leading dimensions gets operands whose padding is NaN."""
    call = gemm_call(16, 16, 16)
    spec = dataclasses.replace(call.spec, lda=24)
    problem = dataclasses.replace(call.problem, spec=spec)
    a, *_ = verify.make_operands(problem, "random", "cpu", torch.Generator().manual_seed(0))
    assert a.stride() == (24, 1)
    storage = torch.as_strided(a, (16 * 24 - 8,), (1,))
    assert torch.isnan(storage).sum() == 15 * 8 and not torch.isnan(a).any()


# --- the runtime's decisions ------------------------------------------------------------------


class _Clock:
    """Stands in for CUDA-event timing: each launcher reports a time by its tile's name."""

    def __init__(self, ms: dict[str, float], library: float):
        self.ms, self.library, self.last = ms, library, None

    def loader(self, broken_tile=None):
        clock = self

        def load(spec, device):
            base = _Percent if spec.tile.bm == broken_tile else ModelLauncher

            class Timed(base):
                def __call__(self, *args):
                    clock.last = f"{spec.tile.bm}x{spec.tile.bn}x{spec.tile.bk}"
                    super().__call__(*args)
            return Timed(spec)
        return load

    def __call__(self, fn) -> float:
        self.last = None
        fn()
        return self.ms.get(self.last, 5.0) if self.last else self.library


def _run(rt: Runtime, call: Call, mode="auto", autotune=True, seed=0):
    a, b, bias, scale = operands(call, seed)
    with using(rt):
        return kernel(a, b, bias, scale, encode(call), mode, autotune), (a, b, bias, scale)


def test_autotune_chooses_among_verified_candidates_only():
    """The fastest candidate fails its verification: the fastest *passing* one runs. Under
    "auto" a faster library wins; under "on" the kernel runs anyway."""
    call = gemm_call(64, 64, 64, ("bias_n",))
    clock = _Clock({"32x32x32": 0.1, "64x64x32": 0.5, "64x128x32": 0.7}, library=1.0)
    rt = Runtime(loader=clock.loader(broken_tile=32), nvrtc_available=True, devices=("cpu",),
                 timer=clock)
    out, ops = _run(rt, call)
    rec = rt.last[(call, "auto", True)]
    assert rec.state is KernelState.KERNEL and rec.detail.startswith("tile 64x64x32 autotuned")
    assert "kernel 32x32x32" not in rec.timings and "library" in rec.timings
    assert relerr(out, reference_result(call, *ops)) <= U16
    assert sum(not v.ok for v in rt.verdicts.values()) == 1
    clock.library = 0.01
    _run(rt, call, mode="auto", seed=1)  # decided already: cached per (call, device)
    assert rt.last[(call, "auto", True)].state is KernelState.KERNEL
    rt.decisions.clear()
    _run(rt, call, mode="auto", seed=1)
    assert rt.last[(call, "auto", True)].state is KernelState.LIBRARY
    assert "cuBLAS/cuDNN via torch" in rt.last[(call, "auto", True)].detail
    _run(rt, call, mode="on", seed=1)
    assert rt.last[(call, "on", True)].state is KernelState.KERNEL


def test_verification_runs_once_per_kernel_and_device():
    call = CALLS["gemm bias relu"]
    loads = []

    def loader(spec, device):
        loads.append(spec)
        return ModelLauncher(spec)

    rt = Runtime(loader=loader, nvrtc_available=True, devices=("cpu",))
    for seed in range(3):
        _run(rt, call, autotune=False, seed=seed)
    assert len(rt.verdicts) == 1 and len(loads) == 1 and len(rt.decisions) == 1
    assert rt.last[(call, "auto", False)].state is KernelState.KERNEL


def test_a_kernel_that_fails_to_load_falls_back_to_the_library():
    call = CALLS["gemm"]

    def loader(spec, device):
        raise LaunchError("no such device")

    rt = Runtime(loader=loader, nvrtc_available=True, devices=("cpu",))
    out, ops = _run(rt, call, autotune=False)
    rec = rt.last[(call, "auto", False)]
    assert rec.state is KernelState.LIBRARY and "no such device" in rec.detail
    assert torch.equal(out, library_result(call, *ops))


def test_without_nvrtc_auto_runs_the_library_and_says_so_once(caplog):
    call = CALLS["gemm bias relu"]
    rt = Runtime(nvrtc_available=False, devices=("cpu",))
    with caplog.at_level(logging.WARNING, logger="mpcompile.kernels"):
        for seed in range(3):
            out, ops = _run(rt, call, seed=seed)
    assert [r.getMessage() for r in caplog.records if "NVRTC" in r.getMessage()] == [
        "generated kernels: NVRTC not installed (pip install mpcompile[gpu]); kernels='auto' "
        "runs the library ops in low precision"]
    assert rt.last[(call, "auto", True)].state is KernelState.LIBRARY
    assert torch.equal(out, library_result(call, *ops))  # low precision, not the FP32 reference
    assert not torch.equal(out, reference_result(call, *ops))
    with pytest.raises(KernelError, match=r"kernels='on'\) on cpu: NVRTC not installed"):
        _run(rt, call, mode="on")


def test_lowering_decision():
    d = kernels_pass.decide
    assert d("off", "cuda", True) == (False, None)
    assert d("auto", "cpu", True) == (False, None)
    assert d("auto", "cuda", True) == (True, None)
    assert d("on", "cpu", False) == (True, None)  # the reference needs no NVRTC
    assert d("on", "cuda", True) == (True, None)
    lower, note = d("auto", "cuda", False)
    assert not lower and "NVRTC not installed" in note and "library" in note
    with pytest.raises(KernelError, match=r"kernels='on'\) on CUDA: NVRTC not installed"):
        d("on", "cuda", False)


def test_kernel_call_refuses_a_bad_mode_and_wrong_operands():
    call = CALLS["gemm"]
    with pytest.raises(KernelError, match="mode='sometimes'"):
        KernelCall(call.spec, False, False, mode="sometimes")
    with pytest.raises(KernelError, match="has_bias=True disagrees"):
        Call(call.spec, True, False)
    a, b, _, _ = operands(call)
    with using(Runtime()), pytest.raises(KernelError, match="called with bias=True"):
        kernel(a, b, torch.zeros(call.spec.n, dtype=F16), None, encode(call), "on", False)


# --- realignment ------------------------------------------------------------------------------


def test_realign_copies_misaligned_and_mis_strided_operands():
    base = torch.arange(65, dtype=F16)
    t = base[1:].view(8, 8)  # contiguous, 2 bytes past an aligned address
    assert t.is_contiguous() and t.data_ptr() % 16 == 2 and t.contiguous() is t
    with pytest.raises(LaunchError, match="16-byte alignment"):
        check_launchable("a", t, (8, 1), CALLS["gemm"].spec)
    fixed = realign(t, (8, 1))
    assert fixed.data_ptr() % 16 == 0 and fixed.stride() == (8, 1) and torch.equal(fixed, t)
    assert fixed.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    aligned = torch.zeros(8, 8, dtype=F16)
    assert realign(aligned, (8, 1)) is aligned
    col = realign(aligned.t().contiguous().t() + 1, (1, 8))  # wanted column-major
    assert col.stride() == (1, 8)
    nchw = torch.randn(2, 3, 4, 5).to(F16)
    cl = realign(nchw, (60, 1, 15, 3))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, nchw)
    w = torch.randn(4, 3, dtype=F16)
    expanded = w.expand(5, 4, 3)
    e = realign(expanded[:, :, :2], (0, 2, 1))
    assert e.stride() == (0, 2, 1) and torch.equal(e, expanded[:, :, :2])


@pytest.mark.parametrize("name", ["gemm bias relu", "conv fprop bias relu", "conv dgrad"])
def test_launch_realigns_misaligned_operands(name):
    """The launch path hands the kernel aligned operands with the spec's strides even when the
    graph gives it misaligned (or NCHW-contiguous) views, and the result is unchanged."""
    call = CALLS[name]
    a, b, bias, scale = operands(call)
    seen = []

    class Spy(ModelLauncher):
        def __call__(self, a, b, c, bias=None, scale=None):
            seen.extend(t.data_ptr() % 16 for t in (a, b))
            super().__call__(a, b, c, bias, scale)

    def misaligned(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
        return buf.view(t.shape).copy_(t) if t.is_contiguous() else \
            buf.as_strided(t.shape, t.stride()).copy_(t)

    ma, mb = misaligned(a.contiguous()), misaligned(b.contiguous())
    assert ma.data_ptr() % 16 and mb.data_ptr() % 16
    got = launch_result(Spy(call.spec), call, call.spec, ma, mb, bias, scale)
    assert seen == [0, 0]
    want = launch_result(ModelLauncher(call.spec), call, call.spec, a, b, bias, scale)
    assert torch.equal(got, want)


# --- the Hopper candidates --------------------------------------------------------------------


def _hopper_runtime(hopper_launcher, ms: dict[str, float]) -> Runtime:
    """A runtime on an "sm_90" CPU: mma.sync kernels are the NumPy model of the sm_80 kernel,
    Hopper kernels ``hopper_launcher`` (the NumPy model of the wgmma kernel by default); the
    timer reports ``ms`` by the label of the launcher that ran (the library: 1 ms)."""
    ran: list[str] = []

    def loader(spec, device):
        class Timed(ModelLauncher):
            def __call__(self, *args):
                ran.append(f"mma.sync {spec.tile.bm}x{spec.tile.bn}x{spec.tile.bk}")
                super().__call__(*args)
        return Timed(spec)

    def hopper(spec, config, device):
        class Timed(hopper_launcher):
            def __call__(self, *args):
                ran.append(f"wgmma {config.bm}x{config.bn}x{config.bk}")
                super().__call__(*args)
        return Timed(spec, config)

    def timer(fn) -> float:
        ran.clear()
        fn()
        return ms.get(ran[-1], 5.0) if ran else 1.0

    return Runtime(loader=loader, hopper=hopper, nvrtc_available=True, devices=("cpu",),
                   timer=timer, arch=lambda device: "sm_90")


def test_on_sm90_the_hopper_kernel_is_a_verified_candidate():
    """On an sm_90 device the wgmma/TMA kernel's presets join the candidates: verified like the
    others (through its NumPy model here) and chosen when fastest."""
    from mpcompile.codegen.hopper import PRESETS
    from mpcompile.codegen.hopper_model import HopperModelLauncher
    from mpcompile.runtime.kernel import candidates

    call = gemm_call(72, 136, 40, ("bias_n", "relu"))
    labels = [v.label for v in candidates(call.spec, "sm_90", unproven=True)]
    assert [lb for lb in labels if lb.startswith("wgmma")] == [
        f"wgmma {c.bm}x{c.bn}x{c.bk}" for c in PRESETS]
    assert not any(lb.startswith("wgmma") for lb in
                   (v.label for v in candidates(call.spec, "sm_80", unproven=True)))
    rt = _hopper_runtime(HopperModelLauncher, {"wgmma 128x128x64": 0.2})
    out, ops = _run(rt, call, mode="on")
    rec = rt.last[(call, "on", True)]
    assert rec.state is KernelState.KERNEL and rec.detail.startswith("wgmma 128x128x64 autotuned")
    assert {"kernel wgmma 128x256x64", "kernel wgmma 128x128x64"} <= set(rec.timings)
    assert all(v.ok for v in rt.verdicts.values())
    assert relerr(out, reference_result(call, *ops)) <= U16


def test_auto_tries_the_hopper_kernel_only_where_a_gpu_run_proved_it(monkeypatch):
    """Policy(kernels="auto") leaves the never-run wgmma kernel out (an mbarrier mistake
    would hang, not fail verification) until ``hopper.PROVEN_ON`` lists the arch."""
    from mpcompile.codegen import hopper
    from mpcompile.codegen.hopper_model import HopperModelLauncher

    call = gemm_call(72, 136, 40)
    assert hopper.PROVEN_ON == ()
    rt = _hopper_runtime(HopperModelLauncher, {"wgmma 128x128x64": 0.2})
    _run(rt, call)
    assert not any("wgmma" in k for k in rt.last[(call, "auto", True)].timings)
    monkeypatch.setattr(hopper, "PROVEN_ON", ("sm_90",))
    rt = _hopper_runtime(HopperModelLauncher, {"wgmma 128x128x64": 0.2})
    _run(rt, call)
    assert rt.last[(call, "auto", True)].detail.startswith("wgmma 128x128x64 autotuned")


def test_a_wrong_hopper_kernel_is_never_chosen():
    """A wgmma kernel that drops the last K block fails verification and is not timed; the
    fastest verified mma.sync tile runs instead (mode "on": the library is not an option)."""
    from mpcompile.codegen.hopper_model import HopperModelLauncher

    class ShortK(HopperModelLauncher):
        def __call__(self, a, b, c, bias=None, scale=None):
            a = a.clone()
            a[..., -1] = 0
            super().__call__(a, b, c, bias, scale)

    call = gemm_call(72, 136, 40)
    rt = _hopper_runtime(ShortK, {"wgmma 128x128x64": 0.1, "wgmma 128x256x64": 0.1})
    out, ops = _run(rt, call, mode="on")
    rec = rt.last[(call, "on", True)]
    assert rec.state is KernelState.KERNEL and rec.detail.startswith("tile ")
    assert not any("wgmma" in k for k in rec.timings)
    assert sum(not v.ok for v in rt.verdicts.values()) == 2
    assert relerr(out, reference_result(call, *ops)) <= U16
