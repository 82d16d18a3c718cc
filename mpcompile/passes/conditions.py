"""The conditions passes require and ensure (see ``base.Pass``): each a small check that raises
naming the stage and the node at fault."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..dtypes import dtype_name
from ..errors import PassError
from ..fxutil import arg_slots, is_cast, is_getitem, val_dtype
from ..policy import OpClass
from ..records import record
from .base import Condition
from .context import Context

F32 = torch.float32


def _ops(gm: fx.GraphModule):
    return [n for n in gm.graph.nodes if n.op == "call_function" and not is_getitem(n)]


def _classified(gm: fx.GraphModule, ctx: Context, stage: str) -> None:
    for n in _ops(gm):
        if record(n).op_class is None and record(n).created_by == "capture":
            raise PassError(f"at stage '{stage}': node {n.name} ({n.target}) has no op class")


def _assigned(gm: fx.GraphModule, ctx: Context, stage: str) -> None:
    for n in _ops(gm):
        if not record(n).decided_by:
            raise PassError(f"at stage '{stage}': node {n.name} ({n.target}) has no precision "
                            "decision")


def _precisions_applied(gm: fx.GraphModule, ctx: Context, stage: str) -> None:
    """Every op sees its inputs in the precision it was assigned (norm weights and running
    statistics in FP32); LOWER ops see low precision; FP32 ops see float32."""
    for n in _ops(gm):
        if is_cast(n):
            continue
        rec = record(n)
        if rec.precision is None:
            continue
        for _, slot, a in arg_slots(n):
            d = val_dtype(a)
            if d is None or not d.is_floating_point:
                continue
            want = F32 if slot in rec.fp32_args else rec.precision
            if d is want or d not in (F32, rec.precision, want):
                continue  # a tensor the model itself keeps in another float dtype
            raise PassError(
                f"after stage '{stage}': {rec.op_class} node {n.name} ({n.target}) was assigned "
                f"{dtype_name(rec.precision)} but its argument '{slot}' ({a.name}) is "
                f"{dtype_name(d)}"
            )
        if rec.op_class is OpClass.LOWER and rec.pin is None and rec.decided_by == "class":
            if rec.precision is F32:
                raise PassError(f"after stage '{stage}': LOWER node {n.name} runs in float32")


CLASSIFIED = Condition("classified", _classified)
"""every op the model wrote has a precision class (table, user override, pin)"""
ASSIGNED = Condition("assigned", _assigned)
"""every op has a precision and the reason for it"""
PRECISIONS_APPLIED = Condition("precisions_applied", _precisions_applied)
"""every op reads its inputs in its assigned precision (FP32 for its fp32_args)"""

__all__ = ["ASSIGNED", "CLASSIFIED", "PRECISIONS_APPLIED"]
