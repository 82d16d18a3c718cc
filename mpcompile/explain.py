"""Why each node runs in the precision it does: per-node explanations, graph pictures, stage
diffs. Everything here reads the node records (``records.NodeRecord``) of a recorded stage."""

from __future__ import annotations

import difflib
import shutil
import subprocess
from pathlib import Path

import torch
import torch.fx as fx

from .dtypes import dtype_name
from .errors import UnknownNodeError
from .fxutil import arg_slots, is_cast, is_getitem, tensors_of, val_dtype
from .records import MP, record

F32 = torch.float32



def find_node(gm: fx.GraphModule, node: str | fx.Node,
              stages: dict[str, fx.GraphModule] | None = None) -> fx.Node:
    if isinstance(node, fx.Node):
        node = node.name
    for n in gm.graph.nodes:
        if n.name == node:
            return n
    names = [n.name for n in gm.graph.nodes]
    close = difflib.get_close_matches(node, names, n=5)
    removed = ""
    for name, g in (stages or {}).items():
        if any(n.name == node for n in g.graph.nodes):
            removed = f" It exists in stage '{name}' (a later stage removed or renamed it)."
            break
    raise UnknownNodeError(
        f"no node named {node!r} in the graph.{removed}"
        + (f" Did you mean: {', '.join(close)}?" if close else "")
        + " Print .graph_module.graph for all names."
    )


def explain(program, node: str | fx.Node) -> str:
    """Explain a node of the program's mixed-precision graph, or else of the graph that runs
    (generated kernel calls)."""
    gm = program.graph_module
    if isinstance(node, str) and not any(n.name == node for n in gm.graph.nodes) and any(
            n.name == node for n in program.executable.graph.nodes):
        gm = program.executable
    return explain_node(gm, node, program.stages)


def explain_node(gm: fx.GraphModule, node: str | fx.Node,
                 stages: dict[str, fx.GraphModule] | None = None) -> str:
    n = find_node(gm, node, stages)
    rec = record(n)
    ins = ", ".join(f"{a.name}: {dtype_name(val_dtype(a))}" for _, _, a in arg_slots(n))
    outs = [dtype_name(t.dtype) if t is not None else "-" for t in tensors_of(n.meta.get("val"))]
    out = outs[0] if isinstance(n.meta.get("val"), torch.Tensor) else f"({', '.join(outs)})"
    lines = [f"{n.name} = {n.target}({ins}) -> {out}"]
    if rec.module or rec.module_type:
        lines.append(f"  module:     {rec.module or '<model>'} ({rec.module_type})")
    if rec.source:
        lines.append(f"  source:     {rec.source}")
    lines.append(f"  created by: {rec.created_by}")
    if rec.op_class is not None:
        lines.append(f"  class:      {rec.op_class} ({rec.class_source}): {rec.class_reason}")
    if rec.fp32_args:
        lines.append(f"  kept FP32:  arguments {', '.join(rec.fp32_args)}")
    if rec.pin:
        lines.append(f"  pinned:     {rec.pin}")
    prec = dtype_name(rec.precision) if rec.precision is not None else "none (no float math)"
    lines.append(f"  precision:  {prec}, decided by {rec.decided_by or '-'}")
    if rec.decision:
        lines.append(f"  why:        {rec.decision}")
    if is_getitem(n):
        lines.append(f"  selects output {n.args[1]} of {n.args[0].name}: see explain"
                     f"({n.args[0].name!r})")
    return "\n".join(lines)


# --- pictures -------------------------------------------------------------------------------

_COLOURS = {"low": "#9fd89f", "fp32": "#f4b0a8", "cast": "#ffe08a", "none": "#e4e4e4",
            "input": "#cfe0ff"}


def _colour(n: fx.Node, low: torch.dtype) -> str:
    rec = n.meta.get(MP)
    if n.op == "placeholder":
        return _COLOURS["input"]
    if rec is None or n.op == "output":
        return _COLOURS["none"]
    if is_cast(n):
        return _COLOURS["cast"]
    if rec.precision is None:
        return _COLOURS["none"]
    return _COLOURS["low"] if rec.precision == low and low is not F32 else _COLOURS["fp32"]


def to_dot(program, path: str | None = None, stage: str | None = None) -> str:
    gm = program.stages[stage] if stage else program.graph_module
    low = program.policy.dtype
    out = [f'digraph "{program.captured.model_name}" {{', "  rankdir=TB;",
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
           '  edge [fontname="Helvetica", fontsize=8];',
           f'  label="{program.captured.model_name}: green {dtype_name(low)}, red float32, '
           'yellow casts, blue inputs"; labelloc=t;']
    for n in gm.graph.nodes:
        if is_getitem(n):
            target = f"getitem[{n.args[1]}]"
        else:
            target = str(n.target if n.op == "call_function" else n.op).replace("aten.", "")
        label = f"{n.name}\\n{target}"
        d = val_dtype(n)
        if d is not None:
            label += f"\\n{dtype_name(d)}{list(n.meta['val'].shape)}"
        out.append(f'  "{n.name}" [label="{label}", fillcolor="{_colour(n, low)}"];')
    for n in gm.graph.nodes:
        for _, _, a in arg_slots(n):
            out.append(f'  "{a.name}" -> "{n.name}";')
    out.append("}")
    text = "\n".join(out) + "\n"
    if path is not None:
        p = Path(path)
        p.write_text(text)
        exe = shutil.which("dot")
        if exe:
            subprocess.run([exe, "-Tsvg", str(p), "-o", str(p.with_suffix(".svg"))],
                           check=True, capture_output=True)
    return text


def to_graph(program, stage: str | None = None):
    """The graph as a ``networkx.DiGraph``: one node per fx node with its label (name, op,
    dtype and shape) and colour (as in :func:`to_dot`), one edge per use."""
    import networkx as nx

    gm = program.stages[stage] if stage else program.graph_module
    low = program.policy.dtype
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        target = (f"getitem[{n.args[1]}]" if is_getitem(n) else n.name if n.op == "placeholder"
                  else str(n.target if n.op == "call_function" else n.op).replace("aten.", "")
                  .removesuffix(".default"))
        d = val_dtype(n)
        label = f"{target}\n{dtype_name(d)}" if d is not None else target
        g.add_node(n.name, label=label, colour=_colour(n, low))
    for n in gm.graph.nodes:
        for _, _, a in arg_slots(n):
            g.add_edge(a.name, n.name)
    return g


def to_png(program, path: str | Path, stage: str | None = None) -> Path:
    """The graph drawn as a PNG (matplotlib, the ``[plot]`` extra; no Graphviz needed): nodes in
    layers by their depth from the inputs, coloured as in :func:`to_dot` (green the low
    precision, red FP32, yellow casts, blue inputs)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ImportError("to_png needs matplotlib: pip install 'mpcompile[plot]'") from e
    import networkx as nx

    g = to_graph(program, stage)
    for depth, layer in enumerate(nx.topological_generations(g)):
        for name in layer:
            g.nodes[name]["depth"] = depth
    pos = nx.multipartite_layout(g, subset_key="depth", align="horizontal", scale=1.0)
    pos = {k: (x, -y) for k, (x, y) in pos.items()}  # inputs on top
    depth = max(nx.get_node_attributes(g, "depth").values(), default=0) + 1
    width = max(len(layer) for layer in nx.topological_generations(g)) if len(g) else 1
    fig = Figure(figsize=(max(6.0, 1.6 * width), max(4.0, 0.9 * depth)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=8, edge_color="#888888",
                           node_size=900)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_shape="s", node_size=900,
                           node_color=[g.nodes[n]["colour"] for n in g])
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=6,
                            labels=nx.get_node_attributes(g, "label"))
    low = dtype_name(program.policy.dtype)
    ax.legend(handles=[Patch(color=_COLOURS[k], label=t) for k, t in (
        ("low", low), ("fp32", "float32"), ("cast", "cast"), ("input", "input"),
        ("none", "no float"))], loc="upper right", fontsize=7)
    ax.set_title(f"{program.captured.model_name}: the mixed-precision graph")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def diff_stages(program, before: str, after: str) -> str:
    """A unified diff of two stages' generated code."""
    a = program.stages[before].code.splitlines()
    b = program.stages[after].code.splitlines()
    return "\n".join(difflib.unified_diff(a, b, before, after, lineterm=""))
