import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpcompile.cli import main
from mpcompile.examples import batch


def test_demo_runs_and_trains(capsys):
    assert main(["demo", "--model", "mlp", "--steps", "8", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "Converted 5/5 op nodes to bfloat16" in out
    assert "torch.autocast" in out and "why:" in out
    assert "compile_train_step: one graph of" in out and "training graph, nodes by phase" in out


def test_demo_writes_dot(tmp_path, capsys):
    path = tmp_path / "g.dot"
    assert main(["demo", "--model", "cnn", "--steps", "0", "--dot", str(path)]) == 0
    assert path.read_text().startswith('digraph "CNN"')


def test_policy_table(capsys):
    assert main(["policy"]) == 0
    out = capsys.readouterr().out
    assert "aten.mm.default" in out and "LOWER" in out


SCRIPT = Path(sys.executable).parent / "mpcompile"


@pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed")
def test_console_script():
    r = subprocess.run([str(SCRIPT), "policy"], capture_output=True, text=True, check=True)
    assert "aten.addmm.default" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mpcompile.cli", "--help"], capture_output=True,
                       text=True, check=True)
    assert "demo" in r.stdout


# --- user errors: one line on stderr, a non-zero exit, no traceback ---------------------------


def _cmd(*args: str, code: str | None = None) -> list[str]:
    """``python -m mpcompile.cli ARGS``; with ``code``, that Python runs first (to patch)."""
    if code is None:
        return [sys.executable, "-m", "mpcompile.cli", *args]
    run = f"from mpcompile.cli import main\nsys.exit(main({list(args)!r}))"
    return [sys.executable, "-c", f"import sys\n{code}\n{run}"]


def _run_all(cmds: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands at once (each spends seconds importing torch), then collect them."""
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in cmds.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def _one_line_error(r: subprocess.CompletedProcess, code: int, *reason: str) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mpcompile: error: "), lines[0]
    assert "Traceback" not in r.stderr
    for part in reason:
        assert part in lines[0], lines[0]
    return lines[0]


# name -> (demo arguments, what the one line must say); {tmp} is an empty folder of the test's
BAD_ARGS = {
    "negative-steps": (["--steps", "-3"], ["--steps", "-3"]),
    "nan-lr": (["--lr", "nan"], ["--lr", "nan"]),
    "inf-lr": (["--lr", "inf"], ["--lr", "inf"]),
    "negative-lr": (["--lr", "-0.5"], ["--lr", "-0.5"]),
    "zero-lr": (["--lr", "0"], ["--lr", "positive"]),
    "dot-missing-folder": (["--dot", "{tmp}/missing/g.dot"],
                           ["--dot", "{tmp}/missing/g.dot", "does not exist"]),
    "dot-is-a-directory": (["--dot", "{tmp}"], ["--dot", "{tmp}", "is a directory"]),
}
if Path("/proc/self").is_dir():  # Linux: no file can be created in /proc, not even by root
    BAD_ARGS["dot-in-proc"] = (["--dot", "/proc/x.dot"], ["--dot", "/proc/x.dot", "cannot write"])


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    tmp = {k: tmp_path_factory.mktemp(k) for k in BAD_ARGS}
    cmds = {k: _cmd("demo", "--model", "mlp", *(a.format(tmp=tmp[k]) for a in args))
            for k, (args, _) in BAD_ARGS.items()}
    return tmp, _run_all(cmds)


@pytest.mark.parametrize("name", BAD_ARGS)
def test_bad_demo_args_are_one_line_and_exit_2_before_the_demo_runs(name, bad_runs):
    tmp, runs = bad_runs
    reason = [x.format(tmp=tmp[name]) for x in BAD_ARGS[name][1]]
    _one_line_error(runs[name], 2, *reason)
    assert runs[name].stdout == ""  # rejected up front: nothing converted, nothing trained
    assert list(tmp[name].iterdir()) == []  # no folder made, no file left by the --dot probe


def test_argparse_usage_errors_are_unchanged():
    r = subprocess.run(_cmd("demo", "--steps", "abc"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    assert r.stderr.startswith("usage: mpcompile demo") and "invalid int value: 'abc'" in r.stderr
    assert "Traceback" not in r.stderr


# the demo's convert() raising: an mpcompile error with a two-line message, or an OSError
FAIL_CONVERT = """
import mpcompile.cli
def fail(*a, **k):
    raise {exc}
mpcompile.cli.convert = fail
"""
CAPTURE = FAIL_CONVERT.format(
    exc='__import__("mpcompile").CaptureError("could not capture MLP: a reason\\n(detail)")')
NO_SPACE = FAIL_CONVERT.format(exc='OSError(28, "No space left on device")')


def test_errors_during_a_run_are_one_line_and_exit_1_and_debug_shows_the_traceback(tmp_path):
    demo = ["demo", "--model", "mlp", "--steps", "0"]
    dot = tmp_path / "g.dot"
    runs = _run_all({
        "capture": _cmd(*demo, "--dot", str(dot), code=CAPTURE),
        "oserror": _cmd(*demo, code=NO_SPACE),
        "debug-before": _cmd("--debug", *demo, code=CAPTURE),
        "debug-after": _cmd(*demo, "--debug", code=CAPTURE),
    })
    _one_line_error(runs["capture"], 1, "could not capture MLP: a reason (detail)")
    assert not dot.exists()  # the up-front check of --dot leaves no file behind
    _one_line_error(runs["oserror"], 1, "No space left on device")
    for key in ("debug-before", "debug-after"):
        r = runs[key]
        assert r.returncode == 1, key
        assert "Traceback" in r.stderr and "CaptureError: could not capture MLP" in r.stderr, key


# --- the commands on a TARGET: inspect, export, profile, reproduce; the digits demo -----------

TINYMODELS = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python branch: torch.export cannot capture it
            return self.fc(x)
        return -self.fc(x)


def uncapturable():
    torch.manual_seed(0)
    return Branchy(), torch.randn(4, 8)


def classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g), \\
        F.cross_entropy


def targets_without_loss():
    model, x, y, _ = classifier()
    return model, x, y


def logits_only():
    model, x, _, _ = classifier()
    return model, x


class Boom(nn.Module):
    def forward(self, x):
        y = x * 100.0
        return y * y  # past FP16's 65504 once |x| > 2.56


def planted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Boom(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(32, 8, generator=g) * 100, torch.randint(0, 4, (32,), generator=g), \
        F.cross_entropy


def broken():
    raise ValueError("no weights file")


def not_a_tuple():
    return nn.Linear(2, 2)
'''


@pytest.fixture(scope="module")
def tmod(tmp_path_factory):
    """A folder on PYTHONPATH holding tinymodels.py and policy files."""
    d = tmp_path_factory.mktemp("targets")
    (d / "tinymodels.py").write_text(TINYMODELS)
    (d / "bf16_fp32_addmm.toml").write_text('dtype = "bf16"\nfp32 = ["aten.addmm"]\n')
    (d / "unknown_field.toml").write_text('dtype = "bf16"\nbogus_field = 1\n')
    (d / "broken.json").write_text('{"dtype": ')
    (d / "fp16.json").write_text('{"dtype": "float16"}')
    return d


def _env(tmod) -> dict:
    import os
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmod), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _run_env(cmds: dict[str, list[str]], env: dict) -> dict[str, subprocess.CompletedProcess]:
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env) for k, c in cmds.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def runs(tmod):
    """Every subprocess of the tests below, started at once (each spends seconds importing
    torch)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    t = str(tmod)
    cmds = {
        "inspect": _cmd("inspect", "tinymodels:classifier", "--policy",
                        f"{t}/bf16_fp32_addmm.toml", "--dot", f"{t}/g.dot"),
        "export": _cmd("export", "mlp", "-o", f"{t}/mlp.onnx"),
        "export-train": _cmd("export", "tinymodels:classifier", "-o", f"{t}/step.onnx",
                             "--train"),
        "profile": _cmd("profile", "tinymodels:classifier", "--steps", "2", "--scale", "1",
                        "1024", "--png", f"{t}/hist.png"),
        "reproduce": _cmd("reproduce", "d", "--tiny", "--out", f"{t}/rep"),
        "demo": _cmd("demo", "--epochs", "1", "--out", f"{t}/demo"),
        "localize-planted": _cmd("localize", "tinymodels:planted", "--scale", "1"),
        "localize-clean": _cmd("localize", "tinymodels:classifier"),
        "localize-bad-scale": _cmd("localize", "mlp", "--scale", "-1"),
        # errors
        "target-no-module": _cmd("inspect", "no_such_module_xyz:build"),
        "target-no-function": _cmd("export", "tinymodels:nope", "-o", f"{t}/nope.onnx"),
        "bad-policy": _cmd("inspect", "mlp", "--policy", f"{t}/unknown_field.toml"),
        "uncapturable": _cmd("inspect", "tinymodels:uncapturable"),
        "uncapturable-export": _cmd("export", "tinymodels:uncapturable", "-o",
                                    f"{t}/u.onnx"),
    }
    return tmod, _run_env(cmds, _env(tmod))


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    return r.stdout


def _report_row(out: str, op: str) -> dict[str, str]:
    """The report's per-op row of ``op`` as {column header: cell}."""
    lines = out.splitlines()
    head = next(ln for ln in lines if re.match(r"op {10,}", ln))
    row = next(ln for ln in lines if ln.startswith(op + " "))
    return dict(zip(head.split()[1:], row.split()[1:]))


def test_inspect_reads_the_policy_file_and_writes_the_dot(runs):
    tmod, r = runs
    out = _ok(r["inspect"])
    assert "in bfloat16" in out and "why:" in out
    # the file's fp32 = ["aten.addmm"]: both linears' addmm run in FP32, none in bfloat16
    assert _report_row(out, "aten.addmm.default") == {"bfloat16": "-", "float32": "2",
                                                       "no": "-"}
    assert (tmod / "g.dot").read_text().startswith("digraph")


def test_export_forward_runs_in_onnxruntime_close_to_fp32(runs):
    import onnxruntime as ort

    from mpcompile.examples import EXAMPLES
    tmod, r = runs
    assert "written to" in _ok(r["export"])
    ex = EXAMPLES["mlp"]
    (x,), _ = batch(ex)
    sess = ort.InferenceSession(str(tmod / "mlp.onnx"))
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    ref = ex.build().eval()(x).detach()
    rel = (torch.tensor(got).float() - ref).norm() / ref.norm()
    # FP16 rounding is visible (not an FP32 graph) and bounded (unit roundoff 2^-11 ~ 5e-4)
    assert 1e-5 < rel < 4e-3, rel


def test_export_train_step_computes_the_fp32_loss_in_onnxruntime(runs):
    import onnxruntime as ort
    tmod, r = runs
    assert "training step" in _ok(r["export-train"])
    sys.path.insert(0, str(tmod))
    try:
        import tinymodels
    finally:
        sys.path.remove(str(tmod))
    model, x, y, loss_fn = tinymodels.classifier()
    sess = ort.InferenceSession(str(tmod / "step.onnx"))
    assert {i.name for i in sess.get_inputs()} == {"input0", "target0"}  # state: defaults
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {"input0": x.numpy(), "target0": y.numpy()})))
    ref = loss_fn(model(x), y).item()  # the FP32 loss of the same weights and batch
    assert abs(float(outs["loss"]) - ref) < 1e-2 * ref
    assert not bool(outs["skipped"]) and float(outs["loss_scale"]) == 65536.0
    assert "next.master.0.weight" in names


def test_profile_prints_the_table_and_writes_the_png(runs):
    tmod, r = runs
    out = _ok(r["profile"])
    rows = {}
    for ln in out.splitlines():
        parts = ln.split()
        if len(parts) >= 6 and parts[0] in ("activation_grad", "weight_grad"):
            rows[(parts[0], parts[1])] = float(parts[5].rstrip("%"))
    # both scales reported; scaling by 2^10 cannot flush more (no gradient is near 65504/2^10)
    for kind in ("activation_grad", "weight_grad"):
        assert rows[(kind, "2^10")] <= rows[(kind, "1")]
    assert (tmod / "hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reproduce_writes_its_table(runs):
    tmod, r = runs
    out = _ok(r["reproduce"])
    assert "d.md" in out
    assert "|" in (tmod / "rep" / "d.md").read_text()


ACC = re.compile(r"^\s*(float32|float16|bfloat16)\s+test accuracy\s+([\d.]+) % \(in \1:\s+"
                 r"([\d.]+) %\)", re.M)


def test_shortened_demo_writes_its_files_and_exits_by_accuracy(runs):
    import onnx
    tmod, r = runs
    assert r["demo"].returncode in (0, 1), r["demo"].stderr[-3000:]
    acc = {m[1]: (float(m[2]), float(m[3])) for m in ACC.finditer(r["demo"].stdout)}
    assert set(acc) == {"float32", "float16", "bfloat16"}, r["demo"].stdout
    assert all(10 < a <= 100 and 10 < b <= 100 for a, b in acc.values())  # it learned
    fp32 = acc["float32"][0]
    regressed = any(a < fp32 - 1.0 for k in ("float16", "bfloat16") for a in acc[k])
    assert r["demo"].returncode == (1 if regressed else 0)
    out = tmod / "demo"
    for name in ("digits-float16.onnx", "digits-bfloat16.onnx",
                 "digits-float16-train-step.onnx"):
        onnx.checker.check_model(onnx.load(str(out / name)))
    for name in ("loss-curves.png", "gradient-histogram.png", "graph-float16.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "graph-float16.dot").read_text().startswith('digraph "DigitsCNN"')
    assert "training graph, nodes by phase" in r["demo"].stdout  # the step's report


@pytest.mark.parametrize("name,code,reason", [
    ("target-no-module", 2, ["no_such_module_xyz", "cannot import", "PYTHONPATH"]),
    ("target-no-function", 2, ["'tinymodels:nope'", "no attribute 'nope'"]),
    ("bad-policy", 2, ["unknown_field.toml", "'bogus_field'", "keep_fp32_modules"]),
    ("uncapturable", 1, ["could not capture Branchy", "data-dependent"]),
    ("uncapturable-export", 1, ["could not capture Branchy"]),
])
def test_target_errors_are_one_line(runs, name, code, reason):
    tmod, r = runs
    _one_line_error(r[name], code, *reason)
    assert not (tmod / "nope.onnx").exists() and not (tmod / "u.onnx").exists()


# in-process: the rest of the argument checks (exit 2 before anything runs)
IN_PROCESS = {
    "policy-not-json": (["inspect", "mlp", "--policy", "{t}/broken.json"],
                        ["broken.json", "not valid JSON"]),
    "policy-missing": (["inspect", "mlp", "--policy", "{t}/none.toml"],
                       ["none.toml", "cannot read"]),
    "policy-vs-dtype": (["inspect", "mlp", "--policy", "{t}/fp16.json", "--dtype", "bf16"],
                        ["--dtype bf16 conflicts", "float16"]),
    "builtin-unknown": (["inspect", "resnet"], ["'resnet' is not a built-in example", "mlp"]),
    "target-raises": (["inspect", "tinymodels:broken"],
                      ["calling broken() raised ValueError: no weights file"]),
    "target-not-tuple": (["profile", "tinymodels:not_a_tuple"],
                         ["returned a Linear", "(model, example_inputs"]),
    "train-no-loss-fn": (["export", "tinymodels:targets_without_loss", "-o", "{t}/x.onnx",
                          "--train"], ["no loss_fn"]),
    "export-no-folder": (["export", "mlp", "-o", "{t}/missing/x.onnx"],
                         ["--output", "does not exist"]),
    "profile-scale": (["profile", "mlp", "--scale", "3"], ["--scale 3", "power of two"]),
    "profile-steps": (["profile", "mlp", "--steps", "0"], ["--steps", "positive"]),
    "demo-epochs": (["demo", "--epochs", "0"], ["--epochs", "positive"]),
    "demo-out-is-file": (["demo", "--out", "{t}/tinymodels.py"], ["--out", "is a file"]),
    "demo-dtype-without-model": (["demo", "--dtype", "bf16"], ["--dtype", "--model"]),
    "demo-epochs-with-model": (["demo", "--model", "mlp", "--epochs", "2"],
                               ["--epochs", "without --model"]),
    "reproduce-out-is-file": (["reproduce", "d", "--out", "{t}/tinymodels.py"],
                              ["--out", "is a file"]),
}


@pytest.mark.parametrize("name", IN_PROCESS)
def test_bad_arguments_exit_2_with_one_line(name, tmod, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmod))
    argv, reason = IN_PROCESS[name]
    before = sorted(p.name for p in tmod.iterdir())
    assert main([a.format(t=tmod) for a in argv]) == 2
    err = capsys.readouterr()
    lines = err.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpcompile: error: "), err.err
    for part in reason:
        assert part in lines[0], lines[0]
    assert err.out == ""
    assert sorted(p.name for p in tmod.iterdir()) == before  # nothing written


def test_train_export_of_a_model_without_loss_says_where_the_loss_came_from(tmod, monkeypatch,
                                                                           capsys):
    monkeypatch.syspath_prepend(str(tmod))
    assert main(["export", "tinymodels:logits_only", "-o", str(tmod / "l.onnx"),
                 "--train"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert "gave no loss_fn, so the model's output is taken as the loss" in line
    assert "scalar" in line and not (tmod / "l.onnx").exists()


def test_demo_without_its_extra_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "sklearn" in line and "pip install 'mpcompile[demo]'" in line
    assert not (tmp_path / "d").exists()


def test_localize_names_the_planted_node_and_exits_3(runs):
    _, r = runs
    bad = r["localize-planted"]
    assert bad.returncode == 3, (bad.returncode, bad.stderr[-2000:])
    # the planted module is the Sequential's child "1"; the op is its second multiply
    assert "first non-finite value" in bad.stdout and "aten.mul.Tensor" in bad.stdout
    assert "module `1`" in bad.stdout and "y * y" in bad.stdout, bad.stdout
    clean = r["localize-clean"]
    assert clean.returncode == 0 and "no node produced inf or NaN" in clean.stdout, clean.stderr
    _one_line_error(r["localize-bad-scale"], 2, "--scale")
