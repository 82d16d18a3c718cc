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
