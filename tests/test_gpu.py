"""GPU checks: skipped cleanly without CUDA (see conftest.py); run them on a GPU machine with
``pytest -m gpu``."""

import pytest
import test_fp32_accum as accum
import torch
from test_models import U, check_invariants, relerr

import mpcompile
from mpcompile.examples import EXAMPLES, batch
from mpcompile.policy import OpClass

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["cnn", "transformer", "lstm"])
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=str)
def test_models_on_cuda(name, low):
    ex = EXAMPLES[name]
    x, _ = batch(ex)
    ref_model = ex.build().eval().cuda()
    x = tuple(t.cuda() for t in x)
    mp = mpcompile.convert(ex.build().eval().cuda(), x, dtype=low)
    assert mp.program.device_type == "cuda"
    counts = check_invariants(mp, low)
    # FP32_ACCUM is not proven on CUDA yet, so those ops must all run in FP32 there
    assert counts[OpClass.FP32_ACCUM] == 0
    with torch.no_grad():
        assert relerr(mp(*x), ref_model(*x)) <= 8 * U[low]


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


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_generated_kernels_on_cuda(name):
    """kernels="auto" on CUDA: every matmul/conv runs a generated kernel (autotuned, checked
    against cuBLAS/cuDNN on first use) and the model's outputs match the unlowered graph."""
    from mpcompile import Policy
    from mpcompile.runtime.kernel import KernelCall

    ex = EXAMPLES[name]
    x = tuple(t.cuda() for t in batch(ex)[0])
    plain = mpcompile.convert(ex.build().eval().cuda(), x, policy=Policy(kernels="off"))
    lowered = mpcompile.convert(ex.build().eval().cuda(), x)
    calls = [m for m in lowered.graph_module.modules() if isinstance(m, KernelCall)]
    assert calls
    with torch.no_grad():
        a, b = plain(*x), lowered(*x)
    a = a["logits"] if isinstance(a, dict) else a
    b = b["logits"] if isinstance(b, dict) else b
    assert ((a - b).abs().max() / a.abs().max()).item() <= 8 * U[torch.float16]
    assert all(c.backend.startswith(("generated kernel", "library")) for c in calls)


def test_gpu_check_quick():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import gpu_check

    assert gpu_check.main(["--quick", "--reps", "3"]) == 0
