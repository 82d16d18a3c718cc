"""Golden-graph helpers: graphs compared as canonical lists, not by node names."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from mpcompile.api import compile_program
from mpcompile.fxutil import arg_slots, tensors_of
from mpcompile.policy import Policy
from mpcompile.records import MP, NodeRecord, record


def _op(n: fx.Node) -> str:
    if n.op == "placeholder":
        return "input"
    if n.target is operator.getitem:
        return "getitem"
    return str(n.target)


def _dt(n: fx.Node):
    ts = tensors_of(n.meta.get("val"))
    if isinstance(n.meta.get("val"), torch.Tensor):
        return str(ts[0].dtype).removeprefix("torch.")
    return tuple(str(t.dtype).removeprefix("torch.") if t is not None else None for t in ts)


def canonical(gm: fx.GraphModule) -> list[tuple]:
    """Sorted (op, output dtype, ((input op, input dtype), ...)) of every op node, plus the
    graph outputs' dtypes: equal for graphs that compute the same ops in the same dtypes on the
    same operands, whatever the node names and order."""
    rows = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            ins = tuple((_op(a), _dt(a)) for _, _, a in arg_slots(n))
            rows.append((_op(n), _dt(n), ins))
    outs = [(_op(a), _dt(a)) for _, _, a in arg_slots(gm.graph.output_node())]
    return sorted(rows, key=repr) + [("output", tuple(outs))]


def trace(fn, *inputs) -> fx.GraphModule:
    """An expected graph, written as a Python function of ATen calls."""
    return make_fx(fn)(*[t.detach() for t in inputs])


def stages(model: torch.nn.Module, *args, policy: Policy | None = None):
    return compile_program(model, args, {}, policy or Policy()).stages


def classes(gm: fx.GraphModule) -> list[tuple[str, str]]:
    return sorted((_op(n), str(record(n).op_class)) for n in gm.graph.nodes
                  if n.op == "call_function" and n.target is not operator.getitem)


def labels(gm: fx.GraphModule) -> list[tuple[str, str]]:
    return sorted((_op(n), str(record(n).precision).removeprefix("torch."))
                  for n in gm.graph.nodes
                  if n.op == "call_function" and n.target is not operator.getitem)


def stamp(gm: fx.GraphModule) -> fx.GraphModule:
    """Give a hand-made graph the provenance records the passes expect."""
    for n in gm.graph.nodes:
        n.meta.setdefault(MP, NodeRecord("test"))
    return gm
