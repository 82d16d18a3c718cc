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
from ..dtypes import dtype_name, info
from ..fxutil import CAST, copy_module, is_getitem, replace_at
from ..records import MP, NodeRecord, record
from .context import Context


def _short(dtype: torch.dtype) -> str:
    return info(dtype).short if dtype.is_floating_point else "cast"


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
                                     name=f"{h.name}_{_short(need.dst)}")
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
