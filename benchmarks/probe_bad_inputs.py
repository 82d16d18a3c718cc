"""Bad and odd inputs, tried as a careless or hostile user would: does each get a clear
mpcompile error (or a correct result), never a raw traceback or a silently wrong answer?

    python benchmarks/probe_bad_inputs.py

Each probe returns "fine" (worked, and the result was checked) or raises. A raised
``MPCompileError`` whose message names something is "clear"; argparse/CLI probes check for one
line and a non-zero exit; anything else is a "raw traceback". A probe that finishes without error
but whose check fails is "silently wrong". Prints the table and the totals.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import mpcompile
from mpcompile import MPCompileError, Policy
from mpcompile.examples import EXAMPLES, batch

MLP, CNN = EXAMPLES["mlp"], EXAMPLES["cnn"]
X, Y = batch(MLP)
TMP = Path(tempfile.mkdtemp())


class Wrong(Exception):
    """The call returned, but the result is wrong."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Wrong(what)


def step(model=None, **kw):
    model = model or MLP.build()
    opt = kw.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1)
    return mpcompile.compile_train_step(model, kw.pop("loss_fn", MLP.loss), X, Y, optimizer=opt,
                                        **kw)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class Mutates(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x.add_(1)
        return self.fc(x)


class ReturnsSet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return {self.fc(x).sum().item()}


class Cfg:
    scale = 2.0


class TakesCfg(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 10)

    def forward(self, x, cfg=None):
        return self.fc(x) * (cfg.scale if cfg else 1.0)


def _mp():
    return mpcompile.convert(MLP.build(), X)


def _truncated_ckpt():
    s = step()
    path = TMP / "ck.pt"
    s.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    s.load(path)


def _flipped_ckpt():
    s = step()
    path = TMP / "ck2.pt"
    s.save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    s.load(path)


def _nan_master():
    s = step()
    sd = s.state_dict()
    sd["master.fc1.weight"] = sd["master.fc1.weight"] * float("nan")
    s.load_state_dict(sd)


def _zero_scale():
    s = step()
    sd = s.state_dict()
    sd["scale"] = torch.tensor(0.0)
    s.load_state_dict(sd)


def _nan_batches_floor():
    s = step()
    bad = (X[0] * float("nan"),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(150):
            r = s(bad, Y)
    check(r.loss_scale.item() == 1.0, "scale left its floor")
    check(not bool(s(X, Y).skipped), "a clean batch after 150 bad ones is skipped")


def _frozen():
    m = MLP.build()
    m.fc1.weight.requires_grad_(False)
    s = step(m)
    s(X, Y)
    check(torch.equal(s.value("master.fc1.weight"), MLP.build().fc1.weight), "frozen trained")


def _adam_decoupled():
    m = MLP.build()
    s = step(m, optimizer=torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.1,
                                            decoupled_weight_decay=True))
    check(type(s.plan.groups[0]).__name__ == "AdamW", "decoupled flag ignored")


def _opt_lr_inf():
    m = MLP.build()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    s = step(m, optimizer=opt)
    opt.param_groups[0]["lr"] = float("inf")
    s(X, Y)


def _mutable_cfg():
    mp = mpcompile.convert(TakesCfg())
    mp(X[0], Cfg())


def _threads():
    import threading

    model = MLP.build().eval()
    mp = mpcompile.convert(model)
    ref = MLP.build().eval()
    bad = []

    def work(seed):
        for i in range(3):
            x = torch.randn(1 + (seed + i) % 5, 32)
            with torch.no_grad():
                if (mp(x) - ref(x)).abs().max() > 1e-2:
                    bad.append(seed)

    ts = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    check(not bad and all(type(p.data) is torch.Tensor for p in model.parameters()),
          "threads corrupted results or weights")


def _export(path):
    mpcompile.export_onnx(_mp(), path)


def _ort(path_bytes: bytes):
    path = TMP / "bad.onnx"
    path.write_bytes(path_bytes)
    mpcompile.OrtTrainer(path)


def _ort_wrong_shape():
    trainer = mpcompile.OrtTrainer(mpcompile.export_onnx(step()))
    trainer.step(torch.randn(3, 32), Y)


def _cache_world_writable():
    from mpcompile.codegen.render import render_source
    from mpcompile.codegen.spec import Epilogue, KernelSpec, Kind, Tile
    from mpcompile.runtime.nvrtc import compile_cubin

    folder = TMP / "cache"
    folder.mkdir(mode=0o777, exist_ok=True)
    os.chmod(folder, 0o777)
    os.environ["MPCOMPILE_CACHE"] = str(folder)
    try:
        spec = KernelSpec(Kind.GEMM, "float16", 32, 32, 32, tile=Tile(32, 32, 16, 1, 2, 2),
                          epilogue=Epilogue((), "float32"), lda=32, ldb=32, ldc=32)
        compile_cubin(render_source(spec), spec.name, "sm_80")
    finally:
        del os.environ["MPCOMPILE_CACHE"]


def _cli(*args) -> None:
    out = subprocess.run([sys.executable, "-m", "mpcompile.cli", *args], capture_output=True,
                         text=True, timeout=300)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    if out.returncode == 0:
        raise Wrong(f"exit 0 for {args}")
    if "Traceback" in out.stderr:
        raise RuntimeError(f"traceback for {args}: {lines[-1] if lines else ''}")
    if len(lines) != 1 and not any(ln.startswith("usage:") for ln in lines):
        raise RuntimeError(f"{len(lines)} lines for {args}")
    raise MPCompileError(lines[-1])  # one clear line: counted as clear


PROBES = {
    # convert
    "convert(a function)": lambda: mpcompile.convert(lambda x: x),
    "convert twice": lambda: mpcompile.convert(_mp()),
    "Policy(dtype=int8)": lambda: Policy(dtype=torch.int8),
    "Policy(strategy='x')": lambda: Policy(strategy="x"),
    "Policy(kernels='x')": lambda: Policy(kernels="x"),
    "Policy(fp32=['mm']) string": lambda: Policy(fp32=["mm"]),
    "Policy(lower=[torch.relu]) not aten": lambda: Policy(lower=[torch.relu]),
    "keep_fp32_modules no match": lambda: mpcompile.convert(
        MLP.build(), X, policy=Policy(keep_fp32_modules=["nope"])),
    "keep_fp32_modules bad regex": lambda: Policy(keep_fp32_modules=["("]),
    "dtype conflicts with policy": lambda: mpcompile.convert(
        MLP.build(), X, dtype=torch.bfloat16, policy=Policy()),
    "data-dependent branch": lambda: mpcompile.convert(Branchy(), X),
    "forward mutates its input": lambda: mpcompile.convert(Mutates(), X),
    "output is a set": lambda: mpcompile.convert(ReturnsSet(), X),
    "BatchNorm1d batch of 1": lambda: mpcompile.convert(
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train(), torch.randn(1, 4)),
    "float64 input to a float32 capture": lambda: _mp()(X[0].double()),
    "int input to a float model": lambda: _mp()(X[0].long()),
    "bool input to a float model": lambda: _mp()(X[0] > 0),
    "mutable object as an argument": _mutable_cfg,
    "recapture=False, new shape": lambda: mpcompile.convert(
        MLP.build(), X, recapture=False)(torch.randn(3, 32)),
    "explain(unknown node)": lambda: _mp().explain("nope"),
    "wrong number of inputs": lambda: _mp()(X[0], X[0]),
    "threads recapturing one module": _threads,
    # training step
    "unsupported optimizer (RMSprop)": lambda: step(
        optimizer=torch.optim.RMSprop(MLP.build().parameters())),
    "SGD(maximize=True)": lambda: step(optimizer=torch.optim.SGD(
        MLP.build().parameters(), lr=0.1, maximize=True)),
    "Adam(amsgrad=True)": lambda: step(optimizer=torch.optim.Adam(
        MLP.build().parameters(), amsgrad=True)),
    "Adam(fused=True)": lambda: step(optimizer=torch.optim.Adam(
        MLP.build().parameters(), fused=True)),
    "Adam(decoupled_weight_decay=True)": _adam_decoupled,
    "frozen parameter in the optimizer": _frozen,
    "optimizer on other parameters": lambda: step(
        optimizer=torch.optim.SGD(MLP.build().parameters(), lr=0.1)),
    "loss_fn returns a vector": lambda: step(loss_fn=lambda o, y: o.sum(0)),
    "loss_fn not callable": lambda: step(loss_fn=3),
    "max_grad_norm=-1": lambda: step(max_grad_norm=-1.0),
    "loss_scale=1e40": lambda: step(loss_scale=1e40),
    "loss_scale='weird'": lambda: step(loss_scale="weird"),
    "DynamicLossScale(init_scale=1e39)": lambda: mpcompile.DynamicLossScale(init_scale=1e39),
    "DynamicLossScale(growth_factor=0.5)": lambda: mpcompile.DynamicLossScale(growth_factor=0.5),
    "150 NaN batches": _nan_batches_floor,
    "set_lr(nan)": lambda: step().set_lr(float("nan")),
    "set_lr(-1)": lambda: step().set_lr(-1.0),
    "optimizer lr inf (scheduler)": _opt_lr_inf,
    "batch of another shape": lambda: step()((torch.randn(3, 32),), Y),
    "float64 batch": lambda: step()((X[0].double(),), Y),
    "load_state_dict NaN master": _nan_master,
    "load_state_dict scale 0": _zero_scale,
    "load_state_dict missing key": lambda: step().load_state_dict({}),
    "load truncated checkpoint": _truncated_ckpt,
    "load flipped-byte checkpoint": _flipped_ckpt,
    "load missing checkpoint": lambda: step().load(TMP / "missing.pt"),
    "targets without loss_fn": lambda: mpcompile.compile_train_step(
        MLP.build(), None, X, Y, optimizer=mpcompile.optim.SGD()),
    "no example inputs": lambda: mpcompile.compile_train_step(
        MLP.build(), MLP.loss, optimizer=mpcompile.optim.SGD()),
    # export
    "export_onnx(a model)": lambda: mpcompile.export_onnx(MLP.build()),
    "export_onnx to a missing folder": lambda: _export(TMP / "no" / "m.onnx"),
    "export_onnx to a directory": lambda: _export(TMP),
    "OrtTrainer on a truncated file": lambda: _ort(
        mpcompile.export_onnx(step()).SerializeToString()[:100]),
    "OrtTrainer on a text file": lambda: _ort(b"hello"),
    "OrtTrainer batch of another shape": _ort_wrong_shape,
    "export an op without translation": lambda: mpcompile.export_graph(
        torch.fx.symbolic_trace(_Cummax()), [torch.randn(4, 3)]),
    # kernel cache
    "world-writable kernel cache": _cache_world_writable,
    # CLI
    "cli --steps -3": lambda: _cli("demo", "--steps", "-3"),
    "cli --lr nan": lambda: _cli("demo", "--lr", "nan"),
    "cli --dot to a missing folder": lambda: _cli("demo", "--dot", str(TMP / "no" / "g.dot")),
    "cli --model nope": lambda: _cli("demo", "--model", "nope"),
    "cli unknown command": lambda: _cli("frobnicate"),
}


class _Cummax(nn.Module):
    def forward(self, x):
        return torch.cummax(x, 0)[0]


def classify(fn) -> tuple[str, str]:
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except MPCompileError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return ("clear error" if len(msg) > 20 else "raw traceback"), msg[:110]
    except Wrong as e:
        return "silently wrong", str(e)
    except Exception as e:  # noqa: BLE001 - what we are counting
        first = str(e).splitlines()[0][:100] if str(e) else ""
        return "raw traceback", f"{type(e).__name__}: {first}"
    return "fine", ""


def main() -> None:
    counts: dict[str, int] = {}
    print("| probe | outcome | message |\n|---|---|---|")
    for name, fn in PROBES.items():
        kind, msg = classify(fn)
        counts[kind] = counts.get(kind, 0) + 1
        print(f"| {name} | {kind} | {msg.replace('|', '/')} |", flush=True)
    total = sum(counts.values())
    print(f"\n{total} probes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
