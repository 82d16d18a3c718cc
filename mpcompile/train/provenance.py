"""Provenance of the training graph: what each phase is, how traced nodes learn their phase,
and the records every node of the finished step graph carries.

Nodes traced inside ``with phase(name, subject=...)`` carry ``{"mp_phase": ...}`` in
``node.meta["custom"]``; forward nodes carry the name of the forward node they replay
(``mp_name``); backward nodes the sequence number of the forward op they differentiate
(autograd-node hooks, as aot_autograd does for stack traces). :func:`finish` turns those into
``NodeRecord``s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback

from ..fxutil import val_dtype
from ..records import MP, NodeRecord

# what each training phase is, for explain()
PHASES = {
    "inputs": "prepares the step's inputs",
    "loss": "the loss, computed in FP32 on the model's FP32 outputs",
    "loss_scale": "multiplies the loss by the loss scale S before backward, so small gradients "
                  "stay representable in FP16",
    "backward": "backward, derived by autograd from the mixed-precision forward",
    "grad_all_reduce": "averages the gradients over the data-parallel ranks: flat buffers by "
                       "dtype, divided by the world size, one functional all_reduce (sum) per "
                       "bucket, before unscale (as DDP + GradScaler)",
    "grad_reduce_scatter": "sharded FP32 state (ZeRO-1): the gradients of the sharded "
                           "parameters, flat buckets divided by the world size, one functional "
                           "reduce_scatter (sum) per bucket: this rank's slice, before unscale",
    "working_all_gather": "sharded FP32 state (ZeRO-1): every rank's slice of the new "
                          "low-precision working copies, one functional all_gather per bucket",
    "buffer_broadcast": "the new buffers are rank 0's on every rank (DDP's broadcast_buffers)",
    "unscale": "casts a gradient to FP32 and divides it by S, right after backward",
    "found_inf": "checks every unscaled gradient for inf/NaN (the skip decision, in the graph: "
                 "no host sync)",
    "clip": "clips the unscaled gradients to max_grad_norm (after unscaling, before the "
            "optimizer)",
    "grad_stats": "counts the zero and the non-finite elements of the unscaled gradients per "
                  "param group (grad_stats=True): silent underflow made visible, read when the "
                  "caller reads them",
    "update": "the optimizer's update, on the FP32 master and FP32 optimizer state",
    "gate": "keeps the old value when found_inf is set: a skipped step leaves every piece of "
            "state bit-identical",
    "working_copy": "rounds the new FP32 master to the low-precision working copy the next "
                    "forward uses",
    "scale_update": "dynamic loss scale: backoff on overflow, growth after growth_interval clean "
                    "steps",
    "outputs": "the step's reported values",
}


@contextlib.contextmanager
def phase(name: str, **info: Any):
    """Annotate the nodes traced inside with ``{"mp_phase": name, ...}`` (node.meta["custom"])."""
    saved = fx_traceback.current_meta.get("custom")
    fx_traceback.current_meta["custom"] = {"mp_phase": name, **info}
    try:
        yield
    finally:
        if saved is None:
            fx_traceback.current_meta.pop("custom", None)
        else:
            fx_traceback.current_meta["custom"] = saved


def hook_backward(root) -> list:
    """Tag the nodes each autograd node emits with the sequence number of the forward op it
    differentiates; returns the hook handles (remove them after backward)."""
    handles, seen, stack = [], set(), [root]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        seq = fn._sequence_nr()

        def pre(_grads, seq=seq):
            fx_traceback.current_meta["custom"] = {"mp_phase": "backward", "mp_of": seq}

        def post(_gi, _go):
            fx_traceback.current_meta["custom"] = {"mp_phase": "backward"}

        handles += [fn.register_prehook(pre), fn.register_hook(post)]
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return handles


def mark_forward(gm: fx.GraphModule) -> None:
    """Name every node in its custom meta: the name survives re-tracing the forward inside the
    step, so traced nodes find their forward record again."""
    for n in gm.graph.nodes:
        n.meta["custom"] = {"mp_name": n.name}


def finish(gm: fx.GraphModule, fwd: fx.GraphModule,
           inputs: Sequence[tuple[str, str]]) -> fx.GraphModule:
    """Drop autograd's no-op detaches, name the inputs (``inputs``: (role, name) per
    placeholder), and give every node its record."""
    g = gm.graph
    for n in list(g.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.detach.default:
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
    for node, (role, name) in zip(g.find_nodes(op="placeholder"), inputs):
        node._rename(name.replace(".", "_"))
        node.target = node.name
        node.meta[MP] = NodeRecord("train_step", precision=val_dtype(node), decided_by="input",
                                   decision=f"step input: {role} {name}")
    fwd_records = {n.name: n.meta[MP] for n in fwd.graph.nodes if MP in n.meta}
    seq_to_fwd: dict[int, str] = {}
    for n in g.nodes:
        c = n.meta.get("custom") or {}
        if "mp_name" in c and n.meta.get("seq_nr") is not None:
            seq_to_fwd.setdefault(n.meta["seq_nr"], c["mp_name"])
    for n in g.nodes:
        if n.op not in ("placeholder", "output"):
            n.meta[MP] = _record(n, fwd_records, seq_to_fwd)
    g.output_node().meta[MP] = NodeRecord("train_step")
    gm.recompile()
    return gm


def _record(n: fx.Node, fwd_records: dict, seq_to_fwd: dict) -> NodeRecord:
    c = n.meta.get("custom") or {}
    if "mp_name" in c and c["mp_name"] in fwd_records:
        return fwd_records[c["mp_name"]]
    ph = c.get("mp_phase", "inputs")
    if ph == "backward":
        of = seq_to_fwd.get(c.get("mp_of"))
        src = fwd_records.get(of)
        what = (f"gradient of forward node {of} ({src.module or '<model>'})" if src
                else "gradient accumulation/seed")
        return NodeRecord("backward", module=src.module if src else "",
                          module_type=src.module_type if src else "",
                          source=src.source if src else "", precision=val_dtype(n),
                          decided_by="autograd", decision=f"{what}: {PHASES['backward']}")
    detail = PHASES.get(ph, ph)
    subject = c.get("subject", "")
    if subject:
        detail = f"{detail} [{subject}" + (f", {c['spec']}]" if c.get("spec") else "]")
    return NodeRecord(ph, precision=val_dtype(n), decided_by=ph, decision=detail,
                      subject=subject)
