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
from ..records import MP, NodeRecord
from .context import Context

aten = torch.ops.aten


def run(gm: fx.GraphModule, ctx: Context, names: tuple[str, ...]) -> fx.GraphModule:
    """``names``: the state entries, the step's first inputs and first outputs in order."""
    n_state = len(names)
    g = fx.Graph()
    outs = g.graph_copy(gm.graph, {})
    phs = list(g.find_nodes(op="placeholder"))
    if not isinstance(outs, (tuple, list)) or len(outs) < n_state or len(phs) < n_state:
        raise PassError(f"state_in_place: the step graph has {len(phs)} inputs and returns "
                        f"{len(outs) if isinstance(outs, (tuple, list)) else 1} values; "
                        f"expected {n_state} state entries first in both")
    state = set(phs[:n_state])
    for name, new, dst in zip(names, outs, phs):
        if new is dst:
            continue  # unchanged (e.g. a buffer the forward never updates)
        if new in state:  # the copies run in order: it would read an overwritten value
            raise PassError(f"state_in_place: the new {name} is another state entry's input "
                            f"({new.name}); the step graph must compute it")
        node = g.call_function(aten.copy_.default, (dst, new))
        node.meta[MP] = NodeRecord("state_in_place", precision=val_dtype(dst),
                                   decided_by="state_in_place", subject=name,
                                   decision="the new value stored into the state input (the "
                                            "state is updated in place)")
    out = g.output(tuple(outs[n_state:]))
    out.meta[MP] = NodeRecord("state_in_place")
    return fx.GraphModule(gm, g)
