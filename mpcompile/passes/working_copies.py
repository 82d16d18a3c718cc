"""Training stage: parameters cast to low precision become low-precision *inputs*.

In the forward of ``convert`` each weight is cast from its FP32 master once per call. In the
training step the cast moves out of the forward (Micikevicius et al.: the FP32 master is rounded
to FP16 once, after the update, and the FP16 copy is used by the next forward and backward): the
cast node ``p -> p_f16`` becomes a new placeholder ``w_<p>`` fed with the working copy. A
parameter that is also used in FP32 (norm weights, pinned modules) keeps its FP32 placeholder for
those uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..capture import Binding
from ..meta import copy_module, is_cast, record, update


@dataclass(frozen=True)
class WorkingCopies:
    gm: fx.GraphModule
    inputs: tuple[Binding, ...]  # the original bindings, then ("working", fqn) per new input
    working: tuple[str, ...]  # FQNs of parameters that have a low-precision working copy


def run(gm: fx.GraphModule, inputs: tuple[Binding, ...], low: torch.dtype) -> WorkingCopies:
    gm = copy_module(gm)
    g = gm.graph
    placeholders = list(g.find_nodes(op="placeholder"))
    new_inputs = list(inputs)
    working = []
    last = placeholders[-1]
    for node, b in zip(placeholders, inputs):
        if b.kind != "param":
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
               decision=f"the {str(low).removeprefix('torch.')} working copy of parameter "
                        f"{b.target}, cast from its FP32 master after each update (not inside "
                        "the forward)")
        cast.replace_all_uses_with(w)
        g.erase_node(cast)
        new_inputs.append(Binding("working", b.target))
        working.append(b.target)
    gm.recompile()
    return WorkingCopies(gm, tuple(new_inputs), tuple(working))
