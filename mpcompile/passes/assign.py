"""Stage 2: the precision of every op node.

LOWER ops are low precision, FP32 ops (and ops the table does not know, and ops in modules pinned
by ``keep_fp32_modules``) are float32. FOLLOW, PASSTHROUGH and (proven) FP32_ACCUM ops are *free*:

- ``strategy="mincut"`` chooses all free labels at once to minimise the bytes moved by casts, as a
  minimum s-t cut (see ``ARCHITECTURE.md``, "Precision assignment as a minimum cut"); among
  assignments with the fewest cast bytes it prefers low precision, weighted by the float32 traffic
  each op would avoid;
- ``strategy="local"`` walks the graph in order and gives each free op float32 if any input is
  float32, else the low dtype (autocast's type promotion); ops with no float input are float32.

A free op whose kernel rejects the low dtype (found by fake execution) or whose scalar argument
does not fit in it (``finfo(float32).min`` as a mask value) is fixed to float32. So is a free op
whose *backward* reduces a trainable parameter's gradient: one that broadcasts the parameter
(``x + pos_embedding``, ``cls_token.expand(B, ...)``) sums its gradient over the broadcast, and an
embedding lookup accumulates it over repeated rows. In low precision that sum of S-scaled terms
overflows FP16 (or drops BF16's few bits) even when the forward value is small; autocast keeps
such parameters FP32 by type promotion, and so do we.
"""

from __future__ import annotations

import itertools

import networkx as nx
import torch
import torch.fx as fx

from ..capture import BindingKind
from ..costmodel import F32, CastModel, ProbeError
from ..dtypes import dtype_name
from ..fxutil import arg_slots, copy_module, is_cast, is_getitem, numel, val_dtype
from ..policy import OpClass
from ..records import record, update
from .context import Context

_S, _T = ("terminal", "low"), ("terminal", "fp32")
_FREE = (OpClass.FOLLOW, OpClass.PASSTHROUGH, OpClass.FP32_ACCUM)
aten = torch.ops.aten
# pure views: the same elements (their backward reduces nothing)
_VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                    aten.squeeze.default, aten.permute.default, aten.t.default,
                    aten.transpose.int, aten.alias.default, aten.clone.default})
# gathers: their backward accumulates into the rows they read
_GATHERS = frozenset({aten.embedding.default, aten.index_select.default, aten.index.Tensor})


def run(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    gm = copy_module(gm)
    model = CastModel(gm, ctx.low)
    fixed, free = fix(gm, model, ctx)
    labels = {n: d for n, (d, _, _) in fixed.items()}
    for n, (d, by, why) in fixed.items():
        update(n, precision=d, decided_by=by, decision=why)
    if ctx.policy.strategy == "local":
        chosen = local(gm, model, free, labels)
        labels.update(chosen)
        for n in free:
            update(n, precision=labels[n], decided_by="local",
                   decision=_local_reason(model, n, labels))
    else:
        chosen = mincut(model, free, labels)
        labels.update(chosen)
        for n in free:
            update(n, precision=labels[n], decided_by="mincut",
                   decision=_mincut_reason(model, n, labels))
    return gm


def fix(gm: fx.GraphModule, model: CastModel, ctx: Context):
    """(fixed: node -> (dtype, decided_by, why), free: [node]) for every op node."""
    low = ctx.low
    fixed: dict[fx.Node, tuple[torch.dtype, str, str]] = {}
    free: list[fx.Node] = []
    trainable = _trainable(gm, ctx)
    for n in gm.graph.nodes:
        if n.op != "call_function" or is_getitem(n):
            continue
        rec = record(n)
        if not model.float_relevant(n):
            update(n, precision=None, decided_by="no float",
                   decision="reads and writes no floating-point tensor")
            continue
        if is_cast(n) and val_dtype(n) is not F32:
            fixed[n] = (val_dtype(n), "model", f"explicit cast to {dtype_name(val_dtype(n))} "
                        "written in the model: kept")
        elif low is F32:
            fixed[n] = (F32, "policy", "Policy(dtype=torch.float32): no low precision")
        elif rec.pin is not None:
            fixed[n] = (F32, "pin", f"pinned to FP32 by keep_fp32_modules {rec.pin}")
        elif rec.op_class is OpClass.LOWER:
            try:
                model.probe(n, low)
                fixed[n] = (low, "class", f"LOWER: {rec.class_reason}")
            except ProbeError as e:
                fixed[n] = (F32, "probe", f"LOWER, but {e}; runs in FP32")
        elif rec.op_class in _FREE and (why := _reduces_gradient(n, trainable)):
            fixed[n] = (F32, "backward", f"{rec.op_class}, but {why}: in {dtype_name(low)} that "
                        "sum can overflow or lose the small terms, so it runs in FP32 (as "
                        "torch.autocast's type promotion does)")
        elif rec.op_class in _FREE:
            try:
                model.probe(n, low)
                free.append(n)
            except ProbeError as e:
                fixed[n] = (F32, "probe", f"{rec.op_class}, but {e}; runs in FP32")
        else:
            fixed[n] = (F32, "class", f"{rec.op_class}: {rec.class_reason}")
    return fixed, free


def _trainable(gm: fx.GraphModule, ctx: Context) -> dict[fx.Node, str]:
    """Placeholder -> FQN of every parameter that requires grad."""
    out = {}
    for node, b in zip(gm.graph.find_nodes(op="placeholder"), ctx.inputs):
        if b.kind is BindingKind.PARAM and ctx.model is not None:
            try:
                if ctx.model.get_parameter(b.target).requires_grad:
                    out[node] = b.target
            except AttributeError:
                continue
    return out


def _part_of_a_matmul(n: fx.Node) -> bool:
    """A weight expanded for a batched matmul, or a bias added to a matmul's output (views
    between them allowed): the pieces of a ``linear`` that capture decomposed. Like autocast's
    linear (FP16 weight and bias gradients) they keep their low precision here."""

    def consumers(x: fx.Node) -> list[fx.Node]:
        out = []
        for u in x.users:
            out += consumers(u) if u.op == "call_function" and u.target in _VIEWS else [u]
        return out

    def producer(x: fx.Node) -> fx.Node:
        while x.op == "call_function" and x.target in _VIEWS:
            x = x.args[0]
        return x

    uses = consumers(n)
    if n.target is aten.expand.default and uses and all(
            u.op == "call_function" and record(u).op_class is OpClass.LOWER for u in uses):
        return True
    return any(producer(a).op == "call_function" and record(producer(a)).op_class is
               OpClass.LOWER for _, _, a in arg_slots(n))


def _reduces_gradient(n: fx.Node, trainable: dict[fx.Node, str]) -> str | None:
    """Why ``n``'s backward reduces a trainable parameter's gradient, or None."""
    if _part_of_a_matmul(n):
        return None
    for _, _, a in arg_slots(n):
        src = a
        while src.op == "call_function" and src.target in _VIEWS and numel(src) == numel(a):
            src = src.args[0]
        fqn = trainable.get(src)
        if fqn is None:
            continue
        if n.target in _GATHERS and a is n.args[0]:
            return f"its backward accumulates the gradient of parameter {fqn} over the rows it " \
                   "gathers"
        if numel(n) > numel(src):
            return (f"its backward sums the gradient of parameter {fqn} over its broadcast "
                    f"({numel(n) // max(numel(src), 1)} terms per element)")
    return None


# --- global: minimum s-t cut ---------------------------------------------------------------


def mincut(model: CastModel, free: list[fx.Node], fixed: dict) -> dict[fx.Node, torch.dtype]:
    """Labels for the free nodes minimising (cast bytes, then float32 traffic), exactly."""
    if not free:
        return {}
    low = model.low
    free_set = set(free)
    prefs = {v: model.traffic_saved(v) for v in free}
    big = 1 + sum(prefs.values())  # cast bytes dominate; preference only breaks ties
    g = nx.DiGraph()
    g.add_nodes_from((_S, _T))
    aux = itertools.count()
    for h in model.handles:
        if model.captured[h] is not F32:
            continue
        members, ends = _hyperedge(model, h, free_set, fixed)
        cost = h.meta["val"].numel() * (low.itemsize + F32.itemsize) * big
        if cost:
            _potts(g, members, ends, cost, aux)
    for v, p in prefs.items():
        if p:
            _add(g, _S, v, p)
    _, (s_side, _) = nx.minimum_cut(g, _S, _T)
    return {v: low if (v in s_side or v not in g) else F32 for v in free}


def _hyperedge(model: CastModel, h: fx.Node, free: set, fixed: dict):
    """The free nodes whose label decides whether ``h`` needs a cast, and the terminals (dtypes
    fixed regardless of the free labels) in the same hyperedge."""
    low = model.low
    members: set[fx.Node] = set()
    ends: set = set()
    p, idx = model.producer[h]
    if p in free:
        d_low = model.probe(p, low)[idx]
        if d_low is low:
            members.add(p)
        else:
            ends.add(d_low)
    else:
        ends.add(model.dtype_of(h, fixed))
    for use in model.uses[h]:
        c = use.node
        if c in free:
            r_low = model.requirement(use, h, {c: low})
            r_f32 = model.requirement(use, h, {c: F32})
            if r_low != r_f32:
                members.add(c)
            elif r_low is not None:
                ends.add(r_low)
        else:
            r = model.requirement(use, h, fixed)
            if r is not None:
                ends.add(r)
    return members, {_S if d is low else _T for d in ends if d in (low, F32)}


def _add(g: nx.DiGraph, a, b, cap=None) -> None:
    """Add capacity ``cap`` (None: infinite) to edge a->b."""
    if g.has_edge(a, b):
        data = g[a][b]
        if cap is None or "capacity" not in data:
            data.pop("capacity", None)
        else:
            data["capacity"] += cap
    elif cap is None:
        g.add_edge(a, b)
    else:
        g.add_edge(a, b, capacity=cap)


def _potts(g: nx.DiGraph, members: set, ends: set, cost: int, aux) -> None:
    """Cost ``cost`` unless every member and terminal is on one side (one cast per tensor and
    dtype, however many consumers need it): a hyperedge made of two auxiliary nodes.

    [not all equal] = [some member on the fp32 side] + [some member on the low side] - 1, and
    each bracket is one auxiliary node: s -(cost)-> u -(inf)-> members, and
    members -(inf)-> w -(cost)-> t."""
    if not members or (_S in ends and _T in ends):
        return  # nothing to decide, or a cast whatever the labels (a constant)
    if _T in ends:  # cost if any member is low
        w = ("aux", next(aux))
        for m in members:
            _add(g, m, w)
        _add(g, w, _T, cost)
    elif _S in ends:  # cost if any member is fp32
        u = ("aux", next(aux))
        _add(g, _S, u, cost)
        for m in members:
            _add(g, u, m)
    elif len(members) == 2:
        a, b = members
        _add(g, a, b, cost)
        _add(g, b, a, cost)
    elif len(members) > 2:
        u, w = ("aux", next(aux)), ("aux", next(aux))
        _add(g, _S, u, cost)
        _add(g, w, _T, cost)
        for m in members:
            _add(g, u, m)
            _add(g, m, w)


def _mincut_reason(model: CastModel, n: fx.Node, labels: dict) -> str:
    here, there = labels[n], (F32 if labels[n] is not F32 else model.low)
    hs = model.touching(n)
    cost_here = model.cast_bytes(labels, hs)
    cost_there = model.cast_bytes({**labels, n: there}, hs)
    rec = record(n)
    text = (f"{rec.op_class} op; min-cut chose {dtype_name(here)}: with every other decision "
            f"held, the casts at this node move {cost_here:,} B as {dtype_name(here)} and "
            f"{cost_there:,} B as {dtype_name(there)}")
    if cost_here == cost_there and here is model.low:
        text += (f"; a tie, so low precision wins (saves {model.traffic_saved(n):,} B of "
                 "float32 traffic)")
    return text


# --- local: autocast-like type promotion ----------------------------------------------------


def local(gm: fx.GraphModule, model: CastModel, free: list[fx.Node], fixed: dict) -> dict:
    labels = dict(fixed)
    free_set = set(free)
    for n in gm.graph.nodes:
        if n not in free_set:
            continue
        seen = _input_dtypes(model, n, labels)
        labels[n] = F32 if (F32 in seen or not seen) else model.low
    return {n: labels[n] for n in free}


def _input_dtypes(model: CastModel, n: fx.Node, labels: dict) -> set:
    out = set()
    for use, h in model.inputs(n):
        if model.captured[h] is not F32 or use.slot in record(n).fp32_args or is_cast(n):
            continue
        out.add(model.dtype_of(h, labels))
    return out


def _local_reason(model: CastModel, n: fx.Node, labels: dict) -> str:
    seen = _input_dtypes(model, n, labels)
    if not seen:
        return "local strategy: no float input, so float32 (as torch creates tensors)"
    names = ", ".join(sorted(dtype_name(d) for d in seen))
    return f"local strategy: inputs are {names}, so {dtype_name(labels[n])}"
