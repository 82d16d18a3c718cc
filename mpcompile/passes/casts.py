"""Stage 3: make the graph compute in the assigned precisions.

For every floating-point tensor and every dtype its consumers need other than its own, one
``aten._to_copy`` right after the producer (casts of parameters and inputs go right after the
placeholders: each weight is cast once per call, however many ops use it). Creation ops and the
model's own casts assigned a low precision get their ``dtype`` argument changed instead of a cast
after them. The casts are exactly those the cost model of the assignment counted.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..costmodel import F32, CastModel, retargeted
from ..errors import PassError
from ..meta import (
    CAST,
    MP,
    NodeRecord,
    arg_slots,
    copy_module,
    dtype_name,
    is_cast,
    is_getitem,
    record,
    replace_at,
    val_dtype,
)
from ..policy import OpClass
from .context import Context

_SHORT = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32",
          torch.float64: "f64"}


def run(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    gm = copy_module(gm)
    model = CastModel(gm, ctx.low)
    labels = {n: record(n).precision for n in gm.graph.nodes
              if n.op == "call_function" and not is_getitem(n) and record(n).precision}
    needs = model.casts(labels)  # computed before the graph changes
    for n, d in labels.items():
        if d is not F32:
            rt = retargeted(n, d)
            if rt is not None:
                n.args, n.kwargs = rt
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    anchor_for_inputs = placeholders[-1] if placeholders else None
    for need in needs:
        h = need.handle
        anchor = anchor_for_inputs if h.op == "placeholder" else h
        with gm.graph.inserting_after(anchor):
            c = gm.graph.create_node("call_function", CAST, (h,), {"dtype": need.dst},
                                     name=f"{h.name}_{_SHORT.get(need.dst, 'cast')}")
        users = sorted({u.node.name if u.node.op != "output" else "output" for u in need.uses})
        src = record(h)
        c.meta[MP] = NodeRecord(
            "casts", module=src.module, module_type=src.module_type, source=src.source,
            precision=need.dst, decided_by="cast",
            decision=f"casts {h.name} from {dtype_name(need.src)} to {dtype_name(need.dst)} "
                     f"({need.bytes:,} B per call) for {', '.join(users)}",
        )
        for use in need.uses:
            replace_at(use.node, use.path, c)
    return gm


def check_precisions(gm: fx.GraphModule, stage: str) -> None:
    """Every op sees its inputs in the precision it was assigned (norm weights and running
    statistics in FP32); LOWER ops see low precision; FP32 ops see float32."""
    for n in gm.graph.nodes:
        if n.op != "call_function" or is_getitem(n) or is_cast(n):
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
            kind = rec.op_class
            raise PassError(
                f"after stage '{stage}': {kind} node {n.name} ({n.target}) was assigned "
                f"{dtype_name(rec.precision)} but its argument '{slot}' ({a.name}) is "
                f"{dtype_name(d)}"
            )
        if rec.op_class is OpClass.LOWER and rec.pin is None and rec.decided_by == "class":
            if rec.precision is F32:
                raise PassError(f"after stage '{stage}': LOWER node {n.name} runs in float32")
