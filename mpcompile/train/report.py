"""What the training graph adds to the forward's report: nodes by phase, update nodes per
parameter, casts, the backward's matmul precisions, generated kernels, the state's bytes."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..dtypes import dtype_name
from ..fxutil import is_cast, is_getitem, val_dtype
from ..records import record
from ..report import kernel_infos
from .provenance import PHASES

F32 = torch.float32

# phases a data-parallel step adds (traced by distributed.py), and where they go in the order
_DP_PHASES = {"grad_all_reduce": "backward", "buffer_broadcast": "update"}

@dataclass(frozen=True)
class TrainReport:
    """The core report of the forward plus what the training graph adds."""

    forward: Any  # inspect.Report
    kernels: tuple  # report.KernelInfo of the graph that runs
    nodes_by_phase: dict[str, int]
    ops_by_phase: dict[str, dict[str, int]]
    updates_per_param: dict[str, int]
    casts: dict[str, int]  # phase -> cast nodes
    fp32_state_bytes: int
    low_state_bytes: int
    state_bytes_by_kind: dict[str, int]
    backward_precision: dict[str, dict[str, int]] = field(default_factory=dict)
    execution: str = ""  # which backend runs the step, why, compile time (backends.Status)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["forward"] = self.forward.as_dict()
        return d

    def __str__(self) -> str:
        return f"{self.forward}\n\n{self.training_text()}"

    def training_text(self) -> str:
        """Only what the training graph adds to the forward report."""
        lines = [f"training step runs on: {self.execution}"] if self.execution else []
        lines.append("training graph, nodes by phase:")
        for ph, n in self.nodes_by_phase.items():
            lines.append(f"  {ph:<14}{n:>6}   " + ", ".join(
                f"{op.removeprefix('aten.')}×{k}" for op, k in
                sorted(self.ops_by_phase[ph].items(), key=lambda kv: -kv[1])[:6]))
        lines.append("casts in the training graph: " + ", ".join(
            f"{ph} {n}" for ph, n in self.casts.items()))
        lines.append("backward ops by precision: " + ", ".join(
            f"{op.removeprefix('aten.')}: " + "/".join(f"{k} {v}" for k, v in d.items())
            for op, d in self.backward_precision.items()))
        per = self.updates_per_param.values()
        lines.append(f"update nodes per parameter: min {min(per, default=0)}, max "
                     f"{max(per, default=0)} ({len(per)} parameters)")
        if self.kernels:
            lines.append(f"generated kernels in the training graph: {len(self.kernels)}")
            lines += [f"  {k}" for k in self.kernels]
        lines.append(f"state: {self.fp32_state_bytes:,} B in FP32, {self.low_state_bytes:,} B in "
                     "low precision (" + ", ".join(f"{k} {v:,} B" for k, v in
                                                   self.state_bytes_by_kind.items()) + ")")
        return "\n".join(lines)


_DOT_OPS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default",
            "aten.convolution_backward.default", "aten.convolution.default"}


def build_train_report(step, forward_report) -> TrainReport:
    """The report of a :class:`TrainStep`: its forward's report plus the training graph."""
    by_phase: Counter = Counter()
    ops: dict = defaultdict(Counter)
    per_param: Counter = Counter()
    casts: Counter = Counter()
    bwd: dict = defaultdict(Counter)
    for n in step.graph_module.graph.nodes:
        if n.op != "call_function" or is_getitem(n):
            continue
        rec = record(n)
        ph = rec.created_by if rec.created_by in PHASES or rec.created_by in _DP_PHASES \
            else "forward"
        by_phase[ph] += 1
        ops[ph][str(n.target)] += 1
        if is_cast(n):
            casts[ph] += 1
        if ph == "update" and rec.subject in step.plan.group_of:
            per_param[rec.subject] += 1
        if ph == "backward" and str(n.target) in _DOT_OPS:
            ins = {dtype_name(val_dtype(a)) for a in n.args if isinstance(a, fx.Node)
                   and val_dtype(a) is not None and val_dtype(a).is_floating_point}
            bwd[str(n.target)]["/".join(sorted(ins))] += 1
    fp32 = low = 0
    for t in step.state:
        nbytes = t.numel() * t.element_size()
        if t.dtype == step.dtype and t.dtype is not F32:
            low += nbytes
        elif t.dtype is F32:
            fp32 += nbytes
    order = ["forward"]
    for ph in PHASES:
        order += [ph, *(d for d, after in _DP_PHASES.items() if after == ph)]
    return TrainReport(
        forward=forward_report, kernels=kernel_infos(step.executable),
        nodes_by_phase={k: by_phase[k] for k in order if by_phase[k]},
        ops_by_phase={k: dict(v) for k, v in ops.items()},
        updates_per_param=dict(per_param), casts=dict(casts), fp32_state_bytes=fp32,
        low_state_bytes=low, state_bytes_by_kind=step.state_bytes(),
        backward_precision={k: dict(v) for k, v in bwd.items()},
        execution=str(step.execution) + (f"; {step.data_parallel}" if step.data_parallel
                                         else ""),
    )
