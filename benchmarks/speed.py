"""Speed of one BF16 training step on CPU: mpcompile next to what users run today.

Per model, five configurations live in one process and run alternated (each a few steps in
turn, rounds repeated, medians taken): FP32 eager, torch.autocast eager, torch.autocast under
torch.compile (all three with torch.optim; GradScaler is off for BF16), and
``compile_train_step`` with the eager and the Inductor backend. Per configuration: the median
step time, the peak memory (VmHWM of a fresh process after warm-up, ``--memory-only``) and the
compile time (setup + first step - steady step). Then mpcompile (Inductor) against each
baseline and against the floor: the BF16 matmuls of one autocast forward + backward timed alone
(recorded with a TorchDispatchMode, replayed on random tensors of the same shapes and strides)
plus one fused pass over the optimizer state (a torch.compile'd in-place update over tensors of
the state's size).

    python benchmarks/speed.py [--models mlp gpt resnet] [--quick] [--no-write]
    python benchmarks/speed.py --profile CONFIG MODEL   (torch.profiler's top ops of one step)

Prints a Markdown table per model and replaces the "Speed (CPU, bf16)" section of
benchmarks/RESULTS.md (not with --no-write or --quick: one round, a smoke check). Inductor
compiles into a fresh cache directory, so compile times are a first-time user's. Times on a
shared machine are only as good as its quiet: each table says what share of the two cores the
process got while it was timed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

import mpcompile
from mpcompile.examples import eager_step

THREADS = 2
LOW = torch.bfloat16
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Speed (CPU, bf16)"


# -- models ---------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 1000))


class GPT(nn.Module):
    """Token embedding + learned positions, pre-norm causal encoder layers, final LayerNorm,
    LM head tied to the embedding."""

    def __init__(self, vocab=4096, d=512, heads=8, ff=2048, layers=6, seq=256):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq),
                             persistent=False)

    def forward(self, ids):
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            h = block(h, src_mask=self.mask, is_causal=True)
        return self.head(self.norm(h))


class Block(nn.Module):
    """ResNet basic block: two 3x3 conv + BN, identity or 1x1 conv + BN shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.short(x))


def resnet18(classes=10) -> nn.Module:
    """ResNet-18's layout (7x7/2 stem + max-pool, [2, 2, 2, 2] basic blocks, 64..512 channels)."""
    layers, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, classes))


def _tokens_loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    build: Callable[[], nn.Module]
    data: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable
    optimizer: str  # "sgd" (momentum 0.9) or "adamw"

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)


CASES = {
    "mlp": Case("mlp", "MLP 1024→4096→4096→1000 (ReLU), batch 256, SGD momentum 0.9", mlp,
                lambda g: (torch.randn(256, 1024, generator=g),
                           torch.randint(0, 1000, (256,), generator=g)),
                F.cross_entropy, "sgd"),
    "gpt": Case("gpt", "GPT-style decoder: 6 × TransformerEncoderLayer(512, 8, 2048, pre-norm), "
                "causal, vocab 4096, tied LM head, seq 256, batch 8, AdamW", GPT,
                lambda g: (torch.randint(0, 4096, (8, 256), generator=g),
                           torch.randint(0, 4096, (8, 256), generator=g)),
                _tokens_loss, "adamw"),
    "resnet": Case("resnet", "ResNet-18-style CNN with BatchNorm, 64×64 input, 10 classes, "
                   "batch 32, SGD momentum 0.9", resnet18,
                   lambda g: (torch.randn(32, 3, 64, 64, generator=g),
                              torch.randint(0, 10, (32,), generator=g)),
                   F.cross_entropy, "sgd"),
}


# -- configurations -------------------------------------------------------------------------


@dataclass
class Runner:
    """One configuration, set up: ``step()`` runs one training step and waits for it."""

    step: Callable[[], float]
    setup_s: float
    status: Callable[[], object] | None = None  # mpcompile's execution status


def _eager(case, model, x, y, autocast=False, compiled=False):
    opt = case.make_optimizer(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # BF16 needs no loss scaling
    run = torch.compile(model) if compiled else model
    low = LOW if autocast else None
    return lambda: eager_step(run, opt, scaler, case.loss, (x,), y, autocast=low)[0].item()


def _mpcompile(case, model, x, y, backend):
    step = mpcompile.compile_train_step(model, case.loss, x, y,
                                        optimizer=case.make_optimizer(model), dtype=LOW,
                                        backend=backend)
    return (lambda: step(x, y).loss.item()), (lambda: step.execution)


CONFIGS = {
    "fp32": "FP32 eager (torch.optim)",
    "autocast": "autocast eager",
    "autocast+compile": "autocast + torch.compile",
    "mp-eager": "mpcompile, eager backend",
    "mp-inductor": "mpcompile, Inductor backend",
}
COMPILED = ("autocast+compile", "mp-eager", "mp-inductor")  # their setup/first step compiles


def setup(config: str, case: Case, model: nn.Module, x, y) -> Runner:
    t0 = time.perf_counter()
    status = None
    if config == "fp32":
        fn = _eager(case, model, x, y)
    elif config == "autocast":
        fn = _eager(case, model, x, y, autocast=True)
    elif config == "autocast+compile":
        fn = _eager(case, model, x, y, autocast=True, compiled=True)
    else:
        fn, status = _mpcompile(case, model, x, y, config.removeprefix("mp-"))
    return Runner(fn, time.perf_counter() - t0, status)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:200]


# -- the floor ------------------------------------------------------------------------------

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward",
           "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_flash_attention_for_cpu_backward"}


@dataclass(frozen=True)
class Meta:
    shape: tuple
    stride: tuple
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> Meta:
        return Meta(tuple(t.shape), tuple(t.stride()), t.dtype)

    def make(self) -> torch.Tensor:
        size = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n)
        if not all(self.shape):
            size = 0
        base = torch.randn(size) if self.dtype.is_floating_point else torch.zeros(size)
        return base.to(self.dtype).as_strided(self.shape, self.stride)


class RecordMatmuls(TorchDispatchMode):
    """Records the matmul-like ATen calls (forward and backward) with their shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in MATMULS:
            self.calls.append((func, tree_map_only(torch.Tensor, Meta.of, (args, kwargs))))
        return func(*args, **kwargs)


def matmul_seconds(calls: list, repeats: int) -> tuple[float, int, int]:
    """(seconds, calls, distinct calls): each distinct recorded call run alone on random
    tensors of its shapes and strides, its median time times its count."""
    counts: dict[str, list] = {}
    for func, meta in calls:
        counts.setdefault(repr((func, meta)), [func, meta, 0])[2] += 1
    total = 0.0
    for func, meta, n in counts.values():
        args, kwargs = tree_map_only(Meta, Meta.make, meta)
        with torch.no_grad():
            func(*args, **kwargs)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                func(*args, **kwargs)
                times.append(time.perf_counter() - t)
        total += statistics.median(times) * n
    return total, len(calls), len(counts)


def _sgd_pass(g, master, mom, work):
    mom.mul_(0.9).add_(g.float())
    master.add_(mom, alpha=-1e-2)
    work.copy_(master)


def _adamw_pass(g, master, m, v, work):
    gf = g.float()
    m.lerp_(gf, 0.1)
    v.mul_(0.999).addcmul_(gf, gf, value=0.001)
    master.mul_(1 - 3e-4 * 0.01)
    master.addcdiv_(m, (v / 0.5).sqrt_().add_(1e-8), value=-3e-4 / 0.5)
    work.copy_(master)


def state_pass_seconds(n: int, optimizer: str, repeats: int) -> float:
    """One fused in-place update over ``n`` parameters (BF16 gradient read, FP32 master and
    optimizer state read and written, BF16 working copy written), compiled by Inductor."""
    fn = torch.compile(_sgd_pass if optimizer == "sgd" else _adamw_pass, fullgraph=True)
    fp32 = 2 if optimizer == "sgd" else 3  # master + momentum, or master + m + v
    args = [torch.randn(n, dtype=LOW), *(torch.zeros(n) for _ in range(fp32)),
            torch.empty(n, dtype=LOW)]
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Row:
    config: str
    step_s: float | None = None
    compile_s: float | None = None
    peak_mib: float | None = None
    error: str | None = None
    note: str = ""


def _median_steps(runners: dict[str, Runner], quick: bool, budget_s: float
                  ) -> tuple[dict, dict, str]:
    """Per configuration, the step times of alternated rounds (each configuration a few steps
    in turn), after one warm-up round that also sizes the rounds to the budget; and the errors
    of configurations that failed on the way (dropped from then on)."""
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {c: [] for c in runners}
    live = dict(runners)

    def run(c: str, record: bool) -> float:
        t = time.perf_counter()
        try:
            live[c].step()
        except Exception as e:  # noqa: BLE001 - the table reports it
            errors[c] = _short(e)
            del live[c]
            return 0.0
        dt = time.perf_counter() - t
        if record:
            times[c].append(dt)
        return dt

    per_step = sum(run(c, False) for c in list(live))
    per_round = 1 if quick or per_step * 2 * 3 > budget_s else 2
    least, most = (1, 1) if quick else (3, 10)
    rounds, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    while live and (rounds < least or (rounds < most and (time.perf_counter() - start)
                                       * (rounds + 1) / rounds <= budget_s)):
        for c in list(live):
            for _ in range(per_round):
                if c in live:
                    run(c, True)
        rounds += 1
    share = (_cpu_seconds() - cpu) / ((time.perf_counter() - start) * torch.get_num_threads())
    busy = " (**the machine was busy: other processes took CPU time, the times are " \
        "unreliable**)" if share < 0.8 else ""
    return times, errors, (f"{rounds} round{'s' * (rounds > 1)} of {per_round} "
                           f"step{'s' * (per_round > 1)} per configuration, medians; this "
                           f"process got {share:.0%} of {torch.get_num_threads()} cores during "
                           f"them{busy}")


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def time_model(case: Case, configs: list[str], quick: bool, budget_s: float
               ) -> tuple[list[Row], str]:
    """Median step time and compile time per configuration, alternated in this process."""
    torch.manual_seed(0)
    base = case.build().train()
    x, y = case.data(torch.Generator().manual_seed(0))
    rows = {c: Row(c) for c in configs}
    runners: dict[str, Runner] = {}
    first: dict[str, float] = {}
    for c in configs:
        try:
            r = setup(c, case, copy.deepcopy(base), x, y)
            t = time.perf_counter()
            r.step()
            first[c] = r.setup_s + time.perf_counter() - t
            runners[c] = r
        except Exception as e:  # noqa: BLE001 - the table reports every failure
            rows[c].error = _short(e)
    times, errors, how = _median_steps(runners, quick, budget_s) if runners else ({}, {}, "")
    for c, r in runners.items():
        row = rows[c]
        if c in errors:
            row.error = errors[c]
            continue
        row.step_s = statistics.median(times[c])
        if c in COMPILED:
            row.compile_s = max(first[c] - row.step_s, 0.0)
        if r.status is not None:
            st = r.status()
            inductor = f", Inductor {st.compile_seconds:.1f} s" if st.compile_seconds else ""
            row.note = f"trace {r.setup_s:.1f} s{inductor}; runs: {st}"
            if c == "mp-inductor" and st.backend != "inductor":
                row.error = f"ran eagerly: {st.reason}"
    return [rows[c] for c in configs], how


def floor_model(case: Case, quick: bool) -> dict:
    """Matmul-only time (autocast's BF16 matmuls of one step) + one pass over the state."""
    torch.manual_seed(0)
    model = case.build().train()
    x, y = case.data(torch.Generator().manual_seed(0))
    step = _eager(case, model, x, y, autocast=True)
    step()
    rec = RecordMatmuls()
    with rec:
        step()
    mm_s, n_calls, n_shapes = matmul_seconds(rec.calls, 3 if quick else 7)
    operands = sorted({str(next(m for m in tree_leaves(meta) if isinstance(m, Meta)).dtype)
                       .removeprefix("torch.") for _, meta in rec.calls})
    n = sum(p.numel() for p in model.parameters())
    state_s = state_pass_seconds(n, case.optimizer, 5 if quick else 15)
    return {"matmul_s": mm_s, "calls": n_calls, "shapes": n_shapes, "dtypes": operands,
            "state_s": state_s, "params": n, "floor_s": mm_s + state_s}


def _rss(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_only(config: str, model_name: str, steps: int) -> None:
    """In a fresh process: one warm-up step (compiles, allocates the optimizer state), reset
    the peak RSS, run ``steps`` steps, print VmHWM."""
    torch.set_num_threads(1)  # two of these run side by side on the two cores
    case = CASES[model_name]
    torch.manual_seed(0)
    model = case.build().train()
    x, y = case.data(torch.Generator().manual_seed(0))
    r = setup(config, case, model, x, y)
    r.step()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    for _ in range(steps):
        r.step()
    print("MEMORY " + json.dumps({"peak_mib": _rss("VmHWM")}))


def measure_memory(jobs: list[tuple[str, str]], steps: int) -> dict:
    """(config, model) -> (peak MiB or None, error or None); two fresh processes of one thread
    at a time (peak RSS is per process; two 2-thread processes on 2 cores would spin-wait)."""

    def one(job):
        cmd = [sys.executable, __file__, "--memory-only", *job, "--steps", str(steps)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        for line in p.stdout.splitlines():
            if line.startswith("MEMORY "):
                return json.loads(line[7:])["peak_mib"], None
        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"memory run failed: {err[:200]}"

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(jobs, pool.map(one, jobs)))


def profile(config: str, model_name: str, top: int = 20) -> None:
    """Where one configuration's step spends its time: torch.profiler's top ops by self time."""
    import torch._inductor.config

    torch._inductor.config.cpp.enable_kernel_profile = True  # name Inductor's kernels
    case = CASES[model_name]
    torch.manual_seed(0)
    x, y = case.data(torch.Generator().manual_seed(0))
    r = setup(config, case, case.build().train(), x, y)
    for _ in range(2):
        r.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        r.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top,
                                    max_name_column_width=70))


# -- output ---------------------------------------------------------------------------------


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    fam = re.search(r"^cpu family\s*:\s*(\d+)$", info, re.M)
    mod = re.search(r"^model\s*:\s*(\d+)$", info, re.M)
    have = set(flags.group(1).split()) if flags else set()
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
    cpu = name.group(1).strip() if name else platform.processor()
    if fam and mod:
        cpu += f" (family {fam.group(1)}, model {mod.group(1)})"
    load = Path("/proc/loadavg").read_text().split()[:3]
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {', '.join(isa) or 'no AVX-512'}; "
            f"{torch.get_num_threads()} threads; torch {torch.__version__}, Python "
            f"{platform.python_version()}; load average at start {' '.join(load)}")


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:,.1f}"


def table(case: Case, rows: list[Row], floor: dict | None, how: str) -> str:
    by = {r.config: r for r in rows}
    mp = by.get("mp-inductor")
    mp_s = mp.step_s if mp and not mp.error else None
    lines = [f"### {case.title}", "",
             "| configuration | step ms | peak MiB | compile s | mpcompile Inductor's speedup "
             "over it |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.step_s is None:
            lines.append(f"| {CONFIGS[r.config]} | failed: {r.error} | - | - | - |")
            continue
        ratio = f"{r.step_s / mp_s:.2f}×" if mp_s and r.config != "mp-inductor" else "-"
        peak = f"{r.peak_mib:,.0f}" if r.peak_mib is not None else "-"
        comp = "-" if r.compile_s is None else f"{r.compile_s:.1f}"
        name = CONFIGS[r.config] + (" (see below)" if r.error else "")
        lines.append(f"| {name} | {_ms(r.step_s)} | {peak} | {comp} | {ratio} |")
    if floor:
        lines.append("")
        lines.append(_wrap(
            f"Floor {_ms(floor['floor_s'])} ms = {floor['calls']} {'/'.join(floor['dtypes'])} "
            f"matmuls of autocast's step ({floor['shapes']} distinct) run alone "
            f"{_ms(floor['matmul_s'])} ms + one fused {case.optimizer.upper()} pass over "
            f"{floor['params'] / 1e6:.1f} M parameters {_ms(floor['state_s'])} ms. Step / floor: "
            + "; ".join(f"{CONFIGS[r.config]} {r.step_s / floor['floor_s']:.2f}×"
                        for r in rows if r.step_s and r.config in ("autocast", "mp-inductor"))
            + "."))
    notes = [f"timing: {how}"]
    notes += [f"{CONFIGS[r.config]}: {r.note}" for r in rows if r.note]
    notes += [f"{CONFIGS[r.config]}: {r.error}" for r in rows if r.error and r.step_s]
    return "\n".join([*lines, "", *(_wrap(n, "- ") for n in notes)]) + "\n"


def _wrap(text: str, bullet: str = "") -> str:
    """A paragraph (or a bullet) wrapped at 100 columns, as in the rest of RESULTS.md."""
    return textwrap.fill(text, 100, initial_indent=bullet, subsequent_indent=" " * len(bullet),
                         break_long_words=False, break_on_hyphens=False)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace the Speed section of RESULTS.md, or add it at the end of "# Results"."""
    old = path.read_text()
    start = old.find(SECTION + "\n")
    if start >= 0:
        nxt = re.compile(r"^#{1,2} ", re.M).search(old, start + len(SECTION))
        new = old[:start] + text + "\n" + old[nxt.start() if nxt else len(old):]
    else:
        nxt = re.compile(r"^# ", re.M).search(old, 1)
        at = nxt.start() if nxt else len(old)
        new = old[:at].rstrip("\n") + "\n\n" + text + "\n" + old[at:]
    path.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", choices=list(CASES), default=list(CASES))
    p.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--quick", action="store_true",
                   help="one round, one measured memory step: a smoke check (never writes)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of alternated rounds per model (default 30; at least 3 rounds)")
    p.add_argument("--memory-only", nargs=2, metavar=("CONFIG", "MODEL"),
                   help="internal: one peak-memory measurement in this process")
    p.add_argument("--steps", type=int, default=2, help="steps measured by --memory-only")
    p.add_argument("--profile", nargs=2, metavar=("CONFIG", "MODEL"),
                   help="print torch.profiler's top ops of one step and exit")
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    if args.memory_only or args.profile:
        for flag, fn in ((args.memory_only, memory_only), (args.profile, profile)):
            if flag:
                config, model = flag
                if config not in CONFIGS or model not in CASES:
                    p.error(f"give one of {list(CONFIGS)} and one of {list(CASES)}")
                fn(config, model, *([args.steps] if fn is memory_only else []))
        return
    t_start = time.perf_counter()
    cache = tempfile.mkdtemp(prefix="speed-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold compiles; the memory runs reuse it
    date = datetime.date.today().isoformat()
    desc = machine()
    print(f"{date}: {desc}\n", flush=True)
    results = {}
    try:
        for name in args.models:  # timing first, with nothing else of ours running
            case, t0 = CASES[name], time.perf_counter()
            rows, how = time_model(case, args.configs, args.quick, args.budget or 30.0)
            t1 = time.perf_counter()
            try:
                floor = floor_model(case, args.quick)
            except Exception as e:  # noqa: BLE001
                floor = None
                print(f"{name}: floor failed: {_short(e)}")
            results[name] = (rows, floor, how)
            print(f"{name} ({t1 - t0:.0f} s + floor {time.perf_counter() - t1:.0f} s): "
                  + ", ".join(f"{r.config} {_ms(r.step_s)} ms" for r in rows), flush=True)
        if not args.no_memory:
            jobs = [(r.config, name) for name, (rows, _, _) in results.items()
                    for r in rows if r.step_s is not None]
            t0 = time.perf_counter()
            peaks = measure_memory(jobs, 1 if args.quick else 2)
            print(f"peak memory: {len(jobs)} processes, {time.perf_counter() - t0:.0f} s",
                  flush=True)
            for name, (rows, _, _) in results.items():
                for r in rows:
                    if (r.config, name) in peaks:
                        r.peak_mib, err = peaks[r.config, name]
                        r.error = "; ".join(e for e in (r.error, err) if e) or None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    parts = [table(CASES[name], *res) for name, res in results.items()]
    print("\n" + "\n".join(parts))
    wall = time.perf_counter() - t_start
    print(f"wall time {wall:.0f} s")
    if args.no_write or args.quick:
        return
    cmd = "python benchmarks/speed.py" + (
        f" --models {' '.join(args.models)}" if args.models != list(CASES) else "") + (
        f" --configs {' '.join(args.configs)}" if args.configs != list(CONFIGS) else "")
    intro = f"{SECTION}\n\n" + _wrap(
        f"`{cmd}` ({date}, {wall / 60:.1f} min in all): {desc}.") + "\n\n" + _wrap(
        "Step time: median over alternated rounds in one process (each configuration a few "
        "steps in turn, after its first step and one warm-up round). Peak memory: VmHWM of a "
        "fresh one-thread process per configuration (the FP32 model it was built from "
        "included), reset after the first step, over the next 2 steps. Compile time: setup + "
        "first step - steady step, Inductor's cache cold (mpcompile: tracing the step "
        "included). Speedup: the configuration's step time / mpcompile Inductor's. Floor: the "
        "BF16 matmuls of autocast's step (recorded by a TorchDispatchMode, replayed alone on "
        "random tensors of the same shapes and strides) + one torch.compile'd in-place update "
        "over tensors of the state's size (BF16 gradient read; FP32 master and optimizer state "
        "read and written; BF16 working copy written). GradScaler is off (BF16).") + "\n"
    write_section(intro + "\n" + "\n".join(parts))
    print(f"wrote the '{SECTION[3:]}' section of {RESULTS}")


if __name__ == "__main__":
    main()
