"""The ``mpcompile`` command.

    mpcompile demo                        train a CNN on scikit-learn's digits in FP32, FP16, BF16
    mpcompile inspect TARGET              convert; the report and why each op runs as it does
    mpcompile export TARGET -o F.onnx     the mixed-precision forward (or --train: the step)
    mpcompile profile TARGET              FP32 histograms: what FP16/BF16 would flush/overflow
    mpcompile localize TARGET             the first node of the step that produces inf/NaN
    mpcompile reproduce [a|b|c|d|all]     the paper's claims in miniature
    mpcompile policy                      the op policy table

TARGET is a built-in example (``mpcompile.examples.EXAMPLES``) or ``package.module:function``
(see :mod:`mpcompile.targets`). A user error is one line on stderr, ``mpcompile: error: ...``,
and a non-zero exit: 2 for unusable arguments (checked before anything runs: options, TARGET,
policy file, output paths; argparse's own usage errors are unchanged), 1 for an mpcompile error
or an unwritable file during a run (a model that cannot be captured, a failed export), and 1
when the demo's mixed-precision accuracy falls more than 1 point below FP32. ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .api import convert
from .dtypes import dtype_name, from_name, unit_roundoff
from .errors import MPCompileError, PolicyError, TrainStepError
from .examples import EXAMPLES, batch, eager_step
from .fxutil import is_cast
from .policy import OpClass, Policy, table_rows
from .records import MP
from .targets import TargetError, load_policy, resolve
from .train import compile_train_step

DTYPES = ["float16", "fp16", "bfloat16", "bf16"]
ACCURACY_SLACK = 1.0  # the demo fails when mixed precision is this many points below FP32


# -- the per-model demo (demo --model NAME) ----------------------------------------------------


def train_compiled(example, steps: int, lr: float, dtype: torch.dtype):
    """The whole step as one graph: compile_train_step (FP32 masters, in-graph loss scaling)."""
    model = example.build().train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = batch(example, seed=0)
    t0 = time.perf_counter()
    step = compile_train_step(model, example.loss, x, y, optimizer=opt, dtype=dtype)
    compile_s = time.perf_counter() - t0
    results = [step.step(x, y) for _ in range(steps)]
    return step, [r.loss.item() for r in results], sum(r.skipped.item() for r in results), \
        compile_s


def train_autocast(example, steps: int, lr: float, dtype: torch.dtype) -> list[float]:
    """What users do today: torch.autocast + torch.amp.GradScaler + torch.optim.SGD."""
    model = example.build().train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype is torch.float16)
    x, y = batch(example, seed=0)
    return [eager_step(model, opt, scaler, example.loss, x, y, autocast=dtype)[0].item()
            for _ in range(steps)]


def print_conversion(mp, model: torch.nn.Module, inputs: tuple, dtype: torch.dtype) -> None:
    """The converted model's error against FP32, its report and, for one op of each class, why
    it runs in its precision (``mp.explain``)."""
    model.eval()
    mp.eval()
    with torch.no_grad():
        ref = _first_tensor(model(*inputs))
        out = _first_tensor(mp(*inputs))
    if ref is not None and out is not None and ref.is_floating_point():
        ref, out = ref.float(), out.float()
        rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        print(f"output vs the FP32 model: relative error {rel:.2e} (unit roundoff of "
              f"{dtype_name(dtype)}: {unit_roundoff(dtype):.1e}); output dtype {out.dtype}\n")
    mp.train()
    print(mp.report())
    print("\n== why each op runs in its precision (mp.explain):\n")
    shown = set()
    for n in mp.graph_module.graph.nodes:
        rec = n.meta.get(MP)
        if rec is None or n.op != "call_function":
            continue
        kind = "cast" if is_cast(n) and rec.created_by == "casts" else rec.op_class
        if kind in shown or kind in (None, OpClass.PASSTHROUGH):
            continue
        shown.add(kind)
        print(mp.explain(n.name), "\n")


def _first_tensor(out):
    if isinstance(out, dict) and "logits" in out:
        out = out["logits"]
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return leaves[0] if leaves else None


def demo_example(args: argparse.Namespace) -> int:
    dtype = from_name(args.dtype or "float16")
    steps = 30 if args.steps is None else args.steps
    example = EXAMPLES[args.model]
    model = example.build()
    x, _ = batch(example)
    print(f"== mpcompile demo: {type(model).__name__} ({args.model}) in {dtype_name(dtype)}\n")
    t0 = time.perf_counter()
    mp = convert(model, x, dtype=dtype)
    print(f"converted in {time.perf_counter() - t0:.2f} s\n")
    print_conversion(mp, model, x, dtype)
    if args.dot:
        mp.to_dot(args.dot)
        print(f"graph coloured by precision written to {args.dot}\n")
    if steps:
        print(f"== training {steps} steps, SGD(momentum=0.9, lr={args.lr}), one batch\n")
        step, losses, skipped, compile_s = train_compiled(example, steps, args.lr, dtype)
        try:
            ref = train_autocast(example, steps, args.lr, dtype)
        except RuntimeError as e:
            ref = None
            print(f"torch.autocast fails on this model: {str(e).splitlines()[0][:100]}\n")
        print(f"compile_train_step: one graph of {len(step.graph_module.graph.nodes)} nodes, "
              f"traced in {compile_s:.2f} s, runs on {step.execution}; {skipped} step(s) "
              f"skipped on overflow, loss scale now {step.value('scale').item():g}")
        marks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4,
                        len(losses) - 1})
        print(f"  {'step':>6} {'mpcompile':>10}" + (f" {'autocast':>10}" if ref else ""))
        for i in marks:
            print(f"  {i + 1:>6} {losses[i]:>10.4f}" + (f" {ref[i]:>10.4f}" if ref else ""))
        print()
        print(step.report().training_text())
        if not losses[-1] < losses[0]:
            print("loss did not decrease", file=sys.stderr)
            return 1
    return 0


# -- the digits demo (demo with no --model) ----------------------------------------------------


def demo(args: argparse.Namespace) -> int:
    if args.model is not None:
        return demo_example(args)
    from . import digits

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    data = digits.load(args.seed)
    print(f"== mpcompile demo: a CNN on scikit-learn's handwritten digits ({len(data.y_train)} "
          f"train / {len(data.y_test)} test images, 8x8)\n   {args.epochs} epochs of "
          f"SGD(lr={args.lr}, momentum=0.9), batch 64, seed {args.seed}; the whole step "
          "compiled by compile_train_step in each precision (float16: FP32 master weights and "
          "dynamic loss scaling; bfloat16: master weights)\n")
    runs = [digits.train(data, dt, seed=args.seed, epochs=args.epochs, lr=args.lr,
                         progress=True) for dt in (torch.float32, torch.float16, torch.bfloat16)]
    print(f"\n== test accuracy ({len(data.y_test)} images): the trained FP32 master weights "
          "evaluated in FP32, and (in ...) the model converted to its training precision\n")
    for r in runs:
        name = dtype_name(r.dtype)
        print(f"  {name:<9} test accuracy {r.test_accuracy:6.2f} % (in {name}: "
              f"{r.test_accuracy_mp:6.2f} %)   final loss {r.losses[-1]:.4f}   skipped "
              f"{r.skips:>3} of {len(r.losses)} steps   loss scale {r.scales[-1]:g}   "
              f"train {r.train_seconds:.1f} s")
    fp16 = runs[1]
    print("\n== the FP16 training step (step.report()):\n")
    print(fp16.step.report())
    files = write_demo_files(out, data, runs, args.seed)
    print(f"\n== written to {out}/:")
    for f in files:
        print(f"  {f.name}")
    return accuracy_verdict(runs)


def accuracy_verdict(runs) -> int:
    """0 when every mixed-precision run's accuracies are within ACCURACY_SLACK points of FP32's
    (runs[0]); else the error line and 1."""
    base = runs[0].test_accuracy
    for r in runs[1:]:
        for what, acc in (("test accuracy", r.test_accuracy),
                          (f"accuracy in {dtype_name(r.dtype)}", r.test_accuracy_mp)):
            if acc < base - ACCURACY_SLACK:
                return _error(f"{dtype_name(r.dtype)} {what} {acc:.2f} % is {base - acc:.2f} "
                              f"points below float32's {base:.2f} % (the demo allows "
                              f"{ACCURACY_SLACK:g}): mixed precision regressed", 1)
    return 0


def write_demo_files(out: Path, data, runs, seed: int) -> list[Path]:
    """The demo's files: the FP16 graph (DOT, SVG when Graphviz is installed), ONNX of the
    FP16 and BF16 forwards and of the FP16 training step, the loss curves, the profiler's
    gradient histogram."""
    from . import digits
    from .export import export_onnx
    from .numerics import profile

    files = []
    for r in runs[1:]:
        mp = r.converted
        name = dtype_name(r.dtype)
        if r.dtype is torch.float16:
            mp.to_dot(out / "graph-float16.dot")
            files += [mp.to_png(out / "graph-float16.png")]
            files += [p for p in (out / "graph-float16.dot", out / "graph-float16.svg")
                      if p.exists()]
        files.append(export_onnx(mp, out / f"digits-{name}.onnx"))
    files.append(export_onnx(runs[1].step, out / "digits-float16-train-step.onnx"))
    files.append(plot_losses(runs, out / "loss-curves.png"))
    idx = digits.batch_order(len(data.y_train), 64, 1, seed)[0]
    prof = profile(runs[0].model, data.x_train[idx], data.y_train[idx], digits.loss_fn,
                   steps=3, loss_scales=(1.0, 2.0 ** 10, 2.0 ** 16))
    print("\n== the numerics profile of the trained FP32 model (3 steps on one batch):\n")
    print(prof.text(top=5))
    files.append(Path(prof.plot(out / "gradient-histogram.png")))
    return files


def plot_losses(runs, path: Path) -> Path:
    """One PNG: each run's training loss per step (log scale)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the demo's plots need matplotlib: pip install 'mpcompile[plot]'") \
            from e
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for r in runs:
        ax.plot(range(1, len(r.losses) + 1), r.losses, lw=1,
                label=f"{dtype_name(r.dtype)} ({r.test_accuracy:.1f} % test)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("digits CNN: FP32 vs FP16 (dynamic loss scale) vs BF16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# -- inspect, export, profile, reproduce, policy ------------------------------------------------


def _policy(args: argparse.Namespace) -> Policy:
    """The policy the options ask for: the --policy file, else Policy(dtype=--dtype)."""
    if args.policy_obj is not None:
        return args.policy_obj
    return Policy(dtype=from_name(args.dtype or "float16"))


def inspect_target(args: argparse.Namespace) -> int:
    t, policy = args.target_obj, _policy(args)
    print(f"== mpcompile inspect: {type(t.model).__name__} ({t.name}) in "
          f"{dtype_name(policy.dtype)}\n")
    t0 = time.perf_counter()
    mp = convert(t.model, t.inputs, policy=policy)
    print(f"converted in {time.perf_counter() - t0:.2f} s\n")
    print_conversion(mp, t.model, t.inputs, policy.dtype)
    if args.dot:
        mp.to_dot(args.dot)
        print(f"graph coloured by precision written to {args.dot}")
    return 0


def _target_step(t, policy, prefix: str, lr: float, momentum: float = 0.0, **kw):
    """TARGET's training step (SGD, eager); without a loss_fn the error says the model's output
    was taken as the loss."""
    opt = torch.optim.SGD(t.model.parameters(), lr=lr, momentum=momentum)
    try:
        return compile_train_step(t.model, t.loss_fn, t.inputs, t.targets, optimizer=opt,
                                  policy=policy, backend="eager", **kw)
    except TrainStepError as e:
        if t.loss_fn is not None:
            raise
        raise TrainStepError(f"{prefix}TARGET {t.name!r} gave no loss_fn, so the model's output "
                             f"is taken as the loss, and: {e}") from e


def export_target(args: argparse.Namespace) -> int:
    from .export import export_onnx

    t, policy = args.target_obj, _policy(args)
    if args.train:
        obj = _target_step(t, policy, "--train: ", lr=args.lr, momentum=0.9)
        what = f"training step (SGD, momentum 0.9, lr {args.lr})"
    else:
        obj = convert(t.model, t.inputs, policy=policy)
        what = "forward (eval mode)"
    path = export_onnx(obj, args.output)
    print(f"{t.name}: {dtype_name(policy.dtype)} {what} written to {path}")
    return 0


def profile_target(args: argparse.Namespace) -> int:
    from .numerics import profile

    t = args.target_obj
    prof = profile(t.model, t.inputs, t.targets, t.loss_fn, steps=args.steps, lr=args.lr,
                   loss_scales=tuple(args.scale), progress=True)
    print(prof.text())
    if args.png:
        prof.plot(args.png)
        print(f"\nhistogram of the activation gradients written to {args.png}")
    return 0


LOCALIZED = 3  # exit status of `mpcompile localize` when it found a non-finite value


def localize_target(args: argparse.Namespace) -> int:
    from .numerics import describe, localize_overflow

    t, policy = args.target_obj, _policy(args)
    step = _target_step(t, policy, "", lr=args.lr, loss_scale=args.scale)
    found = localize_overflow(step, t.inputs, t.targets)
    print(f"{t.name}: one {dtype_name(policy.dtype)} training step on TARGET's example batch at "
          f"loss scale {args.scale:g}, re-run node by node (nothing is trained)")
    if found is None:
        print("no node produced inf or NaN")
        return 0
    print(describe(found))
    return LOCALIZED


def reproduce(args: argparse.Namespace) -> int:
    from .reproduce import run

    files = run(args.which, Path(args.out), tiny=args.tiny, progress=True)
    print(f"written to {args.out}/: " + ", ".join(f.name for f in files))
    return 0


def policy_table(_: argparse.Namespace) -> int:
    for op, cls, reason in table_rows():
        print(f"{op:<58} {cls:<12} {reason}")
    return 0


# -- checks before anything runs ---------------------------------------------------------------


def _writable(path: str, flag: str) -> str | None:
    """Why ``path`` cannot be written, or None. Probes by opening it (which ``os.access`` cannot
    replace: root passes it, /proc refuses anyway); a file the probe created is removed."""
    p = Path(path)
    if not path:
        return f"{flag} needs a file path"
    if p.is_dir():
        return f"{flag} {path} is a directory; give a file path such as {p / 'graph.dot'}"
    if not p.parent.is_dir():
        return (f"{flag} {path}: the folder {p.parent} does not exist; create it first or give "
                "a path in an existing folder")
    existed = os.path.lexists(p)
    flags = os.O_WRONLY | (os.O_APPEND if existed else os.O_CREAT | os.O_EXCL)
    flags |= getattr(os, "O_NONBLOCK", 0)  # a FIFO without a reader fails instead of blocking
    try:
        os.close(os.open(p, flags, 0o666))
    except OSError as e:
        return (f"{flag} {path}: cannot write there ({e.strerror or e}); give a path in a "
                "writable folder")
    if not existed:
        os.unlink(p)
    return None


def _writable_dir(path: str, flag: str) -> str | None:
    """Why files cannot be written into folder ``path`` (made if missing), or None. Probes
    the folder, or its nearest existing parent, with a temporary file; creates nothing."""
    p = Path(path)
    if not path:
        return f"{flag} needs a folder path"
    if p.exists() and not p.is_dir():
        return f"{flag} {path} is a file; give a folder (it is created if missing)"
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{flag} {path}: {probe} is a file, so the folder cannot be created"
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".mpcompile-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return (f"{flag} {path}: cannot write in {probe} ({e.strerror or e}); give a folder "
                "you can write to")
    return None


def _missing(modules: tuple[str, ...], extra: str, what: str) -> str | None:
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    if gone:
        return f"{what} needs {', '.join(gone)}: pip install 'mpcompile[{extra}]'"
    return None


def check_demo_args(args: argparse.Namespace) -> str | None:
    """Why the demo's arguments are unusable, or None: checked before the demo runs."""
    if not math.isfinite(args.lr) or args.lr <= 0:
        return f"--lr must be a positive finite number, got {args.lr}"
    if args.model is None:
        given = [f for f, v in (("--dtype", args.dtype), ("--steps", args.steps),
                                ("--dot", args.dot)) if v is not None]
        if given:
            return (f"{', '.join(given)} only apply with --model NAME (the per-model demo); the "
                    "digits demo trains float32, float16 and bfloat16 and writes into --out")
        args.epochs = 10 if args.epochs is None else args.epochs
        args.seed = 0 if args.seed is None else args.seed
        args.out = "mpcompile-demo" if args.out is None else args.out
        if args.epochs < 1:
            return f"--epochs must be a positive number of epochs, got {args.epochs}"
        return (_missing(("sklearn", "matplotlib", "onnx", "onnxscript", "onnxruntime"), "demo",
                         "the digits demo") or _writable_dir(args.out, "--out"))
    given = [f for f, v in (("--epochs", args.epochs), ("--out", args.out),
                            ("--seed", args.seed)) if v is not None]
    if given:
        return (f"{', '.join(given)} only apply to the digits demo (without --model); the "
                "per-model demo takes --dtype, --steps, --lr and --dot")
    if args.steps is not None and args.steps < 0:
        return f"--steps must be 0 (no training) or a positive number of steps, got {args.steps}"
    if args.dot is not None:
        return _writable(args.dot, "--dot")
    return None


def check_target_args(args: argparse.Namespace) -> str | None:
    """Resolve TARGET and read --policy into ``args`` (a TargetError/PolicyError: exit 2), then
    the options shared by inspect, export and profile."""
    args.policy_obj = load_policy(args.policy) if getattr(args, "policy", None) else None
    dtype = getattr(args, "dtype", None)
    if args.policy_obj is not None and dtype is not None \
            and from_name(dtype) != args.policy_obj.dtype:
        return (f"--dtype {dtype} conflicts with dtype {dtype_name(args.policy_obj.dtype)} "
                f"in the policy file {args.policy}; give one of them")
    lr = getattr(args, "lr", None)
    if lr is not None and (not math.isfinite(lr) or lr <= 0):
        return f"--lr must be a positive finite number, got {lr}"
    args.target_obj = resolve(args.target)
    return None


def check_inspect_args(args: argparse.Namespace) -> str | None:
    if args.dot is not None and (problem := _writable(args.dot, "--dot")):
        return problem
    return check_target_args(args)


def _trainable(t, prefix: str = "") -> str | None:
    """Why TARGET ``t`` cannot give a training loss (targets without a loss_fn), or None."""
    if t.targets is not None and t.loss_fn is None:
        return (f"{prefix}TARGET {t.name!r} returned example targets but no loss_fn; return "
                "(model, inputs, targets, loss_fn), or no targets when the model returns its "
                "loss")
    return None


def check_export_args(args: argparse.Namespace) -> str | None:
    problem = (_missing(("onnx", "onnxscript", "onnxruntime"), "onnx", "export")
               or _writable(args.output, "--output"))
    if problem:
        return problem
    problem = check_target_args(args)
    if problem is None and args.train:
        return _trainable(args.target_obj, "--train: ")
    return problem


def check_profile_args(args: argparse.Namespace) -> str | None:
    if args.steps < 1:
        return f"--steps must be a positive number of steps, got {args.steps}"
    args.scale = args.scale or [1.0]
    for s in args.scale:
        if not (math.isfinite(s) and s > 0 and math.frexp(s)[0] == 0.5):
            return f"--scale {s:g}: each loss scale must be a power of two (1, 1024, 65536, ...)"
    if args.png is not None:
        problem = (_missing(("matplotlib",), "plot", "--png")
                   or _writable(args.png, "--png"))
        if problem:
            return problem
    return check_target_args(args) or _trainable(args.target_obj)


def check_localize_args(args: argparse.Namespace) -> str | None:
    if not (math.isfinite(args.scale) and args.scale > 0):
        return f"--scale must be a positive finite loss scale, got {args.scale:g}"
    return check_target_args(args) or _trainable(args.target_obj)


def check_reproduce_args(args: argparse.Namespace) -> str | None:
    return _missing(("matplotlib",), "plot", "reproduce") or _writable_dir(args.out, "--out")


# -- the parser and main -----------------------------------------------------------------------


DESCRIPTION = ("Compile PyTorch models to mixed precision (FP16/BF16): FP32 master weights, loss "
               "scaling, FP32 accumulation. Start with `mpcompile demo`.")
EPILOG = ("TARGET: a built-in example (" + ", ".join(sorted(EXAMPLES)) + ") or "
          "package.module:function returning (model, example_inputs[, example_targets, "
          "loss_fn]). Exit status: 0 ok; 2 unusable arguments (checked before anything runs: "
          "options, TARGET, policy file, output paths); 1 an error during the run (e.g. a model "
          "that cannot be captured) or, for the demo, mixed precision more than 1 point below "
          f"FP32; {LOCALIZED} localize found a node producing inf/NaN. An error is one line on "
          "stderr; --debug shows the traceback.")


def _target_options(p: argparse.ArgumentParser, policy: bool = True) -> None:
    p.add_argument("target", metavar="TARGET",
                   help="a built-in example (" + ", ".join(sorted(EXAMPLES)) + ") or "
                   "package.module:function returning (model, example_inputs[, "
                   "example_targets, loss_fn])")
    if policy:
        p.add_argument("--dtype", choices=DTYPES, help="the low precision (default float16)")
        p.add_argument("--policy", metavar="FILE",
                       help="a TOML or JSON file of Policy fields, e.g. dtype = \"bf16\", "
                       "fp32 = [\"aten.mm.default\"], keep_fp32_modules = [\"head\"]")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpcompile", description=DESCRIPTION, epilog=EPILOG)
    debug = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's --debug sets it, its absence does not reset the top-level one
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the full traceback")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo", parents=[debug],
        help="train a CNN on handwritten digits in FP32, FP16 and BF16 and compare",
        description="Train a small CNN on scikit-learn's handwritten digits three times (FP32, "
        "FP16 with dynamic loss scaling, BF16; same initial weights, batches and SGD), print "
        "each test accuracy and the FP16 step's report, and write into --out: the FP16 graph "
        "(DOT; SVG with Graphviz), ONNX files of the forwards and of the FP16 training step, "
        "the loss curves and the profiler's gradient histogram (PNG). Exit 1 if mixed "
        "precision is more than 1 point below FP32. Needs pip install 'mpcompile[demo]'. "
        "With --model NAME: the per-model demo instead (convert a built-in example, explain "
        "it, train it a few steps on one batch).")
    d.add_argument("--epochs", type=int, help="training epochs (default 10)")
    d.add_argument("--seed", type=int,
                   help="data split, initial weights and batch order (default 0)")
    d.add_argument("--out", metavar="DIR", help="output folder (default mpcompile-demo)")
    d.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    old = d.add_argument_group("the per-model demo")
    old.add_argument("--model", choices=sorted(EXAMPLES), help="a built-in example")
    old.add_argument("--dtype", choices=DTYPES, help="the low precision (default float16)")
    old.add_argument("--steps", type=int, help="training steps (default 30; 0: none)")
    old.add_argument("--dot", help="write the rewritten graph as Graphviz DOT (and SVG) here")
    d.set_defaults(func=demo, check=check_demo_args)

    i = sub.add_parser("inspect", parents=[debug],
                       help="convert TARGET; print the report and why each op runs as it does",
                       description="Convert TARGET to mixed precision and print its report (ops "
                       "and casts per precision, against torch.autocast) and, for one op of "
                       "each class, why it runs in its precision.")
    _target_options(i)
    i.add_argument("--dot", metavar="FILE",
                   help="write the graph coloured by precision as Graphviz DOT (and SVG)")
    i.set_defaults(func=inspect_target, check=check_inspect_args)

    e = sub.add_parser("export", parents=[debug],
                       help="write TARGET's mixed-precision forward (or training step) as ONNX",
                       description="Write TARGET's mixed-precision forward (eval mode), or with "
                       "--train the whole compiled training step (state in, state out), as an "
                       "ONNX file checked by onnx.checker. Needs pip install 'mpcompile[onnx]'.")
    _target_options(e)
    e.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="the ONNX file")
    e.add_argument("--train", action="store_true",
                   help="export the training step (needs TARGET's targets and loss_fn, or a "
                   "model that returns its loss)")
    e.add_argument("--lr", type=float, default=0.01,
                   help="with --train: the SGD (momentum 0.9) learning rate (default 0.01)")
    e.set_defaults(func=export_target, check=check_export_args)

    f = sub.add_parser("profile", parents=[debug],
                       help="FP32 histograms of TARGET's values: what FP16/BF16 would lose",
                       description="Run a few FP32 training steps of TARGET (SGD) and print, per "
                       "tensor kind, the fraction of values FP16 and BF16 would flush to zero "
                       "or overflow at each loss scale, the recommended loss-scale range and "
                       "the fraction of weight updates an FP16 weight would not absorb.")
    _target_options(f, policy=False)
    f.add_argument("--steps", type=int, default=3, help="FP32 steps to record (default 3)")
    f.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    f.add_argument("--scale", type=float, nargs="+", metavar="S",
                   help="loss scales (powers of two) to report at (default 1)")
    f.add_argument("--png", metavar="FILE",
                   help="write the activation-gradient histogram (the paper's Figure 3) here")
    f.set_defaults(func=profile_target, check=check_profile_args)

    lo = sub.add_parser(
        "localize", parents=[debug],
        help="name the first node of TARGET's training step that produces inf/NaN",
        description="Compile TARGET's mixed-precision training step (SGD, a static loss scale) "
        "and re-run one step on TARGET's example batch node by node, without training: print "
        "the first node that creates an inf or NaN, with its op, phase (forward, backward, "
        "...), module, source line and the magnitudes of its inputs. Exit 0 when no node does, "
        f"{LOCALIZED} when one does (1 and 2 as for every command).")
    _target_options(lo)
    lo.add_argument("--scale", type=float, default=65536.0,
                    help="the loss scale to run at (default 65536, the dynamic scale's start)")
    lo.add_argument("--lr", type=float, default=0.01, help=argparse.SUPPRESS)
    lo.set_defaults(func=localize_target, check=check_localize_args)

    r = sub.add_parser("reproduce", parents=[debug],
                       help="the paper's claims in miniature: tables and plots",
                       description="Reproduce the paper's claims on small data: (a) FP32 vs "
                       "FP16 vs BF16 accuracy, (b) master weights, (c) loss scaling, (d) "
                       "FP32 vs FP16 accumulation. Writes Markdown tables and PNGs into --out.")
    r.add_argument("which", nargs="?", choices=["a", "b", "c", "d", "all"], default="all",
                   help="which claim (default all)")
    r.add_argument("--out", metavar="DIR", default="reproduction",
                   help="output folder (default reproduction)")
    r.add_argument("--tiny", action="store_true", help="the small, fast version (as in CI)")
    r.set_defaults(func=reproduce, check=check_reproduce_args)

    t = sub.add_parser("policy", parents=[debug], help="print the op policy table")
    t.set_defaults(func=policy_table, check=None)
    return p


def _error(message: str, code: int, limit: int = 1000) -> int:
    """Print ``message`` as one line (a multi-line message joined, a long one cut short)."""
    text = " ".join(ln.strip() for ln in str(message).splitlines() if ln.strip())
    if len(text) > limit:
        text = text[:limit] + " ... (--debug shows all of it)"
    print(f"mpcompile: error: {text or '(no message)'}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        problem = args.check(args) if args.check else None
    except (TargetError, PolicyError) as e:  # TARGET or the policy file: unusable arguments
        if args.debug:
            raise
        return _error(str(e), 2)
    if problem:
        return _error(problem, 2)
    try:
        return args.func(args)
    except (MPCompileError, OSError, ImportError, subprocess.CalledProcessError) as e:
        if args.debug:
            raise
        return _error(str(e) or type(e).__name__, 1)


if __name__ == "__main__":
    sys.exit(main())
