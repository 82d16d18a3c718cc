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
