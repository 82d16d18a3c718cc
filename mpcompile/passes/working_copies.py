"""Parameters cast to low precision become low-precision *inputs* (training and export).

In the forward of ``convert`` each weight is cast from its FP32 master once per call. In the
training step the cast moves out of the forward (Micikevicius et al.: the FP32 master is rounded
to FP16 once, after the update, and the FP16 copy is used by the next forward and backward): the
cast node ``p -> p_f16`` becomes a new placeholder ``w_<p>`` fed with the working copy, bound as
``BindingKind.WORKING``. A parameter that is also used in FP32 (norm weights, pinned modules)
keeps its FP32 placeholder for those uses. The forward export uses the same pass: the working
copies become low-precision initializers.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from ..capture import Binding, BindingKind
from ..dtypes import dtype_name
from ..fxutil import copy_module, is_cast
from ..records import record, update
from .base import PassResult
from .context import Context


def run(gm: fx.GraphModule, ctx: Context) -> PassResult:
    gm = copy_module(gm)
    g, low = gm.graph, ctx.low
    placeholders = list(g.find_nodes(op="placeholder"))
    new_inputs = list(ctx.inputs)
    last = placeholders[-1]
    for node, b in zip(placeholders, ctx.inputs):
        if b.kind is not BindingKind.PARAM:
            continue
        casts = [u for u in node.users if is_cast(u) and record(u).created_by == "casts"
                 and u.kwargs.get("dtype") == low]
        if not casts:
            continue
        (cast,) = casts  # cleanup leaves one cast per (tensor, dtype)
        with g.inserting_after(last):
            w = g.placeholder(f"w_{node.name.removeprefix('p_')}")
        last = w
        w.meta.update(cast.meta)
        update(w, created_by="working_copies", precision=low, decided_by="working copy",
               decision=f"the {dtype_name(low)} working copy of parameter {b.target}, cast from "
                        "its FP32 master after each update (not inside the forward)")
        cast.replace_all_uses_with(w)
        g.erase_node(cast)
        new_inputs.append(Binding(BindingKind.WORKING, b.target))
    gm.recompile()
    return PassResult(gm, dataclasses.replace(ctx, inputs=tuple(new_inputs)))


def working(ctx: Context) -> tuple[str, ...]:
    """FQNs of the parameters that have a low-precision working copy input."""
    return tuple(b.target for b in ctx.inputs if b.kind is BindingKind.WORKING)
