"""GPU checks: skipped cleanly without CUDA (see conftest.py); run them on a GPU machine with
``pytest -m gpu``. The kernels' own numerics, timings and the canary checks are
``scripts/gpu_check.py``'s (one prepared command); these check mpcompile's use of them."""

import pytest
import test_fp32_accum as accum
import torch
from test_models import check_invariants, relerr

import mpcompile
from mpcompile import Policy
from mpcompile.dtypes import LOW, unit_roundoff
from mpcompile.examples import EXAMPLES, batch
from mpcompile.fxutil import val_dtype
from mpcompile.passes.kernels import LOWERABLE
from mpcompile.policy import OpClass
from mpcompile.records import record
from mpcompile.runtime.kernel import KernelCall, KernelState, runtime

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["cnn", "transformer", "lstm"])
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=str)
def test_models_on_cuda(name, low):
    ex = EXAMPLES[name]
    x, _ = batch(ex)
    ref_model = ex.build().eval().cuda()
    x = tuple(t.cuda() for t in x)
    mp = mpcompile.convert(ex.build().eval().cuda(), x, dtype=low, backend="eager")
    assert mp.program.device_type == "cuda"
    counts = check_invariants(mp, low)  # reads graph_module: the graph before kernels
    # FP32_ACCUM is not proven on CUDA yet, so those ops must all run in FP32 there
    assert counts[OpClass.FP32_ACCUM] == 0
    # kernels="auto" lowers on CUDA: one KernelCall per low-precision matmul/conv it could lower
    assert len(kernel_calls(mp.executable)) == expected_calls(mp)
    with torch.no_grad():
        assert relerr(mp(*x), ref_model(*x)) <= 8 * unit_roundoff(low)
    assert all(c.state in (KernelState.KERNEL, KernelState.LIBRARY)
               for c in kernel_calls(mp.executable))


@pytest.mark.parametrize("op", sorted(accum.PROBES, key=str), ids=str)
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_accumulation_probes_on_cuda(op, low):
    """Evidence for adding ("cuda", dtype) to an entry's proven_on."""
    accum.DEV["device"] = "cuda"
    try:
        out, ref = accum.PROBES[op](op, low)
    finally:
        accum.DEV["device"] = "cpu"
    assert accum.ulps(out.cpu(), ref.cpu(), low) <= accum.MAX_ULPS


def lowerable(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LOWERABLE]


def kernel_calls(gm) -> list[KernelCall]:
    return [m for m in gm.modules() if isinstance(m, KernelCall)]


def expected_calls(mp) -> int:
    """How many KernelCalls lowering must have made in a forward graph: one per low-precision
    matmul/conv of the graph before kernels, less those it kept (their record says why). FP32
    matmuls (pinned, or an LSTM's) are never lowered."""
    low = lambda n: val_dtype(n) in LOW  # noqa: E731
    kept = [n for n in lowerable(mp.executable) if low(n)]
    for n in kept:
        assert "kept the torch op" in record(n).decision, (n.name, record(n).decision)
    return len([n for n in lowerable(mp.graph_module) if low(n)]) - len(kept)


def run_lowered(name: str, kernels: str, autotune: bool, model=None, x=None):
    """The lowered program's KernelCalls, after checking its outputs against kernels="off"."""
    if model is None:
        ex = EXAMPLES[name]
        model, x = ex.build, batch(ex)[0]
    x = tuple(t.cuda() for t in x)
    plain = mpcompile.convert(model().eval().cuda(), x, policy=Policy(kernels="off"),
                              backend="eager")
    lowered = mpcompile.convert(model().eval().cuda(), x, policy=Policy(kernels=kernels),
                                backend="eager")
    calls = kernel_calls(lowered.executable)
    assert len(calls) == expected_calls(lowered) > 0
    for c in calls:
        c.autotune = autotune
    with torch.no_grad():
        a, b = plain(*x), lowered(*x)
    a = a["logits"] if isinstance(a, dict) else a
    b = b["logits"] if isinstance(b, dict) else b
    assert ((a - b).abs().max() / a.abs().max()).item() <= 8 * unit_roundoff(torch.float16)
    return calls


def passed_verification(call: KernelCall) -> bool:
    """Did the call's own kernel pass its first-use verification on this device?"""
    rt = runtime()
    return any(v.ok and problem.spec.name == call.spec.name
               for (problem, _), v in rt.verdicts.items())


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_generated_kernels_on_cuda(name):
    """kernels="auto" with autotuning off: every matmul/conv must pass its first-use
    verification on this GPU and run its generated kernel (a kernel that fails falls back to
    the library, and fails this test), and the outputs match the unlowered graph's."""
    calls = run_lowered(name, "auto", autotune=False)
    assert all(c.state is KernelState.KERNEL for c in calls), [c.backend for c in calls]
    assert all(c.detail.startswith("verified on this device: exact on integers")
               for c in calls), [c.backend for c in calls]


def _wide_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),
                               torch.nn.Linear(2048, 1024), torch.nn.GELU(),
                               torch.nn.Linear(1024, 512))


def test_autotuned_kernels_on_cuda():
    """With autotuning (the default) each call runs the fastest of its verified tiles and, under
    "auto", the library; never the CPU reference. Every candidate that ran passed its
    verification; under "on" (same shapes, big enough for tensor cores to matter) every call
    runs a generated kernel: if every kernel fell back, this fails."""
    x = (torch.randn(1024, 1024),)
    calls = run_lowered("", "auto", autotune=True, model=_wide_mlp, x=x)
    assert all(c.state in (KernelState.KERNEL, KernelState.LIBRARY) for c in calls), \
        [c.backend for c in calls]
    assert all("library" in c.timings and len(c.timings) > 1 for c in calls)
    assert all(passed_verification(c) for c in calls), [c.backend for c in calls]
    calls = run_lowered("", "on", autotune=True, model=_wide_mlp, x=x)
    assert all(c.state is KernelState.KERNEL for c in calls), [c.backend for c in calls]


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_convert_backward_on_cuda_matches_kernels_off(name):
    """convert(kernels="auto") + backward on CUDA (the kernel op's autograd formula, whatever
    each call chose) gives the parameter gradients of kernels="off" within 8 u (4 u on CPU,
    tests/test_kernel_ops.py; cuBLAS's own roundings differ between the two graphs here)."""
    ex = EXAMPLES[name]
    x, y = batch(ex)
    x, y = tuple(t.cuda() for t in x), y.cuda()
    grads = []
    for kernels in ("off", "auto"):
        m = ex.build().train().cuda()
        mp = mpcompile.convert(m, x, policy=Policy(kernels=kernels), backend="eager")
        ex.loss(mp(*x), y).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
        if kernels == "auto":
            calls = kernel_calls(mp.executable)
            assert calls and all(c.state in (KernelState.KERNEL, KernelState.LIBRARY)
                                 for c in calls), [c.backend for c in calls]
    for n, want in grads[0].items():
        got = grads[1][n]
        err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
        assert err <= 8 * unit_roundoff(torch.float16), (n, err)
