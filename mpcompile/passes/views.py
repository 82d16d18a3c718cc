"""Views as reshapes, before a graph is re-traced (the training step, export) or run.

``torch.export`` records ``view`` where the captured strides allowed it. Re-tracing the graph
(``make_fx`` of the step, with casts, working copies and autograd; or with the export
decompositions, whose attention returns other strides than the fused kernel) can hand the same
``view`` a tensor whose strides it cannot view, which fails the trace ("Cannot view a tensor
with shape [8, 16, 2, 16] and strides (512, 16, 256, 1) as (8, 16, 32)"); so can running the
graph, when a real kernel (a cast of a permuted tensor) returns other strides than fake-tensor
propagation predicted. ``reshape`` is a view when the strides allow and a copy when not, with the
same values: re-tracing (or running) decides again.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..fxutil import copy_module
from .context import Context

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default)


def run(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    gm = copy_module(gm)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _VIEWS:
            n.target = aten.reshape.default
    gm.recompile()
    return gm
