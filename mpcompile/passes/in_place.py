"""State in place: the training step stores its new state into its state inputs.

The step graph (``TrainStep.graph_module``) is a pure function: state in, new state out (what
export and the reports read). The graph that runs instead ends with one ``aten.copy_`` per state
entry, from the new value into the state input, and returns only the loss, scale, skip flag
(and norm). Inductor turns those copies into stores inside the loops that compute the values
(the master update, its gate and the new working copy become one loop over the parameter); run
eagerly, the copies keep every state tensor's storage across steps. Either way no state-sized
tensor outlives a step.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import PassError
from ..fxutil import val_dtype
from ..records import MP, NodeRecord, record
from .context import Context

aten = torch.ops.aten


def run(gm: fx.GraphModule, ctx: Context, n_state: int) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    outs = g.graph_copy(gm.graph, env)
    phs = list(g.find_nodes(op="placeholder"))
    if not isinstance(outs, (tuple, list)) or len(outs) < n_state or len(phs) < n_state:
        raise PassError(f"state_in_place: the step graph has {len(phs)} inputs and returns "
                        f"{len(outs) if isinstance(outs, (tuple, list)) else 1} values; "
                        f"expected {n_state} state entries first in both")
    state = set(phs[:n_state])
    for i in range(n_state):
        new, dst = outs[i], phs[i]
        if new is dst:
            continue  # unchanged (e.g. a buffer the forward never updates)
        if new in state:
            # another entry's old value: copy it before that entry is overwritten
            with g.inserting_before(g.find_nodes(op="placeholder")[-1].next):
                new = g.call_function(aten.clone.default, (new,))
                new.meta[MP] = NodeRecord("state_in_place", precision=val_dtype(outs[i]),
                                          decided_by="state_in_place",
                                          decision="the old value, kept before the state "
                                                   "it comes from is overwritten")
        node = g.call_function(aten.copy_.default, (dst, new))
        name = record(dst).decision.removeprefix("step input: state ")
        node.meta[MP] = NodeRecord("state_in_place", precision=val_dtype(dst),
                                   decided_by="state_in_place", subject=name,
                                   decision="the new value stored into the state input (the "
                                            "state is updated in place)")
    out = g.output(tuple(outs[n_state:]))
    out.meta[MP] = NodeRecord("state_in_place")
    return fx.GraphModule(gm, g)
