"""Files in and out: ``export_onnx`` writes atomically and names a bad path; ``OrtTrainer`` names a
file it cannot read and a batch that does not fit, instead of protobuf's or onnxruntime's error."""

import errno
import os
from pathlib import Path

import pytest
import torch

import mpcompile
from mpcompile.examples import EXAMPLES, batch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from mpcompile.export import onnx_export  # noqa: E402 - needs onnx
from mpcompile.export.onnx_export import metadata  # noqa: E402

EX = EXAMPLES["mlp"]  # inputs float32[16, 32], targets int64[16]


def _step():
    model = EX.build()
    return mpcompile.compile_train_step(model, EX.loss, *batch(EX),
                                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        backend="eager")


@pytest.fixture(scope="module")
def step():
    return _step()


@pytest.fixture(scope="module")
def exported(step, tmp_path_factory) -> Path:
    return mpcompile.export_onnx(step, tmp_path_factory.mktemp("export") / "step.onnx")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- export_onnx: a bad path ---------------------------------------------------------------------


@pytest.fixture
def no_export(monkeypatch):
    """A bad path is found before the (slow) export runs."""
    def export(*args):
        raise AssertionError("the export ran before the path was checked")
    monkeypatch.setattr(onnx_export, "_export", export)


def test_export_to_a_missing_folder_names_it(step, tmp_path, no_export):
    path = tmp_path / "missing" / "step.onnx"
    with pytest.raises(mpcompile.ExportError, match="does not exist") as e:
        mpcompile.export_onnx(step, path)
    assert str(path) in str(e.value) and "create it first" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_export_to_a_directory_names_it(step, tmp_path, no_export):
    with pytest.raises(mpcompile.ExportError, match="is a directory") as e:
        mpcompile.export_onnx(step, tmp_path)
    assert str(tmp_path) in str(e.value) and "model.onnx" in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_export_where_no_file_can_be_created_names_it(step, no_export):
    with pytest.raises(mpcompile.ExportError, match="cannot create a file") as e:
        mpcompile.export_onnx(step, "/proc/step.onnx")
    assert "/proc/step.onnx" in str(e.value) and "writable folder" in str(e.value)


# --- export_onnx: atomic writes ------------------------------------------------------------------


def test_export_replaces_a_file_whole_with_the_usual_permissions(step, tmp_path):
    path = tmp_path / "step.onnx"
    path.write_bytes(b"an older file")
    assert mpcompile.export_onnx(step, path) == path
    assert metadata(onnx.load(str(path)))["kind"] == "train_step"
    assert [p.name for p in tmp_path.iterdir()] == ["step.onnx"]
    new = tmp_path / "new.onnx"  # a new file: what open() would give, not mkstemp's 0o600
    mpcompile.export_onnx(step, new)
    assert new.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _fail_mid_write(exc):
    def save(model, f, *args, **kwargs):
        f.write(model.SerializeToString()[:100])  # half a file, then the failure
        raise exc
    return save


FAILURES = {
    "disk-full": ("save", _fail_mid_write(OSError(errno.ENOSPC, "No space left on device"))),
    "rename-fails": ("replace", OSError(errno.EXDEV, "Invalid cross-device link")),
    "fsync-fails": ("fsync", OSError(errno.EIO, "Input/output error")),
}


@pytest.mark.parametrize("what", FAILURES)
def test_a_failed_write_leaves_the_old_file_and_no_temporary(what, step, tmp_path, monkeypatch):
    path = tmp_path / "step.onnx"
    path.write_bytes(b"the previous export")
    where, failure = FAILURES[what]
    if where == "save":
        monkeypatch.setattr(onnx, "save", failure)
    else:
        def fail(*args, **kwargs):
            raise failure
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(mpcompile.ExportError, match="nothing was changed") as e:
        mpcompile.export_onnx(step, path)
    assert str(path) in str(e.value)
    assert path.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["step.onnx"]


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(step, tmp_path, monkeypatch):
    path = tmp_path / "step.onnx"
    path.write_bytes(b"the previous export")
    monkeypatch.setattr(onnx, "save", _fail_mid_write(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # not an error to reword: it goes through as it is
        mpcompile.export_onnx(step, path)
    assert path.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["step.onnx"]


# --- OrtTrainer: a file it cannot use ------------------------------------------------------------


def _bad_file(exported: Path, tmp_path: Path, kind: str) -> Path:
    data = exported.read_bytes()
    path = tmp_path / f"{kind}.onnx"
    path.write_bytes({"truncated": data[: len(data) // 2], "text": b"not an onnx model\n",
                      "empty": b""}[kind])
    return path


@pytest.mark.parametrize("kind,reason", [("truncated", "truncated or not an ONNX file"),
                                         ("text", "truncated or not an ONNX file"),
                                         ("empty", "not a training step")])
def test_trainer_on_a_file_that_is_not_a_train_step_names_it(kind, reason, exported, tmp_path):
    path = _bad_file(exported, tmp_path, kind)
    with pytest.raises(mpcompile.ExportError, match=reason) as e:
        mpcompile.OrtTrainer(path)
    assert str(path) in str(e.value)


def test_trainer_on_a_missing_file_or_a_folder_names_it(tmp_path):
    with pytest.raises(mpcompile.ExportError, match="does not exist") as e:
        mpcompile.OrtTrainer(tmp_path / "none.onnx")
    assert str(tmp_path / "none.onnx") in str(e.value)
    with pytest.raises(mpcompile.ExportError, match="is a directory"):
        mpcompile.OrtTrainer(tmp_path)


def test_trainer_on_a_forward_model_says_so(tmp_path):
    (x,), _ = batch(EX)
    path = mpcompile.export_onnx(mpcompile.convert(EX.build(), x,
                                                   backend="eager"), tmp_path / "forward.onnx")
    with pytest.raises(mpcompile.ExportError, match="forward model") as e:
        mpcompile.OrtTrainer(path)
    assert str(path) in str(e.value)


# --- OrtTrainer.step: a batch that does not fit --------------------------------------------------


@pytest.fixture
def trainer(exported):
    return mpcompile.OrtTrainer(exported)


(X,), Y = batch(EX)
BAD_BATCHES = {
    "input-shape": (((X[:4],), Y), ["'input0'", "float32[16, 32]", "got float32[4, 32]"]),
    "input-rank": (((X[0],), Y), ["'input0'", "float32[16, 32]", "got float32[32]"]),
    "input-dtype": (((X.double(),), Y), ["'input0'", "float32[16, 32]", "got float64[16, 32]"]),
    "target-dtype": (((X,), Y.int()), ["'target0'", "int64[16]", "got int32[16]"]),
    "target-not-a-tensor": (((X,), "labels"), ["'target0'", "int64[16]", "got str"]),
    "no-targets": (((X,), None), ["expected 2 batch tensors", "input0 float32[16, 32]",
                                  "target0 int64[16]", "got 1"]),
    "one-too-many": (((X, X), Y), ["expected 2 batch tensors", "got 3"]),
}


@pytest.mark.parametrize("name", BAD_BATCHES)
def test_step_with_a_wrong_batch_names_the_input_before_onnxruntime_runs(name, trainer):
    (inputs, targets), parts = BAD_BATCHES[name]
    before = trainer.state_dict()
    session, trainer.session = trainer.session, None  # onnxruntime must not be reached
    with pytest.raises(mpcompile.ExportError) as e:
        trainer.step(inputs, targets)
    for part in parts:
        assert part in str(e.value), str(e.value)
    trainer.session = session
    assert all(torch.equal(v, before[k]) for k, v in trainer.state_dict().items())
    assert trainer.step((X,), Y).loss > 0  # and the trainer still works
