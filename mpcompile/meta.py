"""What every node carries, and the checks run between stages.

``node.meta["val"]`` holds a fake tensor (shape, dtype, device), refreshed after every stage by
fake-tensor propagation, which doubles as a dtype check: a stage that feeds an op dtypes it
rejects fails there, naming the stage and node. ``node.meta["mp"]`` holds a frozen
:class:`NodeRecord`: which stage made the node, its module and source line, its precision class
and the reason, and how its precision was decided. ``explain()`` reads only these.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .errors import PassError
from .policy import OpClass

MP = "mp"
CAST = torch.ops.aten._to_copy.default


@dataclass(frozen=True)
class NodeRecord:
    """Provenance and precision decision of one node."""

    created_by: str  # the stage that made the node: "capture", "casts", ...
    module: str = ""  # dotted path of the innermost nn.Module ("" = the model itself)
    module_type: str = ""
    source: str = ""  # the model's source line that produced the node
    op_class: OpClass | None = None
    class_reason: str = ""
    class_source: str = ""  # "table", "user", "default", "strict_reductions", "unproven"
    fp32_args: tuple[str, ...] = ()
    pin: str | None = None  # the keep_fp32_modules entry that pinned this node
    precision: torch.dtype | None = None  # dtype the node computes in; None: no float math
    decided_by: str = ""  # "class", "pin", "mincut", "local", "cast", "input", ...
    decision: str = ""  # human-readable reason, with costs for min-cut decisions
    subject: str = ""  # training nodes: the parameter (or state) the node works on


def record(node: fx.Node) -> NodeRecord:
    rec = node.meta.get(MP)
    if rec is None:
        raise PassError(f"node {node.name} ({node.target}) has no mpcompile record")
    return rec


def update(node: fx.Node, **changes) -> None:
    node.meta[MP] = dataclasses.replace(record(node), **changes)


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


def dtype_name(dt: torch.dtype | None) -> str:
    return "-" if dt is None else str(dt).removeprefix("torch.")


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


# --- checks between stages ---------------------------------------------------------------


class _Prop(FakeTensorProp):
    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, stage: str):
        super().__init__(gm, mode)
        self.stage = stage

    def run_node(self, n: fx.Node):
        try:
            return super().run_node(n)
        except PassError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the node named
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            ins = ", ".join(f"{a.name}:{dtype_name(val_dtype(a))}" for _, _, a in arg_slots(n))
            raise PassError(
                f"after stage '{self.stage}', node {n.name} ({n.target}) fails on its inputs "
                f"({ins}): {msg}"
            ) from e


def fake_inputs(gm: fx.GraphModule, mode: FakeTensorMode) -> list[torch.Tensor]:
    out = []
    with mode:
        for n in gm.graph.find_nodes(op="placeholder"):
            v = n.meta["val"]
            out.append(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device))
    return out


def refresh(gm: fx.GraphModule, stage: str) -> None:
    """Re-derive ``meta['val']`` of every node by fake propagation (a dtype/shape check)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _Prop(gm, mode, stage).propagate_dont_convert_inputs(*fake_inputs(gm, mode))


def check(gm: fx.GraphModule, stage: str) -> fx.GraphModule:
    """Lint, re-propagate dtypes, and require provenance on every node."""
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001
        raise PassError(f"stage '{stage}' left an invalid graph: {e}") from e
    gm.recompile()
    refresh(gm, stage)
    for n in gm.graph.nodes:
        if n.op != "output" and MP not in n.meta:
            raise PassError(f"stage '{stage}' created node {n.name} without a provenance record")
    return gm


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (meta copied shallowly)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    old_out = gm.graph.output_node()
    graph.output(out).meta = dict(old_out.meta)  # graph_copy leaves the output node's meta
    new = fx.GraphModule(gm, graph)  # submodules the graph calls (kernels) come along
    new.meta.update(gm.meta)
    return new
