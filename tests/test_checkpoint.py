"""``TrainStep.save`` / ``TrainStep.load`` and the checks of ``load_state_dict``.

- resume: save at step k, load into a freshly compiled step, m more steps == k + m straight
  steps, bit for bit (losses, every state tensor, the learning rates), also with an LR scheduler
  on the torch optimizer, a ``set_lr`` override, Adam's step count and tied parameters;
- crashes: a save killed (SIGKILL) at random points never loses the previous checkpoint, and no
  partial file ever loads; a write that fails midway leaves the previous file and no temp file;
- damage: flipped bytes, truncation, an empty file, foreign files and another model's checkpoint
  raise ``CheckpointError`` naming the file, and leave the step as it was;
- ``load_state_dict`` refuses non-finite masters, working copies and optimizer state, and a loss
  scale that is not finite and positive.
"""

import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_wild import TIED  # an embedding and an output projection sharing one weight

import mpcompile
from mpcompile import CheckpointError, TrainStepError
from mpcompile.examples import EXAMPLES, MLP, batch
from mpcompile.train import checkpoint

SGD = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)  # noqa: E731
ADAM = lambda p: torch.optim.Adam(p, lr=1e-3)  # noqa: E731


def fresh(ex, make_opt=SGD, model=None):
    model = ex.build().train() if model is None else model
    opt = make_opt(model.parameters())
    step = mpcompile.compile_train_step(model, ex.loss, *batch(ex), optimizer=opt, backend="eager")
    return step, opt


def snapshot(step, opt=None):
    """Everything load must restore or, when it refuses, leave alone."""
    return {"state": [t.clone() for t in step.state],
            "override": step.state_dict()["lr_override"],
            "lrs": step.learning_rates(),
            "opt_lrs": None if opt is None else [g["lr"] for g in opt.param_groups]}


def assert_same(a, b):
    assert len(a["state"]) == len(b["state"])
    for x, y in zip(a["state"], b["state"]):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert (a["override"], a["lrs"], a["opt_lrs"]) == (b["override"], b["lrs"], b["opt_lrs"])


def assert_states_equal(a, b):
    for name, x, y in zip(a.layout.names, a.state, b.state):
        assert x.dtype == y.dtype and torch.equal(x, y), name


# --- resume, bit for bit ------------------------------------------------------------------------


@pytest.mark.parametrize("name,make,lr", [("mlp", SGD, None), ("cnn", SGD, None),
                                          ("transformer", ADAM, 3e-4)],
                         ids=["mlp-sgd", "cnn-sgd-buffers", "transformer-adam-set_lr"])
def test_save_at_k_load_then_m_steps_equals_k_plus_m_straight_steps(tmp_path, name, make, lr):
    ex, k, m = EXAMPLES[name], 4, 3
    straight, _ = fresh(ex, make)
    if lr is not None:
        straight.set_lr(lr)
    for i in range(k):
        straight.step(*batch(ex, seed=i))
    assert straight.save(tmp_path / "ck.mpc") == tmp_path / "ck.mpc"
    want = [straight.step(*batch(ex, seed=i)) for i in range(k, k + m)]

    resumed, _ = fresh(ex, make)
    resumed.load(tmp_path / "ck.mpc")
    assert int(resumed.value("step")) == k
    got = [resumed.step(*batch(ex, seed=i)) for i in range(k, k + m)]
    for w, g in zip(want, got):
        assert torch.equal(w.loss, g.loss) and torch.equal(w.loss_scale, g.loss_scale)
        assert torch.equal(w.skipped, g.skipped)
    assert_states_equal(straight, resumed)
    assert resumed.learning_rates() == straight.learning_rates()
    assert resumed.state_dict()["lr_override"] == straight.state_dict()["lr_override"]


def test_lr_scheduler_lr_is_restored_into_the_torch_optimizer(tmp_path):
    ex, k, m = EXAMPLES["mlp"], 5, 4
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)  # noqa: E731
    straight, opt = fresh(ex)
    scheduler = sched(opt)
    for i in range(k):
        straight.step(*batch(ex, seed=i))
        scheduler.step()
    straight.save(tmp_path / "ck.mpc")
    saved_sched = scheduler.state_dict()
    assert straight.learning_rates() == [0.05 * 0.5**2]
    want = []
    for i in range(k, k + m):
        want.append(straight.step(*batch(ex, seed=i)).loss)
        scheduler.step()

    resumed, opt2 = fresh(ex)
    scheduler2 = sched(opt2)
    resumed.load(tmp_path / "ck.mpc")  # the step's state and the optimizer's lr
    scheduler2.load_state_dict(saved_sched)  # the scheduler's own counters, as in torch
    assert [g["lr"] for g in opt2.param_groups] == [0.05 * 0.5**2]
    assert resumed.learning_rates() == [0.05 * 0.5**2]
    assert resumed.state_dict()["lr_override"] is None  # still follows the scheduler
    got = []
    for i in range(k, k + m):
        got.append(resumed.step(*batch(ex, seed=i)).loss)
        scheduler2.step()
    assert [x.item() for x in got] == [x.item() for x in want]
    assert_states_equal(straight, resumed)
    assert resumed.learning_rates() == straight.learning_rates() == [0.05 * 0.5**4]


def test_scheduled_lr_restored_as_override_into_a_step_without_torch_optimizer(tmp_path):
    ex = EXAMPLES["mlp"]
    a, opt = fresh(ex)
    a.step(*batch(ex))
    opt.param_groups[0]["lr"] = 0.0125  # what a scheduler does
    a.save(tmp_path / "ck.mpc")
    model = ex.build().train()
    b = mpcompile.compile_train_step(model, ex.loss, *batch(ex),
                                     optimizer=mpcompile.optim.SGD(lr=0.05, momentum=0.9),
                                     backend="eager")
    b.load(tmp_path / "ck.mpc")
    assert b.learning_rates() == [0.0125]
    a.step(*batch(ex, seed=1))
    b.step(*batch(ex, seed=1))
    assert_states_equal(a, b)


def test_tied_parameters_keep_one_master_through_save_and_load(tmp_path):
    a, _ = fresh(TIED)
    for i in range(3):
        a.step(*batch(TIED, seed=i))
    a.save(tmp_path / "ck.mpc")
    b, _ = fresh(TIED)
    b.load(tmp_path / "ck.mpc")
    sd = b.state_dict()
    assert sd["master.head.weight"] is sd["master.emb.weight"]
    assert torch.equal(sd["master.emb.weight"], a.value("master.emb.weight"))
    for i in range(3, 5):
        assert torch.equal(a.step(*batch(TIED, seed=i)).loss, b.step(*batch(TIED, seed=i)).loss)
    assert_states_equal(a, b)
    m = b.to_module()
    assert m.head.weight is m.emb.weight


# --- crashes while saving -----------------------------------------------------------------------

_KILLER = textwrap.dedent("""
    import json, os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)  # no worker threads: fork() below stays safe
    import mpcompile
    from mpcompile.examples import EXAMPLES, MLP, batch
    from mpcompile.train import checkpoint

    path, kills, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    folder, rng, ex = os.path.dirname(path), random.Random(seed), EXAMPLES["mlp"]
    model = MLP(hidden=2048)  # ~0.9 MB checkpoints: a write takes a while
    step = mpcompile.compile_train_step(model, ex.loss, *batch(ex), optimizer=torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9))
    step.step(*batch(ex))
    step.save(path)
    t = time.perf_counter()
    step.step(*batch(ex, seed=1))
    step.save(path)
    step.save(path)
    cycle_s = time.perf_counter() - t  # what the child repeats: a step and two saves
    full = os.path.getsize(path)
    out = {"cycle_s": cycle_s, "lost": [], "went_back": [], "partial_loaded": [], "partial": 0,
           "complete_temp": 0, "advanced": 0}
    for k in range(kills):
        if out["lost"] and out["lost"][-1][0] == k - 1:  # (a broken save only) start over
            step.save(path)
        before = int(checkpoint.read(path)["state"]["step"])
        pid = os.fork()
        if pid == 0:  # the child: a step, two saves, a step, ... until killed
            try:
                i = 0
                while True:
                    if i % 2 == 0:
                        step.step(*batch(ex, seed=i))
                    step.save(path)
                    i += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 3.0 * cycle_s))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            step.load(path)  # verified: header, length, sha256, weights_only, every entry
            now = int(step.value("step"))
            out["advanced"] += now > before
            if now < before:
                out["went_back"].append((k, before, now))
        except mpcompile.CheckpointError as e:
            out["lost"].append((k, str(e)))
        for name in os.listdir(folder):
            if name.endswith(".tmp"):
                temp = os.path.join(folder, name)
                try:
                    checkpoint.read(temp)
                    if os.path.getsize(temp) == full:
                        out["complete_temp"] += 1  # killed between fsync and rename
                    else:
                        out["partial_loaded"].append((k, os.path.getsize(temp), full))
                except mpcompile.CheckpointError:
                    out["partial"] += 1  # cut off mid-write and refused: what must happen
                os.unlink(temp)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_during_save_never_loses_the_previous_checkpoint(tmp_path):
    """20 SIGKILLs at random moments of a train-and-save loop (one process per kill, forked from
    a compiled step): the file at the path loads every time, never goes back in steps, and no
    cut-off temporary file loads."""
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _KILLER, str(tmp_path / "ck.mpc"), "20",
                          str(random.SystemRandom().randrange(2**31))],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"kill test: {time.perf_counter() - t:.1f} s, {len(out['lost'])} of 20 lost, {out}")
    assert out["lost"] == [], out["lost"]
    assert out["went_back"] == [] and out["partial_loaded"] == []
    # not vacuous: some kills landed inside a save, some saves completed between kills (each
    # happens for about a third of the kills; 0 of 20 would be a broken test, not bad luck)
    assert out["partial"] + out["complete_temp"] >= 1, out
    assert out["advanced"] >= 1, out


def test_a_write_failing_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ex = EXAMPLES["mlp"]
    step, _ = fresh(ex)
    path = tmp_path / "ck.mpc"
    step.save(path)
    before = path.read_bytes()
    step.step(*batch(ex))

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match=re.escape(repr(str(path))) + r".*No space left"):
        step.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ck.mpc"]

    class Interrupted(BaseException):
        pass

    class HalfWriter:  # writes half of what it is given, then the process is interrupted
        def __init__(self, fd, mode):
            self.f = io.FileIO(fd, "w")

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            raise Interrupted

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(checkpoint.os, "fdopen", HalfWriter)
    with pytest.raises(Interrupted):
        step.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck.mpc"]  # no temporary file left
    step.load(path)
    assert int(step.value("step")) == 0


def test_save_refuses_a_state_it_could_not_load_and_keeps_the_previous_file(tmp_path):
    ex = EXAMPLES["mlp"]
    step, _ = fresh(ex)
    path = tmp_path / "ck.mpc"
    step.save(path)
    before = path.read_bytes()
    master = step.value("master.fc1.weight")  # the state tensor itself: a careless user's edit
    good = master.clone()
    master.index_fill_(1, torch.tensor([3]), float("nan"))
    with pytest.raises(CheckpointError, match=r"master.fc1.weight holds 64 non-finite"):
        step.save(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ck.mpc"]
    master.copy_(good)
    with pytest.raises(CheckpointError, match="it is a directory"):
        step.save(tmp_path)
    with pytest.raises(CheckpointError, match="cannot create a file in"):
        step.save(tmp_path / "no" / "such" / "folder" / "ck.mpc")


# --- damaged and foreign files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of the MLP after 3 steps, and one of a wider MLP (another model)."""
    folder = tmp_path_factory.mktemp("ck")
    ex = EXAMPLES["mlp"]
    step, _ = fresh(ex)
    for i in range(3):
        step.step(*batch(ex, seed=i))
    step.save(folder / "good.mpc")
    other, _ = fresh(ex, model=MLP(hidden=48))
    other.save(folder / "other.mpc")
    cnn, _ = fresh(EXAMPLES["cnn"])
    cnn.save(folder / "cnn.mpc")
    return folder


@pytest.fixture(scope="module")
def _target():
    ex = EXAMPLES["mlp"]
    step, opt = fresh(ex)
    step.step(*batch(ex))
    opt.param_groups[0]["lr"] = 0.02
    return step, opt, snapshot(step, opt)


@pytest.fixture
def target(_target):
    """An MLP step after one step, its torch optimizer's lr changed (as by a scheduler): what
    refused loads must leave as it is. Compiled once; put back as it was after each test."""
    step, opt, initial = _target
    yield step, opt
    state = dict(zip(step.layout.names, (t.clone() for t in initial["state"])))
    step.load_state_dict({**state, "lr_override": initial["override"]})
    opt.param_groups[0]["lr"] = initial["opt_lrs"][0]


def _write_checkpoint(path, payload):
    """A file with a correct header around any payload (what a forger or a bug would make)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    path.write_bytes(f"MPCOMPILE-CHECKPOINT 1 sha256={hashlib.sha256(body).hexdigest()} "
                     f"bytes={len(body)}\n".encode() + body)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling it would create a file: code running on load
        return (Path.touch, (Path(self.path),))


def _damage(kind, good, path, tmp_path, step):
    data = good.read_bytes()
    p = checkpoint.read(good)  # a payload to alter (state and lr differ from the step's)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated-half":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-last-byte":
        path.write_bytes(data[:-1])
    elif kind == "header-only":
        path.write_bytes(data[: data.index(b"\n") + 1])
    elif kind == "extra-bytes":
        path.write_bytes(data + b"\0")
    elif kind == "torch-saved-dict":
        torch.save({"weights": torch.randn(4), "epoch": 3}, path)
    elif kind == "torch-saved-state_dict":  # the README's old recipe
        torch.save(step.state_dict(), path)
    elif kind == "text":
        path.write_text("hello\n")
    elif kind == "missing":
        pass
    elif kind == "nan-master-valid-checksum":
        p["state"]["master.fc2.bias"] = torch.full_like(p["state"]["master.fc2.bias"],
                                                        float("nan"))
        _write_checkpoint(path, p)
    elif kind == "code-in-payload":
        p["lr_override"] = _Marker(tmp_path / "ran")
        _write_checkpoint(path, p)
    elif kind == "wrong-structure":
        del p["learning_rates"]
        _write_checkpoint(path, p)
    elif kind == "lr-nan":
        p["learning_rates"] = [float("nan")]
        _write_checkpoint(path, p)
    elif kind == "format-2":
        path.write_bytes(data.replace(b"MPCOMPILE-CHECKPOINT 1 ", b"MPCOMPILE-CHECKPOINT 2 ", 1))


DAMAGE = {
    "empty": "is empty", "truncated-half": "is truncated", "truncated-last-byte": "is truncated",
    "header-only": "is truncated: 0 of", "extra-bytes": "bytes follow its",
    "torch-saved-dict": "not an mpcompile checkpoint.*zip archive",
    "torch-saved-state_dict": "not an mpcompile checkpoint.*TrainStep.load_state_dict",
    "text": "not an mpcompile checkpoint", "missing": "does not exist",
    "nan-master-valid-checksum": "master.fc2.bias holds 10 non-finite",
    "code-in-payload": r"weights_only=True\)", "wrong-structure": "has keys",
    "lr-nan": "learning rates", "format-2": "is format version 2",
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_or_foreign_file_raises_checkpoint_error_and_leaves_the_step(saved, target,
                                                                            tmp_path, kind):
    step, opt = target
    before = snapshot(step, opt)
    path = tmp_path / "bad.mpc"
    _damage(kind, saved / "good.mpc", path, tmp_path, step)
    with pytest.raises(CheckpointError, match=re.escape(repr(str(path))) + ".*" + DAMAGE[kind]):
        step.load(path)
    assert_same(before, snapshot(step, opt))
    assert not (tmp_path / "ran").exists()


def test_every_flipped_header_byte_and_sampled_payload_bytes_are_caught(saved, tmp_path):
    step, opt = fresh(EXAMPLES["mlp"])
    before = snapshot(step, opt)
    data = bytearray((saved / "good.mpc").read_bytes())
    header = data.index(b"\n") + 1
    rng = random.Random(0)
    where = [*range(header), *rng.sample(range(header, len(data)), 60), len(data) - 1]
    path = tmp_path / "flipped.mpc"
    for i in where:
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            path.write_bytes(bad)
            with pytest.raises(CheckpointError, match=re.escape(repr(str(path)))):
                step.load(path)
    assert_same(before, snapshot(step, opt))
    step.load(saved / "good.mpc")  # the undamaged file loads
    assert int(step.value("step")) == 3


@pytest.mark.parametrize("other,why", [
    ("other.mpc", r"master.fc1.weight is float32\[48, 32\] there, float32\[64, 32\] here"),
    ("cnn.mpc", r"it has master.stem.weight.*this step has master.fc1.weight")])
def test_another_models_checkpoint_is_refused(saved, target, other, why):
    step, opt = target
    before = snapshot(step, opt)
    with pytest.raises(CheckpointError, match=re.escape(repr(str(saved / other)))
                       + " is of another model.*" + why):
        step.load(saved / other)
    assert_same(before, snapshot(step, opt))


# --- load_state_dict ----------------------------------------------------------------------------


@pytest.mark.parametrize("entry,value,why", [
    pytest.param("master.fc1.weight", float("nan"), "master.fc1.weight holds 1 non-finite",
                 id="nan-master"),
    pytest.param("working.fc2.weight", float("inf"), "working.fc2.weight holds 1 non-finite",
                 id="inf-working"),
    pytest.param("opt.fc1.bias.momentum_buffer", float("-inf"),
                 "opt.fc1.bias.momentum_buffer holds 1", id="inf-optimizer-state"),
    pytest.param("scale", 0.0, r"loss scale \(scale\) is 0.0: it must be finite and positive",
                 id="scale-0"),
    pytest.param("scale", -2.0, r"loss scale \(scale\) is -2.0", id="scale-negative"),
    pytest.param("scale", float("inf"), r"loss scale \(scale\) is inf", id="scale-inf"),
    pytest.param("scale", float("nan"), r"loss scale \(scale\) is nan", id="scale-nan"),
    pytest.param("step", -1, "step is -1: it must be non-negative", id="step-negative"),
    pytest.param("lr_override", [float("nan")], "lr_override is", id="lr-nan"),
    pytest.param("lr_override", [0.1, 0.2], "lr_override is", id="lr-too-many"),
])
def test_load_state_dict_refuses_nan_master_and_bad_scale_before_changing_anything(target, entry,
                                                                                    value, why):
    step, opt = target
    sd = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
          for k, v in step.state_dict().items()}
    if entry == "lr_override":
        sd[entry] = value
    elif sd[entry].dim() == 0:
        sd[entry] = torch.tensor(value, dtype=sd[entry].dtype)
    else:
        sd[entry].view(-1)[1] = value
    for k in sd:
        if isinstance(sd[k], torch.Tensor) and k != entry and sd[k].is_floating_point():
            sd[k] = sd[k] + 1  # loading these would change the step
    before = snapshot(step, opt)
    with pytest.raises(TrainStepError, match="load_state_dict: .*" + why):
        step.load_state_dict(sd)
    assert_same(before, snapshot(step, opt))
