"""The kernels pass and the kernel runtime, checked without a GPU: every matmul/conv of the
test models gets a KernelCall (forward and training step), ``kernels="auto"`` only on CUDA, and
the GPU code paths of KernelCall and gpu_check run on CPU through the NumPy model of a kernel."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mpcompile
from mpcompile import Policy
from mpcompile.codegen.model import ModelLauncher
from mpcompile.codegen.spec import Conv, Kind
from mpcompile.dtypes import unit_roundoff
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
    _through_the_model(calls, monkeypatch)
    got = run()
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
    mpm = mpcompile.convert(ex.build().eval(), x, policy=Policy(kernels="on"), backend="eager")
    calls = _calls(mpm.executable)
    _through_the_model(calls, monkeypatch, launcher=_Broken)
    with torch.no_grad():
        out = mpm(*x)
    assert all(c.state is KernelState.LIBRARY and "differed from cuBLAS/cuDNN" in c.backend
               for c in calls)
    with torch.no_grad():
        ref = mpcompile.convert(ex.build().eval(), x, backend="eager")(*x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 4 * unit_roundoff(F16)
