"""The compiled training step against two oracles, overflow handling, master weights, golden
structure, checkpoints, errors.

Oracles, N = 20 steps:

- *convert oracle*: ``mpcompile.convert`` (the same mixed-precision forward graph) +
  ``torch.amp.GradScaler`` (same initial scale) + the same torch optimizer. TrainStep must match it
  **bit for bit** (losses, masters, optimizer state, buffers): it is the same forward, autograd's
  backward, GradScaler's unscale/skip/update rule and torch.optim's formulas.
- *autocast oracle*: ``torch.autocast`` + GradScaler + the torch optimizer on FP32 parameters.
  autocast rounds other tensors than mpcompile (it keeps a transformer's residual stream in FP32,
  mpcompile in FP16), so each step's gradient differs by O(u) and trajectories by a few u:
  losses within 1u, updates (master - initial) and optimizer state within 16u normwise per tensor
  (measured worst: 0.25u; 9.4u FP16 / 5.4u BF16; 1.2e-2). MLP, CNN and cat/index models cast at
  the same places as autocast and match it exactly.
"""

import collections
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpcompile
from mpcompile import DynamicLossScale, SignatureError, TrainStepError
from mpcompile.dtypes import unit_roundoff
from mpcompile.examples import EXAMPLES, MLP, batch, eager_step
from mpcompile.fxutil import is_getitem
from mpcompile.records import record

F16, BF16 = torch.float16, torch.bfloat16
U = {F16: unit_roundoff(F16), BF16: unit_roundoff(BF16)}
N = 20
SGD = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)  # noqa: E731
ADAM = lambda p: torch.optim.Adam(p, lr=1e-3)  # noqa: E731


def reference(ex, low, make_opt, steps, oracle, *, init_scale=2.0**16, clip=None, sched=None):
    model = ex.build().train()
    opt = make_opt(model.parameters())
    run = mpcompile.convert(model, batch(ex)[0], dtype=low,
                            backend="eager") if oracle == "convert" else model
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=low is F16)
    scheduler = sched(opt) if sched else None
    losses, norms = [], []
    for i in range(steps):
        x, y = batch(ex, seed=i)
        loss, norm = eager_step(run, opt, scaler, ex.loss, x, y, clip=clip,
                                autocast=low if oracle == "autocast" else None)
        if scheduler:
            scheduler.step()
        losses.append(loss)
        norms.append(norm)
    return model, opt, losses, norms


def compiled(ex, low, make_opt, steps, **kw):
    model = ex.build().train()
    opt = make_opt(model.parameters())
    sched = kw.pop("sched", None)
    step = mpcompile.compile_train_step(model, ex.loss, *batch(ex), optimizer=opt, dtype=low,
                                        **kw, backend="eager")
    scheduler = sched(opt) if sched else None
    results = []
    for i in range(steps):
        results.append(step.step(*batch(ex, seed=i)))
        if scheduler:
            scheduler.step()
    return step, results


def states(step, model, opt):
    """(ours, theirs) for every master, optimizer state tensor and buffer."""
    for name, p in model.named_parameters():
        yield f"master.{name}", step.value(f"master.{name}"), p.detach()
        for k, v in opt.state[p].items():
            if k != "step":
                yield f"opt.{name}.{k}", step.value(f"opt.{name}.{k}"), v
    for name, b in model.named_buffers():
        yield f"buffer.{name}", step.value(f"buffer.{name}"), b


CASES = [(n, low, o) for n in sorted(EXAMPLES) for low in (F16, BF16) for o in ("sgd", "adam")]
_ID = lambda v: str(v).replace("torch.", "")  # noqa: E731


def _half(cases, parity):
    """The default run keeps one optimizer per (model, dtype), alternating, so each model,
    dtype and optimizer is covered; the two oracle tests keep opposite halves. The other
    cases are marked slow (``-m slow``)."""
    return [c if (sorted(EXAMPLES).index(c[0]) + (c[1] is BF16) + (c[2] == "adam")) % 2 == parity
            else pytest.param(*c, marks=pytest.mark.slow) for c in cases]


@pytest.mark.parametrize("name,low,opt", _half(CASES, 0), ids=_ID)
def test_bit_exact_against_convert_gradscaler_and_torch_optimizer(name, low, opt):
    ex, make = EXAMPLES[name], (SGD if opt == "sgd" else ADAM)
    step, results = compiled(ex, low, make, N)
    model, torch_opt, losses, _ = reference(ex, low, make, N, "convert")
    assert [r.loss.item() for r in results] == [v.item() for v in losses]
    for key, ours, theirs in states(step, model, torch_opt):
        assert torch.equal(ours, theirs), key


@pytest.mark.parametrize("name,low,opt", _half(CASES, 1), ids=_ID)
def test_close_to_autocast_gradscaler_and_torch_optimizer(name, low, opt):
    ex, make = EXAMPLES[name], (SGD if opt == "sgd" else ADAM)
    if name == "lstm" and low is F16:
        with pytest.raises(RuntimeError, match="primitive descriptor"):
            reference(ex, low, make, 1, "autocast")  # FP16 LSTM fails inside oneDNN on CPU
        pytest.skip("torch.autocast cannot run an FP16 LSTM on CPU (mpcompile can)")
    step, results = compiled(ex, low, make, N)
    model, torch_opt, losses, _ = reference(ex, low, make, N, "autocast")
    u = U[low]
    for r, ref in zip(results, losses):
        assert abs(r.loss.item() - ref.item()) <= u * abs(ref.item())
    init = dict(ex.build().named_parameters())
    for key, ours, theirs in states(step, model, torch_opt):
        if name == "transformer" and opt == "adam" and "attn.in_proj_bias" in key:
            # the key third of this bias has an exactly-zero gradient (softmax is
            # shift-invariant): Adam's normalised step follows rounding noise in both
            continue
        if key.startswith("master."):
            p0 = init[key.removeprefix("master.")].detach()
            ours, theirs = ours - p0, theirs - p0
        scale = theirs.double().norm().clamp(min=1e-12)
        assert ((ours.double() - theirs.double()).norm() / scale).item() <= 16 * u, key


def _two_groups(params):
    return torch.optim.SGD([{"params": params[:2], "lr": 0.1, "weight_decay": 1e-3},
                            {"params": params[2:]}], lr=0.01, momentum=0.9)


@pytest.mark.parametrize("make,name", [
    (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
     "sgd-nesterov-wd"),
    (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.1, weight_decay=1e-3),
     "sgd-dampening"),
    (lambda p: torch.optim.SGD(p, lr=0.05), "sgd-plain"),
    (lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.8, 0.99), weight_decay=1e-2), "adam-wd"),
    (lambda p: torch.optim.AdamW(p, lr=1e-3), "adamw"),
    (lambda p: _two_groups(list(p)), "sgd-two-groups"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_optimizer_options_bit_exact(make, name):
    ex = EXAMPLES["cnn"]
    step, results = compiled(ex, F16, make, 12)
    model, opt, losses, _ = reference(ex, F16, make, 12, "convert")
    assert [r.loss.item() for r in results] == [v.item() for v in losses]
    for key, ours, theirs in states(step, model, opt):
        assert torch.equal(ours, theirs), key


def test_clipping_and_lr_scheduler_match():
    ex = EXAMPLES["transformer"]
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5)  # noqa: E731
    step, results = compiled(ex, F16, SGD, 12, max_grad_norm=0.5, sched=sched)
    model, opt, losses, norms = reference(ex, F16, SGD, 12, "convert", clip=0.5, sched=sched)
    for r, n in zip(results, norms):
        assert r.grad_norm is not None
        torch.testing.assert_close(r.grad_norm, n, rtol=1e-6, atol=0)
    for key, ours, theirs in states(step, model, opt):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=key)
    assert step.learning_rates() == [0.05 * 0.5**3]


def test_fp32_policy_matches_plain_fp32_training():
    """dtype float32, static scale 128 (a power of two: scaling is exact) == an ordinary FP32
    loop (eager model, loss.backward, optimizer.step), to rounding: the captured graph runs the
    decomposed ops (addmm for linear, ...), the eager model its own kernels."""
    for name in ("cnn", "transformer", "lstm"):
        ex = EXAMPLES[name]
        step, results = compiled(ex, torch.float32, SGD, N, loss_scale=128.0)
        model = ex.build().train()
        opt = SGD(model.parameters())
        for i in range(N):
            x, y = batch(ex, seed=i)
            loss = ex.loss(model(*x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            torch.testing.assert_close(results[i].loss, loss.detach(), rtol=1e-5, atol=0)
        assert not any(n.meta["val"].dtype in (F16, BF16) for n in step.graph_module.graph.nodes
                       if isinstance(n.meta.get("val"), torch.Tensor))
        for key, ours, theirs in states(step, model, opt):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=key)


# --- overflow ---------------------------------------------------------------------------------


def _bad_batch(ex):
    x, y = batch(ex, seed=99)
    return (x[0] * 6e4,), y  # FP16 activations overflow to inf


def test_overflow_skips_and_leaves_state_bit_identical():
    ex = EXAMPLES["cnn"]
    model = ex.build().train()
    step = mpcompile.compile_train_step(model, ex.loss, *batch(ex), optimizer=ADAM(
        model.parameters()), loss_scale=DynamicLossScale(init_scale=2.0**10, growth_interval=3),
        backend="eager")
    for i in range(2):
        assert not step.step(*batch(ex, seed=i)).skipped.item()
    before = {k: v.clone() for k, v in step.state_dict().items() if k != "lr_override"}
    assert before["growth_tracker"].item() == 2
    r = step.step(*_bad_batch(ex))
    assert r.skipped.item() and not torch.isfinite(r.loss).item()
    after = step.state_dict()
    for k, v in before.items():
        if k == "scale":
            assert after[k].item() == v.item() / 2 == r.loss_scale.item()
        elif k == "growth_tracker":
            assert after[k].item() == 0
        else:
            assert torch.equal(after[k], v), k  # masters, working copies, Adam state, step, BN


def test_training_after_a_bad_batch_matches_training_without_it():
    ex = EXAMPLES["cnn"]
    runs = []
    for with_bad in (True, False):
        model = ex.build().train()
        step = mpcompile.compile_train_step(model, ex.loss, *batch(ex), loss_scale=1024.0,
                                            optimizer=SGD(model.parameters()), backend="eager")
        for i in range(6):
            if with_bad and i == 3:
                assert step.step(*_bad_batch(ex)).skipped.item()
            step.step(*batch(ex, seed=i))
        runs.append(step.state_dict())
    for k, v in runs[0].items():
        if k != "lr_override":
            assert torch.equal(v, runs[1][k]), k


def test_huge_scale_backs_off_until_finite_then_grows():
    ex = EXAMPLES["mlp"]
    model = ex.build().train()
    step = mpcompile.compile_train_step(
        model, ex.loss, *batch(ex), optimizer=SGD(model.parameters()),
        loss_scale=DynamicLossScale(init_scale=2.0**40, growth_interval=4), backend="eager")
    scales, skipped = [], []
    for i in range(40):
        r = step.step(*batch(ex, seed=i))
        scales.append(r.loss_scale.item())
        skipped.append(r.skipped.item())
    first_ok = skipped.index(False)
    assert first_ok > 0 and all(skipped[:first_ok])
    assert scales[:first_ok] == [2.0 ** (40 - k - 1) for k in range(first_ok)]
    # after a clean step the counter runs; growth every 4 clean steps (when nothing overflows)
    s = scales[first_ok - 1]
    clean = 0
    for sk, sc in zip(skipped[first_ok:], scales[first_ok:]):
        if sk:
            s, clean = s / 2, 0
        else:
            clean += 1
            if clean == 4:
                s, clean = s * 2, 0
        assert sc == s
    assert step.value("step").item() == skipped.count(False)


def test_min_and_max_scale():
    ex = EXAMPLES["mlp"]
    model = ex.build().train()
    step = mpcompile.compile_train_step(
        model, ex.loss, *batch(ex), optimizer=SGD(model.parameters()),
        loss_scale=DynamicLossScale(init_scale=256.0, growth_interval=1, max_scale=1024.0),
        backend="eager")
    assert [step.step(*batch(ex)).loss_scale.item() for _ in range(4)] == [512, 1024, 1024, 1024]
    with pytest.raises(TrainStepError, match="min_scale 4 > max_scale 2"):
        DynamicLossScale(min_scale=4, max_scale=2)


# --- master weights ---------------------------------------------------------------------------


class Scalarish(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(4, 1, bias=False)
        nn.init.ones_(self.w.weight)

    def forward(self, x):
        return self.w(x)


def test_master_weights_keep_small_updates():
    """lr * grad = 1e-4 per step on weights of 1.0: below half an FP16 ulp (2^-11 ~ 4.9e-4), so
    an FP16 weight updated directly never moves; the FP32 master accumulates the updates and the
    FP16 working copy follows once they add up."""
    x, y = torch.ones(2, 4), torch.zeros(2, 1)
    loss = lambda out, t: (out - t).sum() / 8  # noqa: E731  d loss / d w = 1/4 * 2 * 1/... = 0.25
    results = {}
    for master in (True, False):
        model = Scalarish()
        step = mpcompile.compile_train_step(
            model, loss, x, y, optimizer=torch.optim.SGD(model.parameters(), lr=4e-4),
            loss_scale=None, master_weights=master, backend="eager")
        for _ in range(20):
            step.step(x, y)
        results[master] = step
    work = results[True].value("working.w.weight")
    master = results[True].value("master.w.weight")
    assert work.dtype is F16 and master.dtype is torch.float32
    torch.testing.assert_close(master, torch.full_like(master, 1 - 20 * 1e-4), rtol=0, atol=1e-6)
    assert (work < 1).all()  # the FP16 copy moved
    stuck = results[False]
    assert "master.w.weight" not in stuck.layout.names
    assert (stuck.value("working.w.weight") == 1).all()  # swamped: w + u == w in FP16


# --- structure ----------------------------------------------------------------------------------


def _two_layer_step(**kw):
    torch.manual_seed(0)
    model = MLP(8, 16, 4)
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    return mpcompile.compile_train_step(model, lambda o, t: F.cross_entropy(o, t), x, y,
                                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1,
                                                                  momentum=0.9), **kw,
                                                                  backend="eager")


def canonical_phases(gm):
    c = collections.Counter()
    for n in gm.graph.nodes:
        if n.op == "call_function" and not is_getitem(n):
            dt = n.meta["val"].dtype if isinstance(n.meta.get("val"), torch.Tensor) else None
            c[(record(n).created_by, str(n.target).removeprefix("aten."),
               str(dt).removeprefix("torch."))] += 1
    return c


def test_golden_training_graph_of_a_two_layer_mlp():
    got = canonical_phases(_two_layer_step().graph_module)
    P = 4  # parameters: fc1.weight, fc1.bias, fc2.weight, fc2.bias
    expected = {
        # forward: input cast, permute + addmm (fp16) per layer, relu, output cast. The weights
        # come in as fp16 working copies: no weight casts inside the forward.
        ("casts", "_to_copy.default", "float16"): 1,
        ("capture", "permute.default", "float16"): 2,
        ("capture", "addmm.default", "float16"): 2,
        ("capture", "relu.default", "float16"): 1,
        ("casts", "_to_copy.default", "float32"): 1,
        # loss (FP32) and loss scale
        ("loss", "_log_softmax.default", "float32"): 1,
        ("loss", "nll_loss_forward.default", "None"): 1,
        ("loss_scale", "mul.Tensor", "float32"): 1,
        # unscale: 1/S once (in float64, as GradScaler), then per parameter cast to FP32 + mul
        ("unscale", "_to_copy.default", "float64"): 1,
        ("unscale", "reciprocal.default", "float64"): 1,
        ("unscale", "_to_copy.default", "float32"): 1 + P,
        ("unscale", "mul.Tensor", "float32"): P,
        # found_inf: max |g| per parameter, one stack + amax, then not isfinite (decomposed:
        # abs, != inf, x == x, and, not)
        ("found_inf", "linalg_vector_norm.default", "float32"): P,
        ("found_inf", "stack.default", "float32"): 1,
        ("found_inf", "amax.default", "float32"): 1,
        ("found_inf", "abs.default", "float32"): 1,
        ("found_inf", "ne.Scalar", "bool"): 1,
        ("found_inf", "eq.Tensor", "bool"): 1,
        ("found_inf", "mul.Tensor", "bool"): 1,
        ("found_inf", "bitwise_not.default", "bool"): 1,
        # update: step+1 (an integer count); per group -lr and first-step flag; per parameter
        # SGD-momentum
        ("update", "add.Tensor", "int64"): 1,
        ("update", "add.Tensor", "float32"): P,
        ("update", "neg.default", "float64"): 1,
        ("update", "_to_copy.default", "float32"): 1,
        ("update", "eq.Scalar", "bool"): 1,
        ("update", "mul.Tensor", "float32"): P,
        ("update", "where.self", "float32"): P,
        ("update", "addcmul.default", "float32"): P,
        # gates: master and momentum buffer per parameter, and the step count
        ("gate", "where.self", "float32"): 2 * P,
        ("gate", "where.self", "int64"): 1,
        # new FP16 working copies from the new masters
        ("working_copy", "_to_copy.default", "float16"): P,
        # dynamic scale update
        ("scale_update", "add.Tensor", "int32"): 1,
        ("scale_update", "ge.Scalar", "bool"): 1,
        ("scale_update", "mul.Tensor", "float32"): 2,
        ("scale_update", "isinf.default", "bool"): 1,
        ("scale_update", "where.self", "float32"): 3,
        ("scale_update", "clamp.default", "float32"): 1,  # the floor, min_scale
        ("scale_update", "bitwise_or.Tensor", "bool"): 1,
        ("scale_update", "zeros_like.default", "int32"): 1,
        ("scale_update", "where.self", "int32"): 1,
    }
    non_backward = {k: v for k, v in got.items() if k[0] != "backward"}
    assert non_backward == expected
    backward = {k[1:]: v for k, v in got.items() if k[0] == "backward"}
    # backward matmuls run in FP16, from autograd of the FP16 forward
    assert backward[("mm.default", "float16")] == 3
    assert not any(dt == "float32" for (op, dt) in backward if op == "mm.default")


def test_report_and_explain_training_nodes():
    step = _two_layer_step(max_grad_norm=1.0)
    rep = step.report()
    assert rep.updates_per_param == {"fc1.weight": 4, "fc1.bias": 4, "fc2.weight": 4,
                                     "fc2.bias": 4}
    assert rep.nodes_by_phase["clip"] > 0 and rep.casts["working_copy"] == 4
    assert rep.low_state_bytes == (8 * 16 + 16 + 16 * 4 + 4) * 2
    # masters and momentum, and the scale (the step count is an int64, not FP32 state)
    assert rep.fp32_state_bytes == 2 * (8 * 16 + 16 + 16 * 4 + 4) * 4 + 4
    text = str(rep)
    assert "training graph, nodes by phase:" in text and "update" in text
    assert rep.as_dict()["forward"]["model"] == "MLP"
    nodes = list(step.graph_module.graph.nodes)
    upd = next(n for n in nodes if n.target is torch.ops.aten.addcmul.default)
    assert "optimizer's update, on the FP32 master" in step.explain(upd.name)
    gate = next(n for n in nodes if record(n).created_by == "gate")
    assert "bit-identical" in step.explain(gate)
    mm = next(n for n in nodes if record(n).created_by == "backward"
              and n.target is torch.ops.aten.mm.default)
    assert "gradient of forward node addmm" in step.explain(mm.name)
    assert "working copy of parameter" in step.explain("working_fc1_weight") or \
        "step input: state working.fc1.weight" in step.explain("working_fc1_weight")


# --- state --------------------------------------------------------------------------------------


def test_checkpoint_resume_is_bit_exact_and_to_module():
    ex = EXAMPLES["cnn"]

    def fresh():
        model = ex.build().train()
        return mpcompile.compile_train_step(model, ex.loss, *batch(ex),
                                            optimizer=ADAM(model.parameters()), backend="eager")

    whole = fresh()
    for i in range(7):
        whole.step(*batch(ex, seed=i))
    first = fresh()
    for i in range(4):
        first.step(*batch(ex, seed=i))
    saved = copy.deepcopy(first.state_dict())
    resumed = fresh()
    resumed.load_state_dict(saved)
    for i in range(4, 7):
        resumed.step(*batch(ex, seed=i))
    for k, v in whole.state_dict().items():
        if k != "lr_override":
            assert torch.equal(v, resumed.state_dict()[k]), k
    module = resumed.to_module()
    assert type(module) is type(ex.build())
    for name, p in module.named_parameters():
        assert p.dtype is torch.float32 and torch.equal(p, resumed.value(f"master.{name}"))
    for name, b in module.named_buffers():
        assert torch.equal(b, resumed.value(f"buffer.{name}"))
    bad = dict(saved)
    bad["master.fc.weight"] = torch.zeros(3)
    with pytest.raises(TrainStepError, match=r"master.fc.weight is float32\[3\], expected"):
        resumed.load_state_dict(bad)


def test_set_lr_needs_no_recompile():
    ex = EXAMPLES["mlp"]
    a, _ = compiled(ex, F16, SGD, 0)
    gm = a.graph_module
    a.set_lr(0.01)
    b_model = ex.build().train()
    b = mpcompile.compile_train_step(b_model, ex.loss, *batch(ex),
                                     optimizer=torch.optim.SGD(b_model.parameters(), lr=0.01,
                                                               momentum=0.9), backend="eager")
    for i in range(3):
        a.step(*batch(ex, seed=i))
        b.step(*batch(ex, seed=i))
    assert a.graph_module is gm
    assert torch.equal(a.value("master.fc1.weight"), b.value("master.fc1.weight"))
    with pytest.raises(TrainStepError, match="one per group"):
        a.set_lr([0.1, 0.2])


def test_frozen_parameters_stay_put():
    ex = EXAMPLES["mlp"]
    model = ex.build().train()
    model.fc1.weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    step = mpcompile.compile_train_step(model, ex.loss, *batch(ex), optimizer=opt, backend="eager")
    w0, v0 = model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()
    for i in range(3):
        step.step(*batch(ex, seed=i))
    assert torch.equal(step.value("master.fc1.weight"), w0)
    assert not torch.equal(step.value("master.fc2.weight"), v0)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_the_model_is_trained_in_place_as_under_torch_optim(backend):
    """An FP32 parameter is its master and a buffer its state entry: after the steps the
    model holds what the step holds (no second FP32 copy), and a loaded state lands there too."""
    ex = EXAMPLES["cnn"]
    model = ex.build().train()
    step = mpcompile.compile_train_step(model, ex.loss, *batch(ex), optimizer=SGD(
        model.parameters()), backend=backend)
    saved = {k: v.clone() for k, v in step.state_dict().items() if k != "lr_override"}
    for i in range(2):
        step.step(*batch(ex, seed=i))
    for name, p in model.named_parameters():
        assert p.data_ptr() == step.value(f"master.{name}").data_ptr(), name
        assert not torch.equal(p, saved[f"master.{name}"]), name  # trained
    for name, b in model.named_buffers():
        assert torch.equal(b, step.value(f"buffer.{name}")), name
    step.load_state_dict(saved)
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[f"master.{name}"]), name


# --- errors -------------------------------------------------------------------------------------


def _untouched(model, opt, fn):
    before = copy.deepcopy(model.state_dict())
    fn()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not opt.state


def test_unsupported_optimizer_and_options():
    ex = EXAMPLES["mlp"]
    model = ex.build()
    for opt, match in [
        (torch.optim.RMSprop(model.parameters()), "RMSprop is not supported.*SGD, Adam or AdamW"),
        (torch.optim.Adam(model.parameters(), amsgrad=True), r"Adam\(amsgrad=True\)"),
        (torch.optim.SGD(model.parameters(), lr=0.1, maximize=True), r"maximize=True"),
        (torch.optim.SGD(list(model.parameters())[:2], lr=0.1), r"not in the optimizer"),
    ]:
        def go(opt=opt, match=match):
            with pytest.raises(TrainStepError, match=match):
                mpcompile.compile_train_step(model, ex.loss, *batch(ex), optimizer=opt,
                                             backend="eager")
        _untouched(model, opt, go)
    with pytest.raises(TrainStepError, match="loss_scale='static'"):
        mpcompile.compile_train_step(model, ex.loss, *batch(ex), loss_scale="static",
                                     optimizer=SGD(model.parameters()), backend="eager")
    with pytest.raises(TrainStepError, match="growth_factor must be > 1"):
        DynamicLossScale(growth_factor=1.0)


def test_loss_must_be_a_scalar():
    ex = EXAMPLES["mlp"]
    model = ex.build()
    opt = SGD(model.parameters())

    def go():
        with pytest.raises(TrainStepError, match=r"scalar tensor, got \[16\].*\.mean\(\)"):
            mpcompile.compile_train_step(
                model, lambda o, t: F.cross_entropy(o, t, reduction="none"), *batch(ex),
                optimizer=opt, backend="eager")

    _untouched(model, opt, go)


def test_targets_must_match_the_example():
    ex = EXAMPLES["mlp"]
    model = ex.build()
    step = mpcompile.compile_train_step(model, ex.loss, *batch(ex),
                                        optimizer=SGD(model.parameters()), backend="eager")
    x, y = batch(ex)
    before = {k: v.clone() for k, v in step.state_dict().items() if k != "lr_override"}
    with pytest.raises(SignatureError, match=r"targets\[0\] is int64\[8\] on cpu, compiled for "
                                             r"int64\[16\]"):
        step.step(x, y[:8])
    with pytest.raises(SignatureError, match="it has inputs\\[0\\], the example had"):
        step.step(x, ())
    assert all(torch.equal(v, step.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("spec,make", [
    (mpcompile.optim.SGD(lr=0.05, momentum=0.9, nesterov=True), lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True)),
    (mpcompile.optim.AdamW(lr=1e-3, weight_decay=1e-2), lambda p: torch.optim.AdamW(
        p, lr=1e-3, weight_decay=1e-2)),
], ids=["sgd", "adamw"])
def test_mpcompile_optim_specs_equal_torch_optimizers(spec, make):
    ex = EXAMPLES["mlp"]
    runs = []
    for opt in (spec, None):
        model = ex.build().train()
        step = mpcompile.compile_train_step(model, ex.loss, *batch(ex),
                                            optimizer=opt or make(model.parameters()),
                                            backend="eager")
        for i in range(5):
            step.step(*batch(ex, seed=i))
        runs.append(step.state_dict())
    for k, v in runs[0].items():
        if k != "lr_override":
            assert torch.equal(v, runs[1][k]), k
    with pytest.raises(TrainStepError, match="nesterov momentum requires"):
        mpcompile.optim.SGD(lr=0.1, nesterov=True)


# -- in-graph gradient counters (grad_stats=True) ----------------------------------------------

class _Tiny(nn.Module):
    """A loss scaled by 2^-20 (an SSD-like model): its FP16 gradients flush to zero at S = 1."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _tiny_loss(out, y):
    return F.cross_entropy(out, y) * 2.0**-20


def _counted(scale, x, y):
    torch.manual_seed(0)
    model = _Tiny()
    groups = [{"params": [model.fc1.weight, model.fc1.bias]},
              {"params": [model.fc2.weight, model.fc2.bias], "lr": 0.01}]
    step = mpcompile.compile_train_step(model, _tiny_loss, x, y, loss_scale=scale,
                                        optimizer=torch.optim.SGD(groups, lr=0.1),
                                        backend="eager", grad_stats=True)
    return step, step.step(x, y)


def test_grad_stats_make_underflow_visible():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    _, r1 = _counted(1.0, x, y)
    _, r15 = _counted(2.0**15, x, y)
    assert r1.grad_numel == (32 * 64 + 64, 64 * 10 + 10)
    assert r1.grad_zeros.shape == (2,) and r1.grad_zeros.dtype == torch.int64
    # |g| here is below 2^-25 (half FP16's smallest subnormal) for almost every element at S=1
    assert (r1.zero_fraction > 0.9).all(), r1.zero_fraction
    # at S = 2^15 the same gradients are representable: only relu's dead units stay zero
    assert (r15.zero_fraction < 0.5).all() and (r15.zero_fraction < r1.zero_fraction).all()
    assert r1.grad_nonfinite.tolist() == [0, 0] and not r1.skipped
    # an inf in the batch: non-finite gradients counted, the step skipped
    x_bad = x.clone()
    x_bad[3, 5] = float("inf")
    step, _ = _counted(2.0**15, x, y)
    bad = step.step(x_bad, y)
    assert bool(bad.skipped) and int(bad.grad_nonfinite.sum()) > 0
    assert "grad_zeros" in step.output_names and "grad_nonfinite" in step.output_names


@pytest.mark.parametrize("log2_scale", [6, 12])
def test_grad_stats_zero_count_matches_fp16_gradients_computed_by_hand(log2_scale):
    """Oracle: one FP16 linear layer, its loss in FP32 x 2^-20 x S, gradients by hand: the
    logits' gradient in FP32 rounded to FP16, then dW = dL^T x and db = sum(dL) accumulated in
    FP32 and rounded to FP16. Input columns scaled by 2^-j/2 spread dW across the flush
    boundary (about 70 % / 30 % zeros at S = 2^6 / 2^12). Zero-ness differs only where a value
    sits at the boundary, so the counts agree within 1 % of the elements."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g) * 2.0 ** (-torch.arange(32.0) / 2)
    y = torch.randint(0, 10, (256,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(32, 10)
    scale = 2.0**log2_scale
    w16, b16, x16 = model.weight.half(), model.bias.half(), x.half()
    logits = (x16.float() @ w16.float().T + b16.float()).half().float().requires_grad_()
    (dl,) = torch.autograd.grad(_tiny_loss(logits, y) * scale, logits)
    dl16 = dl.half().float()
    want = int(((dl16.T @ x16.float()).half() == 0).sum() + (dl16.sum(0).half() == 0).sum())
    step = mpcompile.compile_train_step(model, _tiny_loss, x, y, loss_scale=scale,
                                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        backend="eager", grad_stats=True)
    got = int(step.step(x, y).grad_zeros.sum())
    assert 50 < want < 280 and abs(got - want) <= 0.01 * (32 * 10 + 10), (got, want)


def test_grad_stats_count_a_parameter_no_gradient_reaches_as_zeros():
    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x)  # b is trained by the optimizer but never reached

    torch.manual_seed(0)
    model, x, y = Half(), torch.randn(8, 4), torch.randn(8, 4)
    step = mpcompile.compile_train_step(model, F.mse_loss, x, y, backend="eager",
                                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        grad_stats=True)
    r = step.step(x, y)
    # a's 20 gradient elements are nonzero (random data), b's 20 count as zeros
    assert r.grad_numel == (40,) and r.grad_zeros.tolist() == [20]
    assert r.zero_fraction.tolist() == [0.5]
