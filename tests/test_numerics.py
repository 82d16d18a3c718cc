"""The numerics profiler and overflow localisation, against independent oracles.

Profiler oracles: the rounding itself (``(x * S).to(dtype) == 0`` / ``isinf``) on tensors whose
values the test chose (every boundary: 2^-25, 65520, 2^-134, FP32 subnormals, ...) and on
gradients plain PyTorch autograd computes; the lost updates against a master-less update done
elementwise and against the arithmetic fact that an update below 2^-12 |w| is always lost in
FP16 and one above 2^-10 |w| never is; the recommended scale against a real
``compile_train_step`` (trains at that scale, stalls at S=1) and FP32 training.

Localisation: a model with a planted FP16 overflow (the planted line is named), a clean batch,
an oversized loss scale (backward), a non-finite batch; the step's state is bit-identical after.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpcompile
from mpcompile import SignatureError, TrainStepError
from mpcompile.examples import MLP
from mpcompile.numerics import KINDS, ProfileError

F16, BF16 = torch.float16, torch.bfloat16
SMALL = 2.0**-20  # the loss factor of the small-gradient model


def _nextafter(x: float, toward: float) -> float:
    return float(torch.nextafter(torch.tensor(x), torch.tensor(toward)))


def _boundary_values() -> torch.Tensor:
    """FP32 values at and around every flush/overflow boundary, plus log-uniform random ones."""
    edges = [2.0**-25, 2.0**-24, 1.5 * 2.0**-25, 2.0**-134, 2.0**-133, 65504.0, 65520.0,
             65536.0, float(torch.finfo(BF16).max), (2 - 2.0**-8) * 2.0**127, 2.0**-149,
             3 * 2.0**-149, 2.0**-126, 1.0, 0.75]
    vals = []
    for e in edges:
        vals += [e, _nextafter(e, 0.0), _nextafter(e, math.inf)]
    g = torch.Generator().manual_seed(0)
    rand = torch.exp2(torch.rand(4000, generator=g) * 276 - 149)
    rand = torch.where(torch.rand(4000, generator=g) < 0.5, -rand, rand)
    v = torch.cat([torch.tensor(vals, dtype=torch.float32), -torch.tensor(vals), rand,
                   torch.zeros(7)])
    return v[torch.isfinite(v)]


class Crafted(nn.Module):
    """out = x * p with x = 1: the activation is p, and with loss = sum(out * c) the activation
    gradient and p's gradient are c: the test chooses every recorded value."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.p = nn.Parameter(values.clone())

    def forward(self, x):
        return x * self.p


def _crafted_profile():
    v = _boundary_values()
    c = v.flip(0).contiguous()
    prof = mpcompile.profile(Crafted(v), torch.ones_like(v), c,
                             lambda out, t: (out * t).sum(), steps=1, lr=0.0)
    return v, c, prof


def _oracle_flushed(x: torch.Tensor, dt, s: float) -> int:
    return int((((x.float() * s).to(dt) == 0) & (x != 0)).sum())


def _oracle_overflowed(x: torch.Tensor, dt, s: float) -> int:
    return int(torch.isinf((x.float() * s).to(dt)).sum())


def test_flushed_and_overflowed_are_exact_against_rounding():
    v, c, prof = _crafted_profile()
    act = [t for t in prof.of_kind("activation") if t.op == "aten.mul.Tensor"]
    assert len(act) == 1
    records = {"activation": (act[0], v), "activation_grad": (prof.get(act[0].name,
               "activation_grad"), c), "weight_grad": (prof.get("p", "weight_grad"), c)}
    for kind, (rec, x) in records.items():
        assert rec.nonzero == int((x != 0).sum()) and rec.zeros == int((x == 0).sum()), kind
        for k in range(-40, 41):
            s = 2.0**k
            for dt in (F16, BF16):
                if dt == BF16 and k < 0:
                    continue  # x*S would first round in FP32's subnormal range (docstring)
                assert rec.flushed_count(dt, s) == _oracle_flushed(x, dt, s), (kind, dt, k)
                assert rec.overflowed_count(dt, s) == _oracle_overflowed(x, dt, s), (kind, dt, k)
    # pooled fractions are the same counts over the nonzero values
    nz = int((c != 0).sum())
    assert prof.flushed(F16, 2.0**10, "weight_grad") == _oracle_flushed(c, F16, 2.0**10) / nz
    # the histogram holds every nonzero value in its floor(log2) bin
    counts, zeros, nonfinite = prof.histogram("weight_grad")
    nzv = c[c != 0].abs()
    want = torch.bincount(torch.floor(torch.log2(nzv.double())).long() + 149, minlength=277)
    assert list(counts) == want.tolist() and zeros == 7 + 2 and nonfinite == 0


def _small_grad_model():
    torch.manual_seed(0)
    model = MLP(32, 64, 10)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    return model, x, y, lambda out, t: F.cross_entropy(out, t) * SMALL


def test_weight_grads_and_recommended_high_against_autograd():
    model, x, y, loss_fn = _small_grad_model()
    before = copy.deepcopy(model.state_dict())
    prof = mpcompile.profile(model, x, y, loss_fn, steps=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    ref = copy.deepcopy(model)
    loss_fn(ref(x), y).backward()
    grads = dict((n, p.grad) for n, p in ref.named_parameters())
    for name, g in grads.items():
        rec = prof.get(name, "weight_grad")
        assert rec.amax == float(g.abs().max())
        for s in (1.0, 2.0**12, 2.0**20):
            assert rec.flushed_count(F16, s) == _oracle_flushed(g, F16, s)
    # high: the largest power of two with S * max|g| < 65504, over activation and weight
    # gradients (the activation gradients are bounded by the logits' gradient here; check it)
    gmax = max(t.amax for t in prof.of_kind(("activation_grad", "weight_grad")))
    assert gmax >= max(float(g.abs().max()) for g in grads.values())
    high = prof.recommended_scale(F16).high
    assert high * gmax < 65504 <= 2 * high * gmax


def test_small_gradients_recommended_scale_trains_where_scale_one_stalls():
    model, x, y, loss_fn = _small_grad_model()
    keep = 0.999
    prof = mpcompile.profile(model, x, y, loss_fn, steps=1, keep=keep)
    assert prof.flushed(F16, 1.0, "activation_grad") > 0.5  # measured: 1.0
    low, high = prof.recommended_scale(F16)
    assert low <= high
    assert prof.flushed(F16, low, ("activation_grad", "weight_grad")) <= 1 - keep
    assert prof.flushed(F16, low / 2, ("activation_grad", "weight_grad")) > 1 - keep
    assert prof.flushed(F16, low, "activation_grad") < 1 - keep + 1e-3
    lr = 0.5 / SMALL  # the loss is 2^-20 of cross entropy: the same step size as lr 0.5
    fp32 = copy.deepcopy(model)
    opt = torch.optim.SGD(fp32.parameters(), lr=lr)
    for _ in range(8):
        opt.zero_grad()
        fp32_loss = loss_fn(fp32(x), y)
        fp32_loss.backward()
        opt.step()
    fp32_loss = float(fp32_loss.detach())
    results = {}
    for scale in (1.0, low):
        m = copy.deepcopy(model)
        step = mpcompile.compile_train_step(m, loss_fn, x, y, loss_scale=scale, backend="eager",
                                            optimizer=torch.optim.SGD(m.parameters(), lr=lr))
        masters = [t.clone() for n, t in zip(step.layout.names, step.state)
                   if n.startswith("master.")]
        losses = [float(step(x, y).loss) for _ in range(8)]
        after = [t for n, t in zip(step.layout.names, step.state) if n.startswith("master.")]
        moved = max(float((a - b).abs().max()) for a, b in zip(masters, after))
        results[scale] = (losses, moved)
    (stall, stall_moved), (train, train_moved) = results[1.0], results[low]
    assert stall_moved == 0.0 and stall[-1] == stall[0]  # every gradient flushed: no update
    assert train_moved > 0.05 and train[-1] < 0.8 * train[0]
    assert abs(train[-1] - fp32_loss) < 0.02 * fp32_loss  # tracks FP32


def test_lost_updates_against_elementwise_and_ulp_bounds():
    torch.manual_seed(1)
    model = MLP(16, 32, 4)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    lr = 1e-3
    prof = mpcompile.profile(model, x, y, F.cross_entropy, steps=1, lr=lr)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    old = {n: p.detach().clone() for n, p in ref.named_parameters()}
    F.cross_entropy(ref(x), y).backward()
    opt.step()
    lost = {F16: 0, BF16: 0}
    nonzero = below = above = 0
    for n, p in ref.named_parameters():
        u, w = p.detach() - old[n], old[n]
        moved = u != 0
        nonzero += int(moved.sum())
        for dt in (F16, BF16):
            lo = w.to(dt)
            lost[dt] += int((moved & ((lo.double() + u.double()).to(torch.float32).to(dt)
                                      == lo)).sum())
        w16 = w.to(F16).float()
        normal = w16.abs() >= 2.0**-14
        below += int((moved & normal & (u.abs() < 2.0**-12 * w16.abs())).sum())
        above += int((moved & normal & (u.abs() > 2.0**-10 * w16.abs())).sum())
        assert prof.get(n, "weight_update").nonzero == int(moved.sum())
    for dt in (F16, BF16):
        assert prof.lost_updates(dt) == lost[dt] / nonzero
    n_lost = prof.lost_updates(F16) * nonzero
    assert below <= round(n_lost) <= nonzero - above  # measured: strictly inside
    assert 0 < prof.lost_updates(F16) < prof.lost_updates(BF16) < 1


def test_profile_of_a_train_step_leaves_it_unchanged_and_names_match_explain():
    model, x, y, loss_fn = _small_grad_model()
    step = mpcompile.compile_train_step(model, loss_fn, x, y, backend="eager",
                                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    before = [t.clone() for t in step.state]
    prof = mpcompile.profile(step, x, y, loss_fn, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(before, step.state))
    assert {t.kind for t in prof.tensors} == set(KINDS) and len(prof.losses) == 2
    mp = mpcompile.convert(copy.deepcopy(model), x, backend="eager")
    for t in prof.of_kind("activation"):
        assert t.name in mp.explain(t.name)  # a node convert's graph knows
    assert {t.module for t in prof.of_kind("activation") if "addmm" in t.name} == {"fc1", "fc2"}


def test_text_and_plot(tmp_path):
    model, x, y, loss_fn = _small_grad_model()
    prof = mpcompile.profile(model, x, y, loss_fn, steps=1, loss_scales=(1.0, 2.0**16),
                             progress=True)
    text = prof.text()
    low, high = prof.recommended_scale(F16)
    assert f"2^{int(math.log2(low))} .. 2^{int(math.log2(high))}" in text
    assert "activation_grad" in text and "2^16" in text and "not absorb" in text
    path = prof.plot(tmp_path / "fig3.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    model, x, y, loss_fn = _small_grad_model()
    prof = mpcompile.profile(model, x, y, loss_fn, steps=1)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"mpcompile\[plot\]"):
        prof.plot(tmp_path / "x.png")


def test_profile_bad_arguments():
    model, x, y, loss_fn = _small_grad_model()
    prof = mpcompile.profile(model, x, y, loss_fn, steps=1)
    with pytest.raises(ProfileError, match="power of two.*1000"):
        prof.flushed(F16, 1000.0)
    with pytest.raises(ProfileError, match="float16 or torch.bfloat16"):
        prof.flushed(torch.float32)
    with pytest.raises(ProfileError, match="kind must be one of"):
        prof.flushed(F16, 1.0, "grads")
    with pytest.raises(ProfileError, match="keep"):
        prof.recommended_scale(F16, keep=1.5)
    with pytest.raises(ProfileError, match="nn.Module or a TrainStep"):
        mpcompile.profile("model", x, y, loss_fn)
    with pytest.raises(ProfileError, match="steps"):
        mpcompile.profile(model, x, y, loss_fn, steps=0)
    with pytest.raises(ProfileError, match="scalar"):
        mpcompile.profile(model, x, y, lambda o, t: o * 2, steps=1)
    with pytest.raises(ProfileError, match="loss_scales|power of two"):
        mpcompile.profile(model, x, y, loss_fn, loss_scales=(3.0,))


# --- overflow localisation --------------------------------------------------------------------


class Boom(nn.Module):
    def forward(self, x):
        y = x * 100.0
        return y * y  # overflows FP16 once |x| > 2.56


class Planted(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.boom = Boom()
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.boom(self.fc1(x)))


def _planted_step(loss_scale="dynamic"):
    torch.manual_seed(0)
    model = Planted()
    x, y = torch.randn(8, 16) * 0.01, torch.randint(0, 4, (8,))
    step = mpcompile.compile_train_step(model, F.cross_entropy, x, y, loss_scale=loss_scale,
                                        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                                        backend="eager")
    return step, x, y


def test_localize_names_the_planted_node_and_leaves_the_step_unchanged():
    step, clean, y = _planted_step(loss_scale=8.0)
    bad = clean * 3000  # fc1 now outputs |h| ~ 5: (100 h)^2 > 65504
    before = [t.clone() for t in step.state]
    found = mpcompile.localize_overflow(step, bad, y)
    assert all(torch.equal(a, b) for a, b in zip(before, step.state))
    assert found is not None
    assert (found.module, found.op, found.phase) == ("boom", "aten.mul.Tensor", "forward")
    assert "y * y" in found.source
    assert found.output.dtype == "float16" and found.output.n_inf > 0
    # the oracle: the planted op in plain FP16 on the reported input overflows, its input not
    assert all(t.dtype == "float16" and t.max_abs < 65504 for t in found.inputs)
    assert found.inputs[0].max_abs ** 2 >= 65520  # y*y is past FP16's range
    text = str(found)
    assert text.startswith(f"first non-finite value: node {found.node} (aten.mul.Tensor) in "
                           "the forward of module `boom`")
    assert "inf" in text and "keep_fp32_modules=['boom']" in text
    assert mpcompile.numerics.describe(found) == text
    assert found.node in step.explain(found.node)
    # and the real step does skip on that batch; on the clean batch nothing overflows
    assert mpcompile.localize_overflow(step, clean, y) is None
    assert all(torch.equal(a, b) for a, b in zip(before, step.state))  # a clean step: still
    assert "no node produced" in mpcompile.numerics.describe(None)
    assert bool(step(bad, y).skipped) and not bool(step(clean, y).skipped)


def test_localize_backward_overflow_from_the_loss_scale():
    step, clean, y = _planted_step(loss_scale=2.0**40)
    found = mpcompile.localize_overflow(step, clean, y)
    assert found is not None and found.phase == "backward" and found.loss_scale == 2.0**40
    assert "loss scale" in str(found)
    # a scale that fits: clean (the same step, re-run at another scale; state untouched)
    assert mpcompile.localize_overflow(step, clean, y, loss_scale=8.0) is None
    assert bool(step(clean, y).skipped)  # the oracle: the real step skips at 2^40


def test_localize_non_finite_batch_and_bad_arguments():
    step, clean, y = _planted_step()
    bad = clean.clone()
    bad[0, 0] = math.nan
    found = mpcompile.localize_overflow(step, bad, y)
    assert found.phase == "inputs" and found.output.n_nan == 1
    assert "input" in str(found) and "check the data" in str(found)
    with pytest.raises(SignatureError, match="does not match"):
        mpcompile.localize_overflow(step, clean[:4], y[:4])
    with pytest.raises(TrainStepError, match="TrainStep"):
        mpcompile.localize_overflow(Planted(), clean, y)
    with pytest.raises(TrainStepError, match="loss_scale"):
        mpcompile.localize_overflow(step, clean, y, loss_scale=-1.0)
