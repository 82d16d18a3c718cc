"""The kernels pass and the kernel runtime, checked without a GPU: every matmul/conv of the
test models gets a KernelCall (forward and training step), ``kernels="auto"`` only on CUDA, and
the GPU code paths of KernelCall (verification, dispatch) run on CPU through the NumPy model of
a kernel (tests/test_kernel_ops.py: the custom op, autograd, verification; gpu_check's own tests
are in tests/test_gpu_check.py)."""
import dataclasses

import pytest
import torch

import mpcompile
from mpcompile import Policy
from mpcompile.codegen.model import ModelLauncher
from mpcompile.codegen.spec import Kind
from mpcompile.dtypes import unit_roundoff
from mpcompile.examples import EXAMPLES, batch
from mpcompile.passes.kernels import LOWERABLE
from mpcompile.runtime.kernel import KernelCall, KernelState, Runtime, using

F16, BF16 = torch.float16, torch.bfloat16


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
    plain = mpcompile.convert(ex.build().eval(), x, dtype=low, backend="eager")
    lowered = mpcompile.convert(ex.build().eval(), x, policy=Policy(dtype=low, kernels="on"),
                                backend="eager")
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
            optimizer=torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), backend="eager"))
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
    auto = mpcompile.convert(ex.build(), x, backend="eager")
    assert _lowerable(auto.executable) and not _calls(auto.executable)
    assert _calls(mpcompile.convert(ex.build(), x, policy=Policy(kernels="on"),
                                    backend="eager").executable)
    with pytest.raises(mpcompile.PolicyError, match="kernels='sometimes'"):
        Policy(kernels="sometimes")


# --- the GPU code paths, driven on CPU through the NumPy model of the kernels ---------------------


def _model_runtime(launcher=ModelLauncher, autotune_timer=None) -> Runtime:
    """A kernel runtime whose "GPU" is the CPU and whose kernels are ``launcher`` (the NumPy
    model by default): every path of the CUDA dispatch runs here, verification included."""
    return Runtime(loader=launcher, nvrtc_available=True, devices=("cpu",),
                   timer=autotune_timer or (lambda fn: 1.0))


@pytest.mark.parametrize("name", ["cnn", "transformer", "catindex"])
def test_kernel_call_gpu_path_through_the_model(name):
    """KernelCall's GPU path (verification on first use, operand strides, NHWC/KRSC
    conversions, split-K sums, output permutes) with the NumPy model in place of the CUDA
    launch: it must give what the reference path gives."""
    ex = EXAMPLES[name]
    x, y = batch(ex)
    m = ex.build().train()
    step = mpcompile.compile_train_step(m, ex.loss, x, y, policy=Policy(kernels="on"),
                                        optimizer=torch.optim.SGD(m.parameters(), lr=0.05),
                                        backend="eager")
    calls = _calls(step.executable)
    lr = torch.tensor(0.05, dtype=torch.float64)

    def run() -> list[torch.Tensor]:  # the step updates its state inputs: give it copies
        state = [t.clone() for t in step.state]
        return [*step.executable(*state, lr, *x, y), *state]

    ref = run()
    wgrads = [c for c in calls if c.role is Kind.CONV_WGRAD]
    assert bool(wgrads) == (name == "cnn")
    for call in wgrads:  # exercise the split-K path too (FP32 partials, summed)
        call.spec = dataclasses.replace(call.spec, split_k=3, epilogue=dataclasses.replace(
            call.spec.epilogue, out="float32"))
    for call in calls:
        call.autotune = False
    with using(_model_runtime()):
        got = run()
        assert all(c.state is KernelState.KERNEL for c in calls), [c.backend for c in calls]
        assert all(c.backend.startswith("generated kernel (verified on this device: exact on "
                                        "integers") for c in calls), [c.backend for c in calls]
    for a, b in zip(got, ref):
        if a.is_floating_point():
            scale = b.double().abs().max().clamp(min=1e-30)
            assert ((a.double() - b.double()).abs().max() / scale).item() <= \
                4 * unit_roundoff(F16)


class _Broken(ModelLauncher):
    def __call__(self, a, b, c, bias=None, scale=None):
        super().__call__(a, b, c, bias, scale)
        c.mul_(1.01)  # 1% off: far beyond 16 u of FP16


def test_a_wrong_kernel_is_caught_on_first_use():
    """A kernel that fails its verification is dropped for the library op, loudly; a kernel that
    passes is used."""
    ex = EXAMPLES["mlp"]
    x, _ = batch(ex)
    mpm = mpcompile.convert(ex.build().eval(), x, policy=Policy(kernels="on"), backend="eager")
    calls = _calls(mpm.executable)
    for c in calls:
        c.autotune = False
    with using(_model_runtime(launcher=_Broken)), torch.no_grad():
        out = mpm(*x)
        assert all(c.state is KernelState.LIBRARY and "failed verification" in c.backend
                   for c in calls), [c.backend for c in calls]
    with torch.no_grad():
        ref = mpcompile.convert(ex.build().eval(), x, backend="eager")(*x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 4 * unit_roundoff(F16)
