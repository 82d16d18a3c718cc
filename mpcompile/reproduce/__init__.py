"""The paper's claims in miniature (Micikevicius et al., *Mixed Precision Training*, ICLR 2018),
each measured through the real pipeline (:func:`mpcompile.compile_train_step`,
:func:`mpcompile.convert`, the kernels' contract) on data that ships with scikit-learn or is
generated:

    a  FP32 vs FP16 (masters + dynamic scale) vs BF16 test accuracy, several seeds
       (:mod:`.accuracy`)
    b  FP32 master weights vs FP16 weights only across learning rates: lost updates, loss,
       accuracy (:mod:`.masters`)
    c  a model with tiny gradients: the Figure-3 histogram, the flushed fraction, training at
       static and dynamic loss scales (:mod:`.loss_scaling`)
    d  FP32 vs FP16 accumulation error against float64 for dot lengths 2^6..2^16
       (:mod:`.accumulation`)

Each claim writes ``<out>/<claim>.md`` (a Markdown table beside the paper's numbers) and PNGs.
``mpcompile reproduce all --out DIR`` (or ``python -m mpcompile.reproduce all --out DIR``)
runs them all. Needs the ``[demo]`` extra
(scikit-learn, matplotlib).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import MPCompileError
from . import accumulation, accuracy, loss_scaling, masters

CLAIMS: dict[str, Callable] = {
    "a": accuracy.run,
    "b": masters.run,
    "c": loss_scaling.run,
    "d": accumulation.run,
}
TITLES = {"a": "accuracy: FP32 vs FP16 vs BF16", "b": "FP32 master weights",
          "c": "loss scaling", "d": "FP32 vs FP16 accumulation"}


def claims(which: str) -> tuple[str, ...]:
    """The claim letters ``which`` names: one of a, b, c, d, or ``all``."""
    if which == "all":
        return tuple(CLAIMS)
    if which in CLAIMS:
        return (which,)
    raise MPCompileError(f"reproduce: unknown claim {which!r}; use one of "
                         f"{', '.join(CLAIMS)} or all")


def run_claim(which: str, out_dir: str | os.PathLike, *, tiny: bool = False,
              progress: bool = False):
    """Run one claim (a, b, c or d) in torch's current thread setting; returns (its result
    object, the files written)."""
    if which == "all":
        raise MPCompileError("reproduce.run_claim runs one claim (a, b, c or d); use run() "
                             "for all")
    (letter,) = claims(which)
    return CLAIMS[letter](_out(out_dir), tiny=tiny, progress=progress)


def run(which: str, out_dir: str | os.PathLike, *, tiny: bool = False,
        progress: bool = False, threads: int | None = 1) -> list[Path]:
    """Run claim ``which`` (a, b, c, d or all) and write its tables and PNGs into ``out_dir``
    (created if missing); with ``all`` also ``README.md``: the claims' tables in order and how
    long each took. ``tiny``: a few seconds per claim (fewer seeds, steps, lengths), for CI.
    ``threads``: torch's intra-op threads during the run, restored after (default 1: the models
    are too small to gain from more, and on a shared machine more threads run several times
    slower); None leaves torch's setting. Returns the paths written."""
    letters = claims(which)
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise MPCompileError(f"reproduce: threads must be a positive integer or None, got "
                             f"{threads!r}")
    out = _out(out_dir)
    files: list[Path] = []
    timings = {}
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for letter in letters:
            t0 = time.perf_counter()
            _, written = CLAIMS[letter](out, tiny=tiny, progress=progress)
            timings[letter] = time.perf_counter() - t0
            files.extend(written)
    finally:
        torch.set_num_threads(before)
    if len(letters) > 1:
        files.append(_summary(out, letters, timings, tiny))
    return files


def _out(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MPCompileError(f"reproduce: the output path {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MPCompileError(f"reproduce: cannot create the output folder {out}: {e}") from e
    return out


def _summary(out: Path, letters: tuple[str, ...], timings: dict, tiny: bool) -> Path:
    parts = ["# Mixed Precision Training, the claims in miniature\n",
             f"Run: `mpcompile reproduce all --out DIR{' --tiny' if tiny else ''}` (or `python "
             f"-m mpcompile.reproduce ...`). "
             f"Time per claim: " + ", ".join(f"({k}) {timings[k]:.0f} s" for k in letters)
             + f"; total {sum(timings.values()):.0f} s.\n"]
    for k in letters:
        text = (out / f"{k}.md").read_text(encoding="utf-8")
        parts.append(text.replace("\n# ", "\n## ").replace("# ", "## ", 1))
    path = out / "README.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m mpcompile.reproduce [a|b|c|d|all] [--out DIR] [--tiny]``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m mpcompile.reproduce",
                                description="Reproduce the paper's claims in miniature.")
    p.add_argument("which", nargs="?", default="all", choices=[*CLAIMS, "all"])
    p.add_argument("--out", default="reproduction", help="output folder (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="a few seconds per claim (CI)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads during the run (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        t0 = time.perf_counter()
        files = run(args.which, args.out, tiny=args.tiny, progress=sys.stderr.isatty(),
                    threads=args.threads)
    except (MPCompileError, ImportError) as e:
        print(f"mpcompile reproduce: error: {e}", file=sys.stderr)
        return 1
    for f in files:
        print(f)
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


__all__ = ["CLAIMS", "claims", "main", "run", "run_claim"]
