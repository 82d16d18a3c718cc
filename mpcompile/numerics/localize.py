"""Overflow localisation: re-run one training step node by node and name the first node that
produces an inf or NaN.

:func:`localize_overflow` interprets ``step.graph_module`` (the pure step graph: state,
learning rates, batch and constants in; new state, loss, scale, skipped out) on copies of the
step's state, so the step itself is left bit for bit unchanged. Every node's floating outputs are
checked; the first node that *creates* a non-finite value is reported: its output holds an inf
while none of its inputs is non-finite, or a NaN while none of its inputs is NaN. So a mask filled
with -inf on purpose (its fill value is an argument) and ops that merely pass such values on are
not blamed. Non-finite inputs (the batch or the state itself) are reported as the step's inputs.
The phases that handle non-finite values by design (found_inf, gate, scale_update, outputs) are
not checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..dtypes import dtype_name
from ..errors import SignatureError, TrainStepError
from ..records import MP

# phases whose non-finite values are by design: the skip decision, the gate that keeps the old
# state, the loss-scale update and the step's reported values
BY_DESIGN = ("found_inf", "gate", "scale_update", "outputs")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor an overflowing node read or wrote."""

    name: str  # the graph node (or "scalar")
    dtype: str  # "float16", ...
    shape: tuple[int, ...]
    max_abs: float  # largest |x| (inf/NaN included: may be inf or nan)
    n_inf: int = 0
    n_nan: int = 0

    def __str__(self) -> str:
        shape = "[" + ", ".join(map(str, self.shape)) + "]"
        bad = ", ".join(f"{n} {w}" for n, w in ((self.n_inf, "inf"), (self.n_nan, "NaN")) if n)
        return (f"{self.dtype}{shape} max {self.max_abs:.3g}" if not bad
                else f"{self.dtype}{shape} with {bad} (of {math.prod(self.shape)})")


@dataclass(frozen=True)
class Overflow:
    """The first node of a step that produced an inf or NaN (see :func:`localize_overflow`)."""

    node: str  # node name in ``step.graph_module`` (``step.explain(node)`` knows it)
    op: str  # the ATen op, or "input" for a step input
    phase: str  # "forward", "backward", "loss", "loss_scale", "unscale", "update", "inputs"...
    module: str  # dotted path of the model's module ("" = the model itself)
    module_type: str
    source: str  # "model.py:42  code", when known
    inputs: tuple[TensorInfo, ...]  # the node's tensor inputs
    scalars: tuple[float, ...]  # its numeric non-tensor arguments
    output: TensorInfo
    loss_scale: float  # the loss scale the step ran at
    low: str  # the step's low precision ("float16")

    def __str__(self) -> str:
        return describe(self)


def describe(overflow: Overflow | None) -> str:
    """One paragraph saying where the first non-finite value came from and what to try; for
    None, that no node produced one."""
    if overflow is None:
        return "no node produced inf or NaN on this batch (the step would not be skipped)"
    o = overflow
    where = f"module `{o.module}`" if o.module else "the model itself"
    if o.module_type:
        where += f" ({o.module_type.rpartition('.')[2]}"
        where += f", {_short(o.source)})" if o.source else ")"
    elif o.source:
        where += f" ({_short(o.source)})"
    if o.phase == "inputs":
        return (f"first non-finite value: the step's input {o.node} holds {o.output}; the batch "
                "(or the step's state) is not finite before any op runs: check the data")
    part = {"forward": f"in the forward of {where}",
            "backward": f"in the backward of {where} (loss scale {o.loss_scale:g})"}.get(
        o.phase, f"in the {o.phase} phase" + (f" of {where}" if o.module else ""))
    ins = ", ".join([str(t) for t in o.inputs] + [f"scalar {s:g}" for s in o.scalars])
    text = (f"first non-finite value: node {o.node} ({o.op}) {part}, inputs: "
            f"{ins or 'none'}; output {o.output}.")
    if o.phase == "backward":
        text += (f" The scaled gradient exceeds {o.low}'s range: a lower loss scale (or dynamic "
                 "scaling) avoids it")
        text += (f", or keep `{o.module}` in FP32 (Policy(keep_fp32_modules=['{o.module}']))."
                 if o.module else ".")
    elif o.phase == "forward" and o.module:
        text += (f" Keep `{o.module}` in FP32 (Policy(keep_fp32_modules=['{o.module}'])) or "
                 "rescale its inputs.")
    return text


def _short(source: str) -> str:
    """"model.py:42  return x * 3e4" -> "model.py:42 `return x * 3e4`"."""
    loc, _, code = source.partition("  ")
    return f"{loc} `{code.strip()}`" if code.strip() else loc


def _info(name: str, t: torch.Tensor) -> TensorInfo:
    if t.is_floating_point() and t.numel():
        a = t.detach().abs()
        n_nan = int(torch.isnan(a).sum())
        n_inf = int(torch.isinf(a).sum())
        amax = float(a.max()) if not n_nan else float(a[~torch.isnan(a)].max()) \
            if n_nan < a.numel() else math.nan
    else:
        n_nan = n_inf = 0
        amax = float(t.detach().abs().max()) if t.numel() and t.dtype != torch.bool else 0.0
    return TensorInfo(name, dtype_name(t.dtype), tuple(t.shape), amax, n_inf, n_nan)


def _nonfinite(ts: list[torch.Tensor]) -> tuple[bool, bool]:
    """(any NaN, any inf) among the floating tensors."""
    nan = any(bool(torch.isnan(t).any()) for t in ts if t.is_floating_point())
    inf = any(bool(torch.isinf(t).any()) for t in ts if t.is_floating_point())
    return nan, inf


def _phase(n: fx.Node) -> str:
    from ..train.provenance import PHASES

    rec = n.meta.get(MP)
    if n.op == "placeholder":
        return "inputs"
    if rec is None:
        return "forward"
    return rec.created_by if rec.created_by in PHASES else "forward"


class _Found(Exception):
    def __init__(self, overflow: Overflow):
        super().__init__(overflow.node)
        self.overflow = overflow


class _Finder(fx.Interpreter):
    """Runs the step graph and stops at the first node that creates an inf or NaN."""

    def __init__(self, gm: fx.GraphModule, loss_scale: float, low: str):
        super().__init__(gm)
        self._scale, self._low = loss_scale, low

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "output":
            return out
        phase = _phase(n)
        if phase in BY_DESIGN:
            return out
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        out_nan, out_inf = _nonfinite(outs)
        if not (out_nan or out_inf):
            return out
        if n.op == "placeholder":
            raise _Found(self._overflow(n, phase, [], [], outs))
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        leaves = pytree.tree_leaves((args, kwargs))
        ins = [t for t in leaves if isinstance(t, torch.Tensor)]
        scalars = [float(x) for x in leaves
                   if isinstance(x, (int, float)) and not isinstance(x, bool)]
        in_nan, in_inf = _nonfinite(ins)
        in_nan |= any(math.isnan(x) for x in scalars)
        in_inf |= any(math.isinf(x) for x in scalars)
        if (out_nan and not in_nan) or (out_inf and not (in_nan or in_inf)):
            names = [a.name for a in pytree.tree_leaves((n.args, n.kwargs))
                     if isinstance(a, fx.Node)]
            raise _Found(self._overflow(n, phase, list(zip(names, ins)), scalars, outs))
        return out

    def _overflow(self, n: fx.Node, phase: str, ins: list, scalars: list,
                  outs: list) -> Overflow:
        rec = n.meta.get(MP)
        bad = next(t for t in outs if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        return Overflow(
            node=n.name, op="input" if n.op == "placeholder" else str(n.target), phase=phase,
            module=rec.module if rec else "", module_type=rec.module_type if rec else "",
            source=rec.source if rec else "",
            inputs=tuple(_info(name, t) for name, t in ins), scalars=tuple(scalars),
            output=_info(n.name, bad), loss_scale=self._scale, low=self._low)


def localize_overflow(step: Any, inputs: Any, targets: Any = None, *,
                      loss_scale: float | None = None) -> Overflow | None:
    """Re-run one step of ``step`` (a :class:`~mpcompile.TrainStep`) on this batch, node by
    node, on a copy of its state, and return the first node that produces an inf or NaN (an
    :class:`Overflow`), or None when the step would be clean. The step's state is not changed.

    ``loss_scale``: the scale to re-run at (default: the step's current scale). A skipped step
    has already lowered a dynamic scale, so to explain it pass the scale that step ran at.
    A data-parallel step is refused: its graph holds collectives, and a rank that stops at its
    first inf/NaN would leave the others waiting in them; localise on one process (a step
    compiled without torch.distributed) with the batch of the rank that overflowed."""
    from ..api import as_args, split_inputs, tensor_leaves
    from ..train.step import TrainStep, _batch_mismatch, batch_key, batch_signature

    if not isinstance(step, TrainStep):
        raise TrainStepError(f"localize_overflow needs a TrainStep (from compile_train_step), "
                             f"got {type(step).__name__}")
    if step.data_parallel is not None:
        raise TrainStepError(
            f"localize_overflow: this step is {step.data_parallel}; its graph holds collectives "
            "that every rank must reach, so it cannot stop at one rank's first inf/NaN. "
            "Compile the same step on one process (without torch.distributed) and localise "
            "there with the batch of the rank that overflowed")
    args, kwargs = split_inputs(inputs)
    tgts = as_args(targets)
    if batch_key(args, kwargs, tgts) != step.compiled.batch_key:
        given = batch_signature(args, kwargs, tgts)
        raise SignatureError(
            "localize_overflow: this batch does not match the example the step was compiled "
            f"for: {_batch_mismatch(step.compiled.batch_signature, given)}")
    state = [t.detach().clone() for t in step.state]
    i_scale = step.layout.index("scale")
    if loss_scale is not None:
        if not (isinstance(loss_scale, (int, float)) and math.isfinite(loss_scale)
                and loss_scale > 0):
            raise TrainStepError(f"loss_scale must be a positive finite number, got "
                                 f"{loss_scale!r}")
        state[i_scale] = torch.full_like(state[i_scale], float(loss_scale))
    dev = state[0].device
    lrs = [torch.tensor(x, dtype=torch.float64, device=dev) for x in step.learning_rates()]
    batch = [t.contiguous() for t in (*tensor_leaves(args, kwargs), *tgts)]
    scale = float(state[i_scale])
    finder = _Finder(step.graph_module, scale, dtype_name(step.dtype))
    try:
        with torch.no_grad():
            finder.run(*state, *lrs, *batch, *step.compiled.constants)
    except _Found as found:
        return found.overflow
    return None


__all__ = ["BY_DESIGN", "Overflow", "TensorInfo", "describe", "localize_overflow"]
