"""GPU checks: skipped cleanly without CUDA (see conftest.py); run them on a GPU machine with
``pytest -m gpu``."""

import pytest
import test_fp32_accum as accum
import torch
from test_models import check_invariants, relerr

import mpcompile
from mpcompile import Policy
from mpcompile.dtypes import unit_roundoff
from mpcompile.examples import EXAMPLES, batch
from mpcompile.passes.kernels import LOWERABLE
from mpcompile.policy import OpClass
from mpcompile.runtime.kernel import KernelCall, KernelState

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
    # kernels="auto" lowers on CUDA: one KernelCall per matmul/conv of the graph before kernels
    assert len(kernel_calls(mp.executable)) == len(lowerable(mp.graph_module))
    assert not lowerable(mp.executable)
    with torch.no_grad():
        assert relerr(mp(*x), ref_model(*x)) <= 8 * unit_roundoff(low)


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


def run_lowered(name: str, device: str, kernels: str, autotune: bool):
    """(unlowered outputs, lowered outputs, the lowered program's KernelCalls) of example
    ``name`` on ``device``."""
    ex = EXAMPLES[name]
    x = tuple(t.to(device) for t in batch(ex)[0])
    plain = mpcompile.convert(ex.build().eval().to(device), x, policy=Policy(kernels="off"),
                              backend="eager")
    lowered = mpcompile.convert(ex.build().eval().to(device), x, policy=Policy(kernels=kernels),
                                backend="eager")
    calls = kernel_calls(lowered.executable)
    # what lowering produced: every matmul/conv of the graph before kernels became a call
    assert len(calls) == len(lowerable(lowered.graph_module)) > 0
    assert not lowerable(lowered.executable)
    for c in calls:
        c.autotune = autotune
    with torch.no_grad():
        a, b = plain(*x), lowered(*x)
    a = a["logits"] if isinstance(a, dict) else a
    b = b["logits"] if isinstance(b, dict) else b
    assert ((a - b).abs().max() / a.abs().max()).item() <= 8 * unit_roundoff(torch.float16)
    return calls


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_generated_kernels_on_cuda(name):
    """kernels="auto" on CUDA with autotuning off: every matmul/conv runs its generated kernel,
    checked against cuBLAS/cuDNN on first use (a kernel that fails that check falls back to the
    library and fails this test), and the outputs match the unlowered graph's."""
    calls = run_lowered(name, "cuda", "auto", autotune=False)
    assert all(c.state is KernelState.KERNEL for c in calls), [c.backend for c in calls]


def test_autotuned_kernels_on_cuda():
    """With autotuning (the default) each call runs the faster of its kernel and the library,
    never the CPU reference; the candidates were timed."""
    calls = run_lowered("transformer", "cuda", "auto", autotune=True)
    assert all(c.state in (KernelState.KERNEL, KernelState.LIBRARY) for c in calls), \
        [c.backend for c in calls]
    assert all("library" in c.timings and len(c.timings) > 1 for c in calls)


def test_gpu_check_quick():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import gpu_check

    assert gpu_check.main(["--quick", "--reps", "3"]) == 0
