import subprocess
import sys
from pathlib import Path

import pytest

from mpcompile.cli import main


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
