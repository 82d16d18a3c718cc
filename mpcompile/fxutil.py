"""Small helpers over fx graphs: what a node's value is, its argument slots, copying a graph."""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
import torch.fx as fx

CAST = torch.ops.aten._to_copy.default


def is_float(dtype: torch.dtype | None) -> bool:
    return dtype is not None and dtype.is_floating_point


def tensors_of(val: object) -> list[torch.Tensor | None]:
    """The output slots of a node's value: one for a tensor, one per element of a tuple/list."""
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (tuple, list)):
        return [v if isinstance(v, torch.Tensor) else None for v in val]
    return []


def val_dtype(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def numel(node: fx.Node) -> int:
    val = node.meta.get("val")
    return int(val.numel()) if isinstance(val, torch.Tensor) else 0


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def is_cast(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is CAST


# --- argument slots --------------------------------------------------------------------------

ArgPath = tuple  # ("args", i) | ("args", i, j) | ("kwargs", name) | ("kwargs", name, j)


def arg_slots(node: fx.Node) -> Iterator[tuple[ArgPath, str, fx.Node]]:
    """(path, schema argument name, input node) for every node among ``node``'s arguments."""
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    if node.op == "output":
        outs = node.args[0]
        for i, a in enumerate(outs if isinstance(outs, (tuple, list)) else (outs,)):
            if isinstance(a, fx.Node):
                yield ("args", 0, i), f"output[{i}]", a
        return
    for i, a in enumerate(node.args):
        name = names[i] if i < len(names) else f"arg{i}"
        if isinstance(a, fx.Node):
            yield ("args", i), name, a
        elif isinstance(a, (tuple, list)):
            for j, b in enumerate(a):
                if isinstance(b, fx.Node):
                    yield ("args", i, j), name, b
    for k, a in node.kwargs.items():
        if isinstance(a, fx.Node):
            yield ("kwargs", k), k, a
        elif isinstance(a, (tuple, list)):
            for j, b in enumerate(a):
                if isinstance(b, fx.Node):
                    yield ("kwargs", k, j), k, b


def replace_at(node: fx.Node, path: ArgPath, new: fx.Node) -> None:
    """Replace the one argument of ``node`` at ``path`` with ``new``."""
    where, key, *rest = path
    container = list(node.args) if where == "args" else dict(node.kwargs)
    if node.op == "output":  # output's args[0] is the tuple of outputs
        outs = list(node.args[0])
        outs[rest[0]] = new
        node.args = (type(node.args[0])(outs),)
        return
    if rest:
        inner = list(container[key])
        inner[rest[0]] = new
        container[key] = type(container[key])(inner)
    else:
        container[key] = new
    if where == "args":
        node.args = tuple(container)
    else:
        node.kwargs = container


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (meta copied shallowly)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    old_out = gm.graph.output_node()
    graph.output(out).meta = dict(old_out.meta)  # graph_copy leaves the output node's meta
    new = fx.GraphModule(gm, graph)  # submodules the graph calls (kernels) come along
    new.meta.update(gm.meta)
    return new
