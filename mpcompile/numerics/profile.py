"""The numerics profiler: what the values of a training step look like in FP32, and what FP16
or BF16 (at a loss scale S) would do to them.

:func:`profile` deep-copies the model, captures its FP32 forward with
:func:`mpcompile.capture.capture` (the graph ``convert`` starts from, so activation names are the
node names ``explain()`` knows), runs ``steps`` FP32 training steps through an ``fx.Interpreter``
and records, per tensor, a histogram of log2|x| for four kinds of values:

    activation       the output of every forward op (views and other aliases are skipped: they
                     repeat their input's values)
    activation_grad  the gradient of each activation (a hook on the op's output)
    weight_grad      each parameter's gradient
    weight_update    each parameter's change in a step (new - old FP32 value)

Bins are integers k = floor(log2|x|) from -149 (FP32's smallest subnormal) to 127, plus a zero
bin and a count of non-finite values. Each bin also counts the values that are exactly 2^k and
those whose significand is at least 2 - 2^-11 (FP16) or 2 - 2^-8 (BF16): with these, the
flush-to-zero and overflow counts at any power-of-two scale are *exact*, not estimates:

    x*S rounds to 0 in FP16   iff  |x*S| <= 2^-25   (half of 2^-24; the tie rounds to even, 0)
    x*S rounds to inf in FP16 iff  |x*S| >= 65520   (half-way to 65536; the tie rounds up)
    BF16: 2^-134 and (2 - 2^-8) * 2^127 likewise.

So ``flushed`` and ``overflowed`` accept power-of-two scales only (every scale mpcompile's dynamic
scaling uses is one). The one exception: for BF16 and S < 1, x*S may first round in FP32's own
subnormal range (below 2^-126) before BF16 sees it; the counts here use the exact product.

Lost updates are counted exactly at record time: a nonzero update u of an FP32 value w is lost in
a precision ``dt`` when ``(w.to(dt).float() + u).to(dt) == w.to(dt)`` (the paper's ablation
without master weights: the update is applied to the low-precision weight and rounded back).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from ..errors import MPCompileError
from ..records import MP

LOG2_MIN = -149  # floor(log2) of FP32's smallest subnormal
LOG2_MAX = 127  # floor(log2) of FP32's largest finite value
NBINS = LOG2_MAX - LOG2_MIN + 1
KINDS = ("activation", "activation_grad", "weight_grad", "weight_update")
GRADIENTS = ("activation_grad", "weight_grad")


class ProfileError(MPCompileError, ValueError):
    """A profiler argument is not usable (names the argument and what to pass)."""


@dataclass(frozen=True)
class Format:
    """Where a low-precision format flushes to zero and overflows (round to nearest even)."""

    dtype: torch.dtype
    flush_log2: int  # |x| <= 2^flush_log2 rounds to 0 (half the smallest subnormal)
    overflow_log2: int  # floor(log2) of the overflow threshold
    overflow_top: float  # its significand in [1, 2): |x| >= top * 2^overflow_log2 -> inf
    max: float  # largest finite value
    min_normal: float
    min_subnormal: float


FORMATS = {
    torch.float16: Format(torch.float16, -25, 15, 2 - 2**-11, 65504.0, 2.0**-14, 2.0**-24),
    torch.bfloat16: Format(torch.bfloat16, -134, 127, 2 - 2**-8,
                           float(torch.finfo(torch.bfloat16).max), 2.0**-126, 2.0**-133),
}


def _format(dtype: Any) -> Format:
    if dtype not in FORMATS:
        raise ProfileError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
    return FORMATS[dtype]


def _scale_log2(scale: Any) -> int:
    """k with scale == 2^k exactly; a ProfileError otherwise."""
    try:
        s = float(scale)
    except (TypeError, ValueError):
        s = float("nan")
    if not (math.isfinite(s) and s > 0):
        raise ProfileError(f"scale must be a positive power of two, got {scale!r}")
    m, e = math.frexp(s)
    if m != 0.5:
        raise ProfileError(
            f"scale must be a power of two (the counts are exact only there; every scale "
            f"dynamic loss scaling uses is one), got {scale!r}: use 2**{round(math.log2(s))}")
    return e - 1


# --- one tensor's record --------------------------------------------------------------------


@dataclass(frozen=True)
class TensorStats:
    """What one tensor's values looked like over the profiled steps (counts summed over them).

    ``counts[i]`` is the number of finite nonzero values with floor(log2|x|) = LOG2_MIN + i;
    ``pow2[i]`` those exactly 2^(LOG2_MIN + i); ``top_f16[i]`` / ``top_bf16[i]`` those whose
    significand |x| / 2^k is >= 2 - 2^-11 / 2 - 2^-8 (they overflow at the threshold's bin)."""

    name: str  # node name (activations, their gradients) or parameter name
    kind: str  # one of KINDS
    module: str  # dotted path of the module that made it ("" = the model itself)
    op: str  # the ATen op (activations) or "parameter"
    source: str  # the model's source line, when known
    shape: tuple[int, ...]
    observations: int  # how many times it was recorded (one per step)
    zeros: int
    nonfinite: int
    counts: tuple[int, ...]
    pow2: tuple[int, ...]
    top_f16: tuple[int, ...]
    top_bf16: tuple[int, ...]
    amax: float  # largest finite |x| (0.0 when none is nonzero)
    amin: float  # smallest nonzero |x| (inf when none)
    lost_f16: int = 0  # weight_update: nonzero updates an FP16 weight would not absorb
    lost_bf16: int = 0

    @property
    def numel(self) -> int:
        """Values recorded in all (numel of the tensor x observations)."""
        return self.zeros + self.nonfinite + sum(self.counts)

    @property
    def nonzero(self) -> int:
        """Values that are not zero (non-finite ones included)."""
        return self.nonfinite + sum(self.counts)

    def flushed_count(self, dtype: torch.dtype = torch.float16, scale: float = 1.0) -> int:
        """Nonzero values that x*scale rounded to ``dtype`` turns into 0 (exact)."""
        return _flushed(_format(dtype), _scale_log2(scale), self.counts, self.pow2)

    def overflowed_count(self, dtype: torch.dtype = torch.float16, scale: float = 1.0) -> int:
        """Values that x*scale rounded to ``dtype`` turns into inf, plus the non-finite ones."""
        fmt = _format(dtype)
        top = self.top_f16 if fmt.dtype == torch.float16 else self.top_bf16
        return _overflowed(fmt, _scale_log2(scale), self.counts, top) + self.nonfinite

    def flushed(self, dtype: torch.dtype = torch.float16, scale: float = 1.0) -> float:
        """Fraction of the nonzero values that flush to zero (0.0 when none is nonzero)."""
        return self.flushed_count(dtype, scale) / self.nonzero if self.nonzero else 0.0

    def overflowed(self, dtype: torch.dtype = torch.float16, scale: float = 1.0) -> float:
        """Fraction of the nonzero values that overflow (or are already non-finite)."""
        return self.overflowed_count(dtype, scale) / self.nonzero if self.nonzero else 0.0

    def lost(self, dtype: torch.dtype = torch.float16) -> int:
        """weight_update records: nonzero updates a ``dtype`` weight would not absorb."""
        return self.lost_f16 if _format(dtype).dtype == torch.float16 else self.lost_bf16


def _flushed(fmt: Format, s: int, counts: Sequence[int], pow2: Sequence[int]) -> int:
    edge = fmt.flush_log2 - s - LOG2_MIN  # bin of the threshold 2^(flush - s)
    if edge < 0:
        return 0
    if edge >= NBINS:
        return sum(counts)
    return sum(counts[:edge]) + pow2[edge]


def _overflowed(fmt: Format, s: int, counts: Sequence[int], top: Sequence[int]) -> int:
    edge = fmt.overflow_log2 - s - LOG2_MIN  # bin of the threshold top * 2^(E - s)
    if edge >= NBINS:
        return 0
    if edge < 0:
        return sum(counts)
    return sum(counts[edge + 1:]) + top[edge]


def _bins(idx: torch.Tensor) -> torch.Tensor:
    return torch.bincount(idx, minlength=NBINS).to(torch.int64)


@dataclass
class _Acc:
    """Running sums for one tensor while profiling (private, mutable; frozen at the end)."""

    name: str
    kind: str
    module: str
    op: str
    source: str
    shape: tuple[int, ...] = ()
    observations: int = 0
    zeros: int = 0
    nonfinite: int = 0
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(NBINS, dtype=torch.int64))
    pow2: torch.Tensor = field(default_factory=lambda: torch.zeros(NBINS, dtype=torch.int64))
    top_f16: torch.Tensor = field(default_factory=lambda: torch.zeros(NBINS, dtype=torch.int64))
    top_bf16: torch.Tensor = field(default_factory=lambda: torch.zeros(NBINS, dtype=torch.int64))
    amax: float = 0.0
    amin: float = math.inf
    lost_f16: int = 0
    lost_bf16: int = 0

    def add(self, x: torch.Tensor) -> None:
        """Count the values of ``x`` (any float dtype; read as FP32 magnitudes)."""
        a = x.detach().abs().to(torch.float32).reshape(-1)
        self.shape = tuple(x.shape)
        self.observations += 1
        finite = torch.isfinite(a)
        self.nonfinite += int((~finite).sum())
        self.zeros += int((a == 0).sum())
        nz = a[finite & (a > 0)]
        if nz.numel() == 0:
            return
        m, e = torch.frexp(nz)  # nz = m * 2^e, m in [0.5, 1): floor(log2) = e - 1
        idx = (e.to(torch.int64) - 1) - LOG2_MIN
        self.counts += _bins(idx)
        self.pow2 += _bins(idx[m == 0.5])
        self.top_f16 += _bins(idx[m >= 1 - 2.0**-12])
        self.top_bf16 += _bins(idx[m >= 1 - 2.0**-9])
        self.amax = max(self.amax, float(nz.max()))
        self.amin = min(self.amin, float(nz.min()))

    def add_update(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """Record the update new - old and count the nonzero ones each low precision loses."""
        u = (new.detach() - old).to(torch.float32)
        self.add(u)
        moved = u != 0
        for dt in (torch.float16, torch.bfloat16):
            w = old.to(dt)
            lost = int(((w.to(torch.float32) + u).to(dt) == w).logical_and(moved).sum())
            if dt == torch.float16:
                self.lost_f16 += lost
            else:
                self.lost_bf16 += lost

    def freeze(self) -> TensorStats:
        tup = lambda t: tuple(int(v) for v in t.tolist())  # noqa: E731
        return TensorStats(self.name, self.kind, self.module, self.op, self.source, self.shape,
                           self.observations, self.zeros, self.nonfinite, tup(self.counts),
                           tup(self.pow2), tup(self.top_f16), tup(self.top_bf16), self.amax,
                           self.amin, self.lost_f16, self.lost_bf16)


# --- the profile ----------------------------------------------------------------------------


class ScaleRange(NamedTuple):
    """Loss scales (powers of two) from ``low`` (keeps the asked fraction of nonzero gradients
    representable) to ``high`` (the largest with S * max|g| below the format's max)."""

    low: float
    high: float

    @property
    def fits(self) -> bool:
        """False: no single scale both keeps the gradients and avoids overflow (low > high)."""
        return self.low <= self.high


@dataclass(frozen=True)
class NumericsProfile:
    """Per-tensor histograms of log2|x| from FP32 training steps (see the module docstring),
    and what FP16/BF16 at a loss scale would do to those values."""

    tensors: tuple[TensorStats, ...]
    steps: int
    losses: tuple[float, ...]  # the FP32 loss of each profiled step
    model: str  # the model's class name
    keep: float = 0.999  # default fraction of gradients ``recommended_scale`` keeps
    loss_scales: tuple[float, ...] = (1.0,)  # the scales ``text()`` reports

    def of_kind(self, kind: str | Sequence[str]) -> tuple[TensorStats, ...]:
        """The records of one kind (or of several: a sequence of kinds)."""
        kinds = _kinds(kind)
        return tuple(t for t in self.tensors if t.kind in kinds)

    def get(self, name: str, kind: str = "activation") -> TensorStats:
        """One tensor's record by name and kind."""
        for t in self.tensors:
            if t.name == name and t.kind == kind:
                return t
        names = sorted({t.name for t in self.tensors if t.kind == kind})
        raise ProfileError(f"no {kind} record named {name!r}; there are: "
                           f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")

    def histogram(self, kind: str | Sequence[str] = "activation_grad"
                  ) -> tuple[tuple[int, ...], int, int]:
        """(counts per bin LOG2_MIN..LOG2_MAX, zeros, non-finite) summed over a kind's tensors."""
        ts = self.of_kind(kind)
        counts = [sum(c) for c in zip(*(t.counts for t in ts))] if ts else [0] * NBINS
        return tuple(counts), sum(t.zeros for t in ts), sum(t.nonfinite for t in ts)

    def flushed(self, dtype: torch.dtype = torch.float16, scale: float = 1.0,
                kind: str | Sequence[str] = "activation_grad") -> float:
        """Fraction of the nonzero values of ``kind`` (all its tensors together) that
        x * scale rounded to ``dtype`` turns into 0. ``scale``: a power of two."""
        ts = self.of_kind(kind)
        nonzero = sum(t.nonzero for t in ts)
        return sum(t.flushed_count(dtype, scale) for t in ts) / nonzero if nonzero else 0.0

    def overflowed(self, dtype: torch.dtype = torch.float16, scale: float = 1.0,
                   kind: str | Sequence[str] = "activation_grad") -> float:
        """Fraction of the nonzero values of ``kind`` that x * scale rounded to ``dtype`` turns
        into inf (values already non-finite in FP32 count as overflowed)."""
        ts = self.of_kind(kind)
        nonzero = sum(t.nonzero for t in ts)
        return sum(t.overflowed_count(dtype, scale) for t in ts) / nonzero if nonzero else 0.0

    def recommended_scale(self, dtype: torch.dtype = torch.float16,
                          keep: float | None = None) -> ScaleRange:
        """The loss-scale range for the gradients (activation and weight gradients together):
        ``high`` = the largest power of two S with S * max|g| < the format's max (65504 for
        FP16); ``low`` = the smallest power of two at which at most ``1 - keep`` of the nonzero
        gradients flush to zero. ``low > high`` (``.fits`` False): no static scale fits."""
        keep = self.keep if keep is None else keep
        if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
            raise ProfileError(f"keep must be in (0, 1], got {keep!r}")
        fmt = _format(dtype)
        ts = self.of_kind(GRADIENTS)
        counts = [sum(c) for c in zip(*(t.counts for t in ts))] if ts else []
        pow2 = [sum(c) for c in zip(*(t.pow2 for t in ts))] if ts else []
        nonzero = sum(counts)
        if not nonzero:
            raise ProfileError("no nonzero finite gradient was recorded: the loss does not "
                               "depend on the parameters, or the FP32 gradients are all inf/NaN")
        amax = max(t.amax for t in ts)
        s_high = math.floor(math.log2(fmt.max / amax)) + 1
        while math.ldexp(amax, s_high) >= fmt.max:
            s_high -= 1
        allowed = (1 - keep) * nonzero
        s_low = fmt.flush_log2 - LOG2_MIN + 1  # below every bin: nothing can flush
        for s in range(fmt.flush_log2 - LOG2_MAX - 1, fmt.flush_log2 - LOG2_MIN + 2):
            if _flushed(fmt, s, counts, pow2) <= allowed:
                s_low = s
                break
        return ScaleRange(math.ldexp(1.0, s_low), math.ldexp(1.0, s_high))

    def lost_updates(self, dtype: torch.dtype = torch.float16) -> float:
        """Fraction of the nonzero weight updates (new - old FP32 value) that a ``dtype``
        weight would not absorb: ``w.to(dtype) + u`` rounds back to ``w.to(dtype)`` (without
        FP32 master weights these updates are lost; the paper: below 2^-11 of the weight)."""
        ts = self.of_kind("weight_update")
        nonzero = sum(t.nonzero for t in ts)
        return sum(t.lost(dtype) for t in ts) / nonzero if nonzero else 0.0

    def text(self, top: int = 10) -> str:
        """A readable summary: per kind, the flushed and overflowed fractions at each of
        ``loss_scales`` in FP16 and BF16; the tensors with the most FP16 flushing at S=1 (or
        the first of ``loss_scales``); the recommended scale ranges; lost updates."""
        return _text(self, top)

    def plot(self, path: Any, kind: str = "activation_grad", dtype: torch.dtype = torch.float16,
             scale: float = 1.0) -> Any:
        """Write a PNG in the style of the paper's Figure 3: the histogram of log2|x| over all
        tensors of ``kind`` (values times ``scale``), the zero bin apart on the left, the
        format's smallest subnormal, smallest normal and largest value marked and the range
        that flushes to zero shaded. Needs matplotlib (``pip install 'mpcompile[plot]'``).
        Returns the path."""
        return _plot(self, path, kind, dtype, scale)


def _kinds(kind: str | Sequence[str]) -> tuple[str, ...]:
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ProfileError(f"kind must be one of {', '.join(KINDS)} (or a sequence of them), "
                           f"got {kind!r}")
    return kinds


def _scale(s: float) -> str:
    """"8" or "2^20": a power of two, short."""
    k = _scale_log2(s)
    return f"{s:g}" if abs(k) < 10 else f"2^{k}"


def _pct(x: float) -> str:
    return f"{100 * x:6.2f}%"


def _text(p: NumericsProfile, top: int) -> str:
    f16, bf16 = torch.float16, torch.bfloat16
    lines = [f"numerics profile of {p.model}: {p.steps} FP32 step(s), loss "
             + " -> ".join(f"{x:.4g}" for x in p.losses), ""]
    lines.append(f"{'kind':<16}{'scale':>7}{'tensors':>8}{'values':>11}{'zero':>9}"
                 f"{'f16 flush':>11}{'f16 inf':>9}{'bf16 flush':>12}{'bf16 inf':>10}")
    for kind in KINDS:
        ts = p.of_kind(kind)
        n = sum(t.numel for t in ts)
        zero = _pct(sum(t.zeros for t in ts) / n) if n else "-"
        # only gradients are multiplied by the loss scale
        for s in (p.loss_scales or (1.0,)) if kind in GRADIENTS else (1.0,):
            lines.append(
                f"{kind:<16}{_scale(s) if kind in GRADIENTS else '-':>7}{len(ts):>8}{n:>11}"
                f"{zero:>9}{_pct(p.flushed(f16, s, kind)):>11}"
                f"{_pct(p.overflowed(f16, s, kind)):>9}{_pct(p.flushed(bf16, s, kind)):>12}"
                f"{_pct(p.overflowed(bf16, s, kind)):>10}")
    s0 = p.loss_scales[0] if p.loss_scales else 1.0
    grads = sorted(p.of_kind(GRADIENTS), key=lambda t: -t.flushed(f16, s0))[:top]
    if grads:
        lines += ["", f"gradients flushing most in FP16 at S={_scale(s0)}:",
                  f"  {'kind':<16}{'tensor':<28}{'module':<24}{'flushed':>9}{'max|x|':>11}"]
        for t in grads:
            lines.append(f"  {t.kind:<16}{t.name[:27]:<28}{(t.module or '<model>')[:23]:<24}"
                         f"{_pct(t.flushed(f16, s0)):>9}{t.amax:>11.3g}")
    lines.append("")
    for dt, label in ((f16, "FP16"), (bf16, "BF16")):
        try:
            r = p.recommended_scale(dt)
        except ProfileError as e:
            lines.append(f"recommended {label} loss scale: none ({e})")
            continue
        verdict = "" if r.fits else (" -- no static scale fits: low > high (keep fewer "
                                     "gradients, or keep the widest-ranging ops in FP32)")
        lines.append(f"recommended {label} loss scale (keeping {p.keep:g} of nonzero "
                     f"gradients): {_scale(r.low)} .. {_scale(r.high)}{verdict}")
    if p.of_kind("weight_update"):
        lines.append(f"updates an FP16 weight would not absorb (no FP32 master): "
                     f"{_pct(p.lost_updates(f16)).strip()}; BF16: "
                     f"{_pct(p.lost_updates(bf16)).strip()}")
    return "\n".join(lines)


def _plot(p: NumericsProfile, path: Any, kind: str, dtype: torch.dtype, scale: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("NumericsProfile.plot needs matplotlib: pip install 'mpcompile[plot]'"
                          ) from e
    fmt = _format(dtype)
    s = _scale_log2(scale)
    counts, zeros, nonfinite = p.histogram(kind)
    total = sum(counts) + zeros + nonfinite
    if not total:
        raise ProfileError(f"nothing of kind {kind!r} was recorded")
    used = [i for i, c in enumerate(counts) if c]
    lo = min([LOG2_MIN + i + s for i in used] + [fmt.flush_log2 - 4])
    hi = max([LOG2_MIN + i + s for i in used] + [fmt.overflow_log2 + 3])
    xs = [LOG2_MIN + i + s for i in range(NBINS) if lo <= LOG2_MIN + i + s <= hi]
    ys = [100 * counts[x - s - LOG2_MIN] / total for x in xs]
    zero_x = lo - 4
    fig = Figure(figsize=(9, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(xs, ys, width=0.9, align="edge", color="#4477aa", label=f"{kind} values")
    ax.bar([zero_x], [100 * zeros / total], width=0.9, align="edge", color="#999999",
           label="exactly zero")
    name = "FP16" if fmt.dtype == torch.float16 else "BF16"
    sub, norm = math.log2(fmt.min_subnormal), math.log2(fmt.min_normal)
    ax.axvspan(zero_x + 1.5, fmt.flush_log2, color="#ee6677", alpha=0.15,
               label=f"flushes to 0 in {name}")
    ax.axvline(sub, color="#ee6677", ls="--", label=f"{name} smallest subnormal 2^{sub:.0f}")
    ax.axvline(norm, color="#228833", ls="--", label=f"{name} smallest normal 2^{norm:.0f}")
    ax.axvline(math.log2(fmt.max), color="#aa3377", ls="--",
               label=f"{name} largest value {fmt.max:g}")
    ticks = [zero_x + 0.45] + [x for x in range(lo - lo % 10 + 10, hi + 1, 10)]
    ax.set_xticks(ticks, ["zero"] + [str(t) for t in ticks[1:]])
    ax.set_xlim(zero_x - 1, hi + 2)
    ax.set_xlabel(f"log2(|x|){'' if s == 0 else f' after x{scale:g}'}")
    ax.set_ylabel("% of values")
    flushed = p.flushed(dtype, scale, kind)
    ax.set_title(f"{p.model}: {kind}, {total} values over {p.steps} step(s); "
                 f"{100 * flushed:.1f}% of nonzero flush to 0 in {name} at S={scale:g}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --- running the steps ----------------------------------------------------------------------


def _is_alias(target: Any) -> bool:
    """True for ops whose output aliases an input (views): their values repeat the input's."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return False
    return any(r.alias_info is not None for r in schema.returns)


def _op_name(n: fx.Node) -> str:
    """"aten.addmm.default"; for one output of a multi-output op, "aten.op.overload[i]"."""
    if n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        return f"{n.args[0].target}[{n.args[1]}]"
    return str(n.target)


class _Recorder(fx.Interpreter):
    """Runs the captured FP32 graph, recording each op's output and (by a hook) its gradient."""

    def __init__(self, gm: fx.GraphModule, accs: dict):
        super().__init__(gm)
        self._accs = accs

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if (n.op == "call_function" and isinstance(out, torch.Tensor)
                and out.is_floating_point() and out.numel() and not _is_alias(n.target)):
            rec = n.meta.get(MP)
            info = (rec.module if rec else "", _op_name(n), rec.source if rec else "")
            self._acc(n.name, "activation", info).add(out)
            if out.requires_grad:
                acc = self._acc(n.name, "activation_grad", info)
                out.register_hook(lambda g, acc=acc: acc.add(g))
        return out

    def _acc(self, name: str, kind: str, info: tuple) -> _Acc:
        key = (kind, name)
        if key not in self._accs:
            self._accs[key] = _Acc(name, kind, *info)
        return self._accs[key]


def _optimizer(optimizer: Any, model: torch.nn.Module, original: dict, lr: float):
    """A torch optimizer over the copy's parameters: plain SGD(lr), a factory's, or a copy of
    the given torch optimizer (same class, groups, hyperparameters and state)."""
    if optimizer is None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ProfileError(f"lr must be a finite, non-negative number, got {lr!r}")
        return torch.optim.SGD(model.parameters(), lr=lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        copy_of = {id(p): dict(model.named_parameters(remove_duplicate=False))[n]
                   for n, p in original.items()}
        try:
            groups = [{**{k: v for k, v in g.items() if k != "params"},
                       "params": [copy_of[id(p)] for p in g["params"]]}
                      for g in optimizer.param_groups]
        except KeyError:
            raise ProfileError("optimizer must be built on the model's parameters (or pass a "
                               "function params -> optimizer)") from None
        opt = type(optimizer)(groups)
        opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        return opt
    if callable(optimizer):
        return optimizer(model.parameters())
    raise ProfileError(f"optimizer must be None (SGD with lr), a torch.optim.Optimizer or a "
                       f"function params -> optimizer, got {type(optimizer).__name__}")


def _unwrap(target: Any, loss_fn: Callable | None) -> tuple[torch.nn.Module, dict]:
    """(a deep copy of the FP32 model, the original's parameters by name)."""
    from ..train.step import TrainStep

    if isinstance(target, TrainStep):
        model = target.to_module()  # already a copy, holding the current masters
        return model, dict(model.named_parameters(remove_duplicate=False))
    if not isinstance(target, torch.nn.Module):
        raise ProfileError(f"target must be an nn.Module or a TrainStep, got "
                           f"{type(target).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise ProfileError("loss_fn must be callable: loss_fn(outputs, *targets) -> scalar, or "
                           "None when the model returns its loss")
    original = dict(target.named_parameters(remove_duplicate=False))
    return copy.deepcopy(target), original


def profile(target: Any, inputs: Any, targets: Any = None, loss_fn: Callable | None = None, *,
            steps: int = 3, optimizer: Any = None, lr: float = 0.01,
            loss_scales: Sequence[float] = (1.0,), keep: float = 0.999,
            progress: bool = False) -> NumericsProfile:
    """Run ``steps`` FP32 training steps of a copy of ``target`` on one batch and record the
    log2|x| histograms of its activations, activation gradients, weight gradients and weight
    updates (see :mod:`mpcompile.numerics.profile`). The caller's model is never changed.

    Args:
        target: an ``nn.Module`` (FP32), or a :class:`~mpcompile.TrainStep` (its
            ``to_module()`` copy, holding the current masters, is profiled; a TrainStep does not
            keep its ``loss_fn``, so pass it again).
        inputs: the model's inputs, as for ``compile_train_step`` (a tensor, a tuple, a dict of
            keyword inputs or ``(args, kwargs)``).
        targets: a tensor or tuple of tensors passed to ``loss_fn`` after the outputs.
        loss_fn: ``loss_fn(outputs, *targets) -> scalar``; None: the model returns its loss.
        steps: how many steps (each on the same batch; the counts are summed over them).
        optimizer: None (plain SGD with ``lr``), a torch optimizer built on ``target``'s
            parameters (copied: same class, groups, hyperparameters and state), or a function
            ``params -> optimizer``.
        loss_scales: the powers of two ``text()`` reports flushed/overflowed fractions at.
        keep: the fraction of nonzero gradients ``recommended_scale()`` keeps by default.
        progress: show a progress bar (tqdm).
    """
    from tqdm.auto import tqdm

    from ..api import as_args, split_inputs, tensor_leaves
    from ..capture import BindingKind, capture
    from ..train.trace import model_loss

    if not (isinstance(steps, int) and steps >= 1):
        raise ProfileError(f"steps must be a positive integer, got {steps!r}")
    scales = tuple(loss_scales)
    for s in scales:
        _scale_log2(s)
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise ProfileError(f"keep must be in (0, 1], got {keep!r}")
    model, original = _unwrap(target, loss_fn)
    if not model.training:
        model.train()
    args, kwargs = split_inputs(inputs)
    tgts = as_args(targets)
    bad = [i for i, t in enumerate(tgts) if not isinstance(t, torch.Tensor)]
    if bad:
        raise ProfileError(f"targets[{bad[0]}] is a {type(tgts[bad[0]]).__name__}; pass tensors")
    opt = _optimizer(optimizer, model, original, lr)
    captured = capture(model, args, kwargs)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    batch = tensor_leaves(args, kwargs)
    accs: dict[tuple[str, str], _Acc] = {}
    losses = []
    named = list(model.named_parameters())
    for _ in tqdm(range(steps), desc="profile", disable=not progress, leave=False):
        feed = [params[b.target] if b.kind is BindingKind.PARAM
                else buffers[b.target] if b.kind is BindingKind.BUFFER
                else b.target if b.kind is BindingKind.CONST
                else batch[b.target] for b in captured.inputs]
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            outs = _Recorder(captured.gm, accs).run(*feed)
            user, new_buffers = [], {}
            for b, v in zip(captured.outputs, outs):
                if b.kind is BindingKind.BUFFER:
                    new_buffers[b.target] = v.detach()
                else:
                    user.append(v)
            outputs = captured.out_spec.unflatten(user)
            loss = loss_fn(outputs, *tgts) if loss_fn is not None else model_loss(outputs)
            if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
                raise ProfileError("loss_fn must return a scalar tensor (reduce it, e.g. "
                                   ".mean())")
            loss.backward()
        losses.append(float(loss.detach()))
        old = {n: p.detach().clone() for n, p in named}
        for n, p in named:
            if p.grad is not None:
                _param_acc(accs, n, "weight_grad").add(p.grad)
        opt.step()
        with torch.no_grad():
            for fqn, v in new_buffers.items():
                buffers[fqn].copy_(v)
            for n, p in named:
                if p.grad is not None:
                    _param_acc(accs, n, "weight_update").add_update(old[n], p)
    order = {k: i for i, k in enumerate(KINDS)}
    frozen = sorted((a.freeze() for a in accs.values()), key=lambda t: order[t.kind])
    return NumericsProfile(tuple(frozen), steps, tuple(losses), captured.model_name, float(keep),
                           scales)


def _param_acc(accs: dict, name: str, kind: str) -> _Acc:
    key = (kind, name)
    if key not in accs:
        accs[key] = _Acc(name, kind, name.rpartition(".")[0], "parameter", "")
    return accs[key]


__all__ = ["FORMATS", "KINDS", "LOG2_MAX", "LOG2_MIN", "NBINS", "NumericsProfile",
           "ProfileError", "ScaleRange", "TensorStats", "profile"]
