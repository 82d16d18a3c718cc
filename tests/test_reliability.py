"""Nothing lost, nothing silently wrong: concurrent recapture, frozen parameters, every torch
optimizer option honoured exactly or refused, loss scales checked as they are stored, learning
rates that would corrupt the masters refused, a step counter that counts past 2^24."""

import inspect
import logging
import sys
import threading
import warnings

import pytest
import torch
from test_train import compiled, reference, states

import mpcompile
from mpcompile import DynamicLossScale, TrainStepError
from mpcompile.examples import EXAMPLES, batch

F16 = torch.float16
MLP = EXAMPLES["mlp"]


def test_two_threads_recapturing_one_module():
    """torch.export is not thread-safe and swaps process-wide state: recapture is serialised,
    every result is right, the weights stay real tensors, stderr and the logger are restored."""
    model = MLP.build().eval()
    reference_model = MLP.build().eval()
    mp = mpcompile.convert(model, backend="eager")
    stderr = sys.stderr
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    wrong, errors = [], []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            for i in range(5):
                x = torch.randn(1 + (seed * 5 + i) % 7, 32, generator=g)
                with torch.no_grad():
                    out, want = mp(x), reference_model(x)
                if type(out) is not torch.Tensor or (out - want).abs().max() > 1e-2:
                    wrong.append((seed, i))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong
    assert all(type(p.data) is torch.Tensor for p in model.parameters())
    assert sys.stderr is stderr and logger.level == level


def test_frozen_parameter_in_the_optimizer_stays_frozen():
    def make(params):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)

    def build():
        m = MLP.build()
        m.fc1.weight.requires_grad_(False)  # frozen, but still handed to the optimizer
        return m

    ex = type(MLP)("frozen", build, MLP.inputs, MLP.targets, MLP.loss)
    step, _ = compiled(ex, F16, make, 5)
    model, opt, _, _ = reference(ex, F16, make, 5, "convert")
    assert torch.equal(step.value("master.fc1.weight"), build().fc1.weight)
    assert "opt.fc1.weight.momentum_buffer" not in step.layout
    for key, ours, theirs in states(step, model, opt):
        assert torch.equal(ours, theirs), key


_TRY = {  # a non-default value for each option the constructors take (others: derived below)
    "lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2, "nesterov": True,
    "betas": (0.8, 0.99), "eps": 1e-6, "decoupled_weight_decay": True,
}
_NEEDS = {"nesterov": {"momentum": 0.9}, "dampening": {"momentum": 0.9}}


def _other_value(name, default):
    if name in _TRY:
        return _TRY[name]
    if isinstance(default, bool):
        return not default
    if default is None:
        return True
    if isinstance(default, (int, float)):
        return default * 2 + 0.1
    raise AssertionError(f"no test value for {name}={default!r}: add it to _TRY")


OPTIONS = [(cls, name) for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
           for name in inspect.signature(cls.__init__).parameters
           if name not in ("self", "params")]


@pytest.mark.parametrize("cls,name", OPTIONS, ids=lambda v: getattr(v, "__name__", v))
def test_every_optimizer_option_is_honoured_or_refused(cls, name):
    """Walks the constructor signatures of the installed torch: a new option cannot slip
    through silently."""
    default = inspect.signature(cls.__init__).parameters[name].default
    kw = {**_NEEDS.get(name, {}), name: _other_value(name, default)}

    def make(params):
        return cls(params, **kw)

    try:
        step, results = compiled(MLP, F16, make, 3)
    except TrainStepError as e:
        assert name in str(e)  # refused, naming the option
        return
    model, opt, losses, _ = reference(MLP, F16, make, 3, "convert")
    assert [r.loss.item() for r in results] == [v.item() for v in losses]
    for key, ours, theirs in states(step, model, opt):
        assert torch.equal(ours, theirs), f"{cls.__name__}({name}={kw[name]!r}): {key}"


def test_adam_decoupled_weight_decay_is_adamw():
    step, _ = compiled(MLP, F16, lambda p: torch.optim.Adam(
        p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True), 3)
    assert type(step.plan.groups[0]) is mpcompile.optim.AdamW


@pytest.mark.parametrize("bad", [1e40, float("inf"), float("nan"), 1e-50, 0.0, -1.0])
def test_loss_scales_are_checked_as_float32(bad):
    with pytest.raises(TrainStepError, match="float32"):
        DynamicLossScale(init_scale=bad)
    with pytest.raises(TrainStepError, match="float32"):
        compiled(MLP, F16, lambda p: torch.optim.SGD(p, lr=0.1), 0, loss_scale=bad)


def test_the_dynamic_scale_has_a_floor():
    model = MLP.build()
    x, y = batch(MLP)
    step = mpcompile.compile_train_step(model, MLP.loss, x, y,
                                        optimizer=mpcompile.optim.SGD(lr=0.1), backend="eager")
    bad = (x[0] * float("nan"),)
    for _ in range(40):  # 2^16 halves to 1 in 16 steps; then it stays there
        r = step(bad, y)
        assert bool(r.skipped)
    assert r.loss_scale.item() == 1.0
    assert not bool(step(x, y).skipped)  # a clean batch trains again


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_learning_rates_that_would_corrupt_the_masters_are_refused(bad):
    model = MLP.build()
    x, y = batch(MLP)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = mpcompile.compile_train_step(model, MLP.loss, x, y, optimizer=opt, backend="eager")
    before = {k: v.clone() for k, v in step.state_dict().items() if k != "lr_override"}
    with pytest.raises(TrainStepError, match="lr"):
        step.set_lr(bad)
    opt.param_groups[0]["lr"] = bad  # what a broken LR scheduler does
    with pytest.raises(TrainStepError, match="finite and non-negative"):
        step(x, y)
    after = step.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(TrainStepError):
        mpcompile.optim.SGD(lr=bad)


def test_the_step_counter_counts_past_2_to_the_24():
    model = MLP.build()
    x, y = batch(MLP)
    step = mpcompile.compile_train_step(model, MLP.loss, x, y,
                                        optimizer=torch.optim.Adam(model.parameters()),
                                        backend="eager")
    state = step.state_dict()
    state["step"] = torch.tensor(2**24, dtype=torch.int64)
    step.load_state_dict(state)
    step(x, y)
    step(x, y)
    assert step.value("step").item() == 2**24 + 2  # a float32 counter stops at 2^24


class _Config:  # a mutable object a user might pass to forward
    scale = 2.0


class _TakesValues(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, scale=1.0, cfg=None):
        return self.fc(x) * scale * (cfg.scale if cfg is not None else 1.0)


def test_non_tensor_arguments_must_be_immutable_values():
    mp = mpcompile.convert(_TakesValues(), backend="eager")
    x = torch.randn(2, 4)
    with pytest.raises(mpcompile.SignatureError, match=r"args\[2\] is a _Config.*immutable"):
        mp(x, 1.0, _Config())
    a = mp(x, 3.0)
    assert len(mp.programs) == 1
    mp(x, 3.0)
    assert len(mp.programs) == 1  # the same value reuses the graph
    b = mp(x, 2.0)
    assert len(mp.programs) == 2
    torch.testing.assert_close(a * 2 / 3, b, rtol=4 * 2.0**-11, atol=1e-3)  # FP16 products


def test_a_float_input_in_another_dtype_than_captured_is_named():
    model = MLP.build()
    x, _ = batch(MLP)
    mp = mpcompile.convert(model, x, backend="eager")
    with pytest.raises(mpcompile.SignatureError, match=r"args\[0\] is float64.*float32"):
        mp(x[0].double())
    model.double()  # moving the model too is a new capture, not an error
    assert mp(x[0].double()).dtype is torch.float64


def test_a_run_of_skipped_steps_warns_and_says_the_scale_is_at_its_floor():
    model = MLP.build()
    x, y = batch(MLP)
    step = mpcompile.compile_train_step(model, MLP.loss, x, y,
                                        optimizer=mpcompile.optim.SGD(lr=0.1), backend="eager")
    step.warn_after_skips = 20
    bad = (x[0] * float("nan"),)
    for _ in range(5):
        step(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(14):  # 14 skipped, then clean: no run of 20
            r = step(bad, y)
        for _ in range(6):
            step(x, y)
    with pytest.warns(RuntimeWarning, match=r"\d+ training steps in a row were skipped.*floor"
                      ) as caught:
        for _ in range(40):
            r = step(bad, y)
    assert bool(r.at_min_scale) and r.loss_scale.item() == 1.0
    # the warning localises the overflow: the NaN comes in with the batch
    text = " ".join(str(w.message) for w in caught)
    assert "Last batch: " in text and "input" in text, text


def test_fault_injection_no_corrupted_state():
    """300 steps, 60 of them poisoned (inf or NaN in the batch), static scale: every poisoned
    step is skipped and changes nothing, and the run ends bit-identical to one that never saw
    the poisoned batches."""
    x, y = batch(MLP)
    g = torch.Generator().manual_seed(3)
    poisoned = set(torch.randperm(300, generator=g)[:60].tolist())

    def run(with_poison: bool):
        model = MLP.build()
        step = mpcompile.compile_train_step(model, MLP.loss, x, y, loss_scale=1024.0,
                                            optimizer=torch.optim.SGD(model.parameters(),
                                                                      lr=0.01, momentum=0.9),
                                                                      backend="eager")
        for i in range(300):
            xi, yi = batch(MLP, seed=i)
            if i in poisoned:
                if not with_poison:
                    continue
                bad = xi[0].clone()
                bad[i % bad.shape[0], i % bad.shape[1]] = float("inf") if i % 2 else float("nan")
                before = {k: v.clone() for k, v in step.state_dict().items()
                          if isinstance(v, torch.Tensor)}
                r = step((bad,), yi)
                after = step.state_dict()
                assert bool(r.skipped)
                assert all(torch.equal(before[k], after[k]) for k in before)
            else:
                assert not bool(step(xi, yi).skipped)
        return step.state_dict()

    clean, dirty = run(False), run(True)
    for k, v in clean.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, dirty[k]), k
