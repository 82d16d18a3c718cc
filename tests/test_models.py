"""Every test model, in FP16 and BF16: precision invariants on the rewritten graph, outputs
against the FP32 model, and training with torch.optim.SGD + torch.amp.GradScaler.

Output bound: ||y - y_fp32|| / ||y_fp32|| <= 8u, u the unit roundoff (2^-11 for FP16, 2^-8 for
BF16). Inputs, weights and every low-precision activation are rounded once (relative error u
each) and products accumulate in FP32, so each layer adds O(u) relative error; the models here
have at most ~4 such stages on a path, and measured errors are 0.6u-3.7u (see the closing notes
and ``benchmarks/accuracy_and_casts.py``)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from models_hf import bert
from test_fp32_accum import CLAIMS

import mpcompile
from mpcompile.dtypes import unit_roundoff
from mpcompile.examples import EXAMPLES, batch, eager_step
from mpcompile.fxutil import arg_slots, is_cast, is_getitem, val_dtype
from mpcompile.policy import OpClass
from mpcompile.records import record

LOWS = [torch.float16, torch.bfloat16]
U = {d: unit_roundoff(d) for d in (torch.float16, torch.bfloat16)}
PROVEN = {(op, dt) for op, dev, dt in CLAIMS if dev == "cpu"}


def _logits(out):
    if isinstance(out, dict):
        return out["logits"]
    return getattr(out, "logits", out)


def check_invariants(mp, low):
    """LOWER ops compute in low precision; FP32 ops see FP32; FP32_ACCUM ops see FP32 or run a
    kernel the FP32-accumulation tests prove; outputs keep the model's dtypes."""
    gm = mp.graph_module
    counts = {c: 0 for c in OpClass}
    for n in gm.graph.nodes:
        if n.op != "call_function" or is_getitem(n) or is_cast(n):
            continue
        rec = record(n)
        ins = [(slot, val_dtype(a)) for _, slot, a in arg_slots(n)
               if val_dtype(a) is not None and val_dtype(a).is_floating_point]
        acts = [d for slot, d in ins if slot not in rec.fp32_args]
        if rec.precision is None:
            continue
        counts[rec.op_class] += 1
        if rec.op_class is OpClass.LOWER and rec.pin is None:
            assert acts and all(d == low for d in acts), f"{n.name}: LOWER sees {ins}"
            assert val_dtype(n) in (low, None), n.name
        elif rec.op_class is OpClass.FP32 or rec.pin is not None:
            assert all(d == torch.float32 for d in acts), f"{n.name}: FP32 op sees {ins}"
        elif rec.op_class is OpClass.FP32_ACCUM:
            if rec.precision == low:
                assert (n.target, low) in PROVEN, f"{n.name}: {n.target} unproven in {low}"
                assert all(d == torch.float32 for s, d in ins if s in rec.fp32_args)
            else:
                assert all(d == torch.float32 for d in acts)
    assert counts[OpClass.LOWER] > 0
    return counts


def relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = [(name, low) for name in sorted(EXAMPLES) for low in LOWS]


@pytest.mark.parametrize("name,low", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_example_model(name, low):
    ex = EXAMPLES[name]
    x, y = batch(ex)
    ref_model = ex.build().eval()
    mp = mpcompile.convert(ex.build().eval(), x, dtype=low, backend="eager")
    check_invariants(mp, low)
    with torch.no_grad():
        ref, out = _logits(ref_model(*x)), _logits(mp(*x))
    assert out.dtype == ref.dtype == torch.float32
    err = relerr(out, ref)
    assert err <= 8 * U[low], f"{name} {low}: relative error {err:.2e} > 8u"


def train(model_or_mp, loss_fn, inputs, kwargs, targets, low, steps, lr):
    opt = torch.optim.SGD(model_or_mp.parameters(), lr=lr, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=low is torch.float16)
    return [eager_step(model_or_mp, opt, scaler, loss_fn, inputs, targets, kwargs)[0].item()
            for _ in range(steps)]


# default run: each model trains in one dtype, alternating (both dtypes covered); -m slow: all
TRAIN_CASES = [c if (i // 2 + LOWS.index(c[1])) % 2 == 0 else pytest.param(
    *c, marks=pytest.mark.slow) for i, c in enumerate(CASES)]


@pytest.mark.parametrize("name,low", TRAIN_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_training_lowers_the_loss(name, low):
    ex = EXAMPLES[name]
    x, y = batch(ex)
    mp = mpcompile.convert(ex.build().train(), x, dtype=low, backend="eager")
    losses = train(mp, ex.loss, x, {}, y, low, steps=30, lr=0.05)
    assert all(map(lambda v: v == v, losses)), "NaN loss"
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses


@pytest.mark.parametrize("low", [LOWS[0], pytest.param(LOWS[1], marks=pytest.mark.slow)],
                         ids=str)
def test_hugging_face_bert(low):  # BF16 BERT: test_export's forward export (default run)
    model, kwargs, labels = bert()
    ref_model = copy.deepcopy(model).eval()
    mp = mpcompile.convert(model.eval(), example_kwargs=kwargs, dtype=low, backend="eager")
    counts = check_invariants(mp, low)
    assert counts[OpClass.FP32_ACCUM] >= 5  # the layer norms
    with torch.no_grad():
        ref, out = ref_model(**kwargs), mp(**kwargs)
    assert type(out) is type(ref) and out.logits.dtype == torch.float32
    err = relerr(out.logits, ref.logits)
    assert err <= 8 * U[low], f"BERT {low}: relative error {err:.2e}"
    mp.train()
    losses = train(mp, lambda o, t: F.cross_entropy(o.logits, t), (), kwargs, labels, low,
                   steps=25, lr=0.02)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses
