"""The ``mpcompile`` command.

A user error is one line on stderr, ``mpcompile: error: ...``, and a non-zero exit: 2 for unusable
arguments (checked before anything runs; argparse's own usage errors are unchanged), 1 for an
mpcompile error or an unwritable file during a run. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .api import convert
from .dtypes import from_name, unit_roundoff
from .errors import MPCompileError
from .examples import EXAMPLES, batch, eager_step
from .fxutil import is_cast
from .policy import OpClass, table_rows
from .records import MP
from .train import compile_train_step


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


def demo(args: argparse.Namespace) -> int:
    dtype = from_name(args.dtype)
    example = EXAMPLES[args.model]
    model = example.build()
    x, _ = batch(example)
    print(f"== mpcompile demo: {type(model).__name__} ({args.model}) in {args.dtype}\n")
    t0 = time.perf_counter()
    mp = convert(model, x, dtype=dtype)
    print(f"converted in {time.perf_counter() - t0:.2f} s\n")
    model.eval()
    mp.eval()
    with torch.no_grad():
        ref = model(*x)
        out = mp(*x)
    ref_t = ref["logits"] if isinstance(ref, dict) else ref
    out_t = out["logits"] if isinstance(out, dict) else out
    rel = ((out_t - ref_t).norm() / ref_t.norm()).item()
    print(f"output vs the FP32 model: relative error {rel:.2e} (unit roundoff of "
          f"{args.dtype}: {unit_roundoff(dtype):.1e}); output dtype {out_t.dtype}\n")
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
    if args.dot:
        mp.to_dot(args.dot)
        print(f"graph coloured by precision written to {args.dot}\n")
    if args.steps:
        print(f"== training {args.steps} steps, SGD(momentum=0.9, lr={args.lr}), one batch\n")
        step, losses, skipped, compile_s = train_compiled(example, args.steps, args.lr, dtype)
        try:
            ref = train_autocast(example, args.steps, args.lr, dtype)
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


def policy_table(_: argparse.Namespace) -> int:
    for op, cls, reason in table_rows():
        print(f"{op:<58} {cls:<12} {reason}")
    return 0


DESCRIPTION = "Compile PyTorch models to mixed precision (FP16/BF16): demo and policy table."
EPILOG = ("An error is one line on stderr and exit status 2 (unusable arguments, checked before "
          "anything runs) or 1 (an error during the run); --debug shows the traceback.")


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


def check_demo_args(args: argparse.Namespace) -> str | None:
    """Why the demo's arguments are unusable, or None: checked before the demo runs."""
    if args.steps < 0:
        return f"--steps must be 0 (no training) or a positive number of steps, got {args.steps}"
    if not math.isfinite(args.lr) or args.lr <= 0:
        return f"--lr must be a positive finite number, got {args.lr}"
    if args.dot is not None:
        return _writable(args.dot, "--dot")
    return None


def _error(message: str, code: int, limit: int = 1000) -> int:
    """Print ``message`` as one line (a multi-line message joined, a long one cut short)."""
    text = " ".join(ln.strip() for ln in str(message).splitlines() if ln.strip())
    if len(text) > limit:
        text = text[:limit] + " ... (--debug shows all of it)"
    print(f"mpcompile: error: {text or '(no message)'}", file=sys.stderr)
    return code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpcompile", description=DESCRIPTION, epilog=EPILOG)
    debug = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's --debug sets it, its absence does not reset the top-level one
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the full traceback")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", parents=[debug],
                       help="convert a built-in model, explain it, and train it")
    d.add_argument("--model", choices=sorted(EXAMPLES), default="transformer")
    d.add_argument("--dtype", choices=["bf16", "bfloat16", "float16", "fp16"], default="float16")
    d.add_argument("--steps", type=int, default=30, help="training steps (0: none)")
    d.add_argument("--lr", type=float, default=0.05, help="learning rate (positive)")
    d.add_argument("--dot", help="write the rewritten graph as Graphviz DOT (and SVG) here")
    d.set_defaults(func=demo, check=check_demo_args)
    t = sub.add_parser("policy", parents=[debug], help="print the op policy table")
    t.set_defaults(func=policy_table, check=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    problem = args.check(args) if args.check else None
    if problem:
        return _error(problem, 2)
    try:
        return args.func(args)
    except (MPCompileError, OSError, subprocess.CalledProcessError) as e:
        if args.debug:
            raise
        return _error(str(e) or type(e).__name__, 1)


if __name__ == "__main__":
    sys.exit(main())
