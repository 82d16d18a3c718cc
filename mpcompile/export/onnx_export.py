"""``export_onnx``: a MixedPrecisionModule's forward, or a TrainStep's whole step, as standard ONNX.

Both go through ``torch.onnx.export(dynamo=True)`` on a small wrapper that runs our fx graph with
an ``fx.Interpreter`` under ``preserve_node_meta``, so every node of the ExportedProgram keeps our
node's name (``meta["custom"]["mp_name"]``) and every ONNX node names its fx node
(``pkg.torch.onnx.name_scopes``): errors and structural checks point back at mpcompile's nodes.

- forward: the eval-mode graph; weights that the graph casts to low precision are folded into
  low-precision initializers (``keep_fp32_weights=True``: FP32 weights become graph inputs, with
  their values as defaults, and the casts stay in the graph); model inputs/outputs keep their
  dtypes.
- training step: a pure function, state in -> state out. Every piece of state is a graph input
  (its current value is stored as the input's default initializer, which onnxruntime treats as
  overridable, never as a constant) and comes back as output ``next.<name>``; plus ``loss``,
  ``loss_scale``, ``skipped`` (and ``grad_norm`` with clipping). Before export the graph is
  re-traced with ``export_decompositions()`` and every remaining backward op is refused.

onnxscript's graph optimizer is not run: it folds an FP16 convolution followed by an FP32 batch
norm into an FP32 weight next to an FP16 input, which is an invalid model.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from onnx import numpy_helper
from torch.fx.experimental.proxy_tensor import make_fx

from ..api import MixedPrecisionModule, Program
from ..capture import module_modes, restore_modes
from ..errors import ExportError
from ..dtypes import dtype_name
from ..fxutil import copy_module
from ..records import MP
from ..passes import working_copies
from ..train import TrainStep
from ..passes import legalize
from ..passes.decompose import export_decompositions

DEFAULT_IR_VERSION = 10  # onnx 1.23 writes 14; onnxruntime 1.31-1.32 loads at most 13
# opset 22 is the first with bfloat16 on Conv and most arithmetic ops; float16 models keep
# torch.onnx's default (18), which older onnxruntime releases load too
BF16_OPSET = 22
STANDARD_DOMAINS = ("", "ai.onnx")
META_KEY = "mpcompile"


# --- wrappers: an nn.Module torch.onnx can export -----------------------------------------------


class _Run(torch.nn.Module):
    """Runs ``gm`` on (constants held here as buffers) + (the forward's arguments)."""

    def __init__(self, gm: fx.GraphModule, feed: list[tuple[str, Any]], keep: list[int]):
        super().__init__()
        self.gm = gm
        self._feed = []  # ("buffer", name) | ("arg", index)
        for i, (kind, value) in enumerate(feed):
            if kind == "const":
                self.register_buffer(f"c{i}", value)
                self._feed.append(("buffer", f"c{i}"))
            else:
                self._feed.append(("arg", value))
        self._keep = keep  # which graph outputs the exported model returns

    def forward(self, *args):
        feed = [getattr(self, v) if k == "buffer" else args[v] for k, v in self._feed]
        outs = fx.Interpreter(self.gm).run(*feed)
        return tuple(outs[i] for i in self._keep)


def _annotate(gm: fx.GraphModule) -> dict[str, Any]:
    """Tag each node with its name (kept through re-tracing); return name -> record."""
    records = {}
    for n in gm.graph.nodes:
        n.meta["custom"] = {**(n.meta.get("custom") or {}), "mp_name": n.name}
        if MP in n.meta:
            records[n.name] = n.meta[MP]
    return records


def _describe(name: str | None, records: dict) -> str:
    rec = records.get(name) if name else None
    if rec is None:
        return f"node {name}" if name else "an unnamed node"
    where = f" in module '{rec.module or '<model>'}'"
    return f"node {name}{where}" + (f" ({rec.source})" if rec.source else "")


# --- forward ----------------------------------------------------------------------------------


def _eval_program(mp: MixedPrecisionModule) -> Program:
    """The eval-mode program of the latest input signature (compiled if needed); the module's
    train/eval flags are left as they were."""
    args, kwargs = mp.program.example
    modes = [(mp, mp.training), *module_modes(mp.original)]
    try:
        mp.eval()
        return mp._program_for(args, kwargs)
    finally:
        restore_modes(modes)


def _forward_parts(mp: MixedPrecisionModule, keep_fp32_weights: bool):
    prog = _eval_program(mp)
    low = mp.policy.dtype
    model = mp.original
    args, kwargs = prog.example
    inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
              if isinstance(t, torch.Tensor)]
    placeholders = list(prog.unlowered.graph.find_nodes(op="placeholder"))
    if keep_fp32_weights:
        gm, bindings = prog.unlowered, prog.captured.inputs
    else:
        wc = working_copies.run(prog.unlowered, prog.captured.inputs, low)
        gm, bindings = wc.gm, wc.inputs
    gm = copy_module(gm)
    feed, example, in_names, defaults = [], [], [], {}
    n_inputs = 0
    for i, b in enumerate(bindings):
        if b.kind == "input":
            feed.append(("arg", len(example)))
            example.append(inputs[b.target])
            in_names.append(placeholders[i].name)
            n_inputs += 1
        elif b.kind == "param" and keep_fp32_weights:
            feed.append(("arg", len(example)))
            w = model.get_parameter(b.target).detach()
            example.append(w)
            in_names.append(b.target)
            defaults[b.target] = w
        elif b.kind in ("param", "working"):
            w = model.get_parameter(b.target).detach()
            feed.append(("const", w.to(low) if b.kind == "working" else w.clone()))
        elif b.kind == "buffer":
            feed.append(("const", model.get_buffer(b.target).detach().clone()))
        else:
            feed.append(("const", b.target))
    keep = [i for i, b in enumerate(prog.captured.outputs) if b.kind == "output"]
    out_names = [f"output_{k}" for k in range(len(keep))]
    meta = {"kind": "forward", "model": prog.captured.model_name, "dtype": dtype_name(low),
            "inputs": in_names, "outputs": out_names, "n_model_inputs": n_inputs}
    return _Run(gm, feed, keep), example, in_names, out_names, defaults, meta


# --- training step ----------------------------------------------------------------------------


def _retrace(gm: fx.GraphModule, example: list) -> fx.GraphModule:
    """Re-trace with export_decompositions() (node names kept in meta["custom"]), make mixed
    norms and splits valid ONNX, and refuse what still cannot be translated."""
    records = {n.name: n.meta[MP] for n in gm.graph.nodes if MP in n.meta}
    with fx_traceback.preserve_node_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = make_fx(lambda *a: fx.Interpreter(gm).run(*a),
                         decomposition_table=export_decompositions(),
                         tracing_mode="fake")(*example)
    traced = legalize.run(traced)
    _refuse_backward_ops(traced, records)
    return traced


def _train_parts(step: TrainStep):
    gm = copy_module(step.unlowered)
    records = _annotate(gm)
    lrs = [torch.tensor(x, dtype=torch.float64) for x in step.learning_rates()]
    n_out = len(step.unlowered.graph.output_node().args[0])
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    example = [*step._state, *lrs]
    for ph in placeholders[len(example):]:  # the batch: example values from the fake tensors
        v = ph.meta["val"]
        example.append(torch.zeros(v.shape, dtype=v.dtype))
    traced = _retrace(gm, example)
    in_names = [*step.layout.names, *[f"lr{i}" for i in range(len(lrs))],
                *[ph.name for ph in placeholders[len(step.layout.names) + len(lrs):]]]
    extra = ["loss", "loss_scale", "skipped", "grad_norm"][: n_out - len(step.layout.names)]
    out_names = [f"next.{n}" for n in step.layout.names] + extra
    defaults = dict(zip(step.layout.names, step._state))
    defaults.update({f"lr{i}": t for i, t in enumerate(lrs)})
    meta = {"kind": "train_step", "dtype": dtype_name(step.dtype),
            "state": list(step.layout.names), "lrs": [f"lr{i}" for i in range(len(lrs))],
            "batch": in_names[len(step.layout.names) + len(lrs):],
            "n_inputs": step._n_inputs, "outputs": out_names,
            "masters": {n.removeprefix("master."): n for n in step.layout.names
                        if n.startswith("master.")},
            "working": {n.removeprefix("working."): n for n in step.layout.names
                        if n.startswith("working.")},
            "buffers": {n.removeprefix("buffer."): n for n in step.layout.names
                        if n.startswith("buffer.")}}
    feed = [("arg", i) for i in range(len(example))]
    return (_Run(traced, feed, list(range(n_out))), example, in_names, out_names, defaults,
            meta, records)


def _refuse_backward_ops(gm: fx.GraphModule, records: dict) -> None:
    """After decomposition no backward op and no prims op may remain: torch.onnx has no
    translation for some and translates others wrongly."""
    for n in gm.graph.nodes:
        target = str(n.target)
        if n.op == "call_function" and ("backward" in target or target.startswith("prims.")):
            name = (n.meta.get("custom") or {}).get("mp_name")
            raise ExportError(
                f"{n.target} (from {_describe(name, records)}) has no correct ONNX translation "
                "and no decomposition; it cannot be exported"
            )


# --- common -----------------------------------------------------------------------------------


def _to_onnx(wrapper: torch.nn.Module, example: list, opset: int | None, records: dict,
             what: str) -> tuple[onnx.ModelProto, Any]:
    out = io.StringIO()
    try:
        with fx_traceback.preserve_node_meta(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, tuple(example), dynamo=True, optimize=False,
                                        verbose=False, opset_version=opset)
    except Exception as e:  # noqa: BLE001 - name the op and node the exporter choked on
        text = "\n".join(str(x) for x in (e, e.__cause__) if x is not None)
        found = re.search(r"(?:torch\.ops\.|OpOverload\(op=')(\w+\.\w+)(?:', overload='|\.)(\w+)",
                          text)
        op = f"{found.group(1)}.{found.group(2)}" if found else None
        node = _node_for_op(wrapper.gm, op) if op else None
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in text.splitlines()]
        reason = next((ln for ln in lines if "No ONNX function" in ln or "Failure message" in ln),
                      next((ln for ln in lines if ln), type(e).__name__))
        raise ExportError(
            f"{what} cannot be exported to ONNX"
            + (f": {op} ({_describe(node, records)}) has no ONNX translation" if op else "")
            + f". (torch.onnx: {reason[:300]})"
        ) from e
    return program.model_proto, program


def _node_for_op(gm: fx.GraphModule, op: str) -> str | None:
    for n in gm.graph.nodes:
        if str(n.target) == op:
            return (n.meta.get("custom") or {}).get("mp_name", n.name)
    return None


def _fx_name(node: onnx.NodeProto) -> str | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = json.loads(p.value.replace("'", '"'))
            except ValueError:
                return None
            return scopes[-1] if scopes else None
    return None


def mp_names(model: onnx.ModelProto, program) -> dict[str, str]:
    """ONNX node name -> mpcompile node name (through the ExportedProgram's custom meta)."""
    ep = {n.name: (n.meta.get("custom") or {}).get("mp_name")
          for n in program.exported_program.graph.nodes}
    out = {}
    for node in model.graph.node:
        fx_name = _fx_name(node)
        if fx_name in ep and ep[fx_name]:
            out[node.name] = ep[fx_name]
    return out


def _scan(model: onnx.ModelProto, names: dict[str, str], records: dict, what: str) -> None:
    """Only standard ONNX operators: anything else fails the export, naming the node."""
    for fn in model.functions:
        raise ExportError(f"{what}: the exported model defines a local function "
                          f"{fn.domain}::{fn.name}; only standard operators are allowed")
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            raise ExportError(
                f"{what}: ONNX node {node.name} is {node.domain}::{node.op_type}, not a standard "
                f"operator (from {_describe(names.get(node.name), records)}); onnxruntime and "
                "other runtimes cannot be relied on to run it"
            )


def _rename(model: onnx.ModelProto, mapping: dict[str, str]) -> None:
    g = model.graph
    for node in g.node:
        node.input[:] = [mapping.get(x, x) for x in node.input]
        node.output[:] = [mapping.get(x, x) for x in node.output]
    for vi in (*g.input, *g.output, *g.value_info):
        vi.name = mapping.get(vi.name, vi.name)
    for init in g.initializer:
        init.name = mapping.get(init.name, init.name)


def _io_names(model: onnx.ModelProto, in_names: list[str], out_names: list[str]) -> None:
    g = model.graph
    if len(g.input) != len(in_names) or len(g.output) != len(out_names):
        raise ExportError(
            f"exported model has {len(g.input)} inputs / {len(g.output)} outputs, expected "
            f"{len(in_names)} / {len(out_names)}"
        )
    mapping = {vi.name: n for vi, n in zip(g.input, in_names)}
    # an output that is directly an input (a frozen parameter passed through) gets an Identity,
    # so each output has its own name
    taken = set(mapping.values())
    for vi, n in zip(list(g.output), out_names):
        src = mapping.get(vi.name, vi.name)
        if src in taken or vi.name in mapping:
            g.node.append(onnx.helper.make_node("Identity", [vi.name], [n], name=f"pass_{n}"))
            vi.name = n
        else:
            mapping[vi.name] = n
    _rename(model, mapping)


def _add_defaults(model: onnx.ModelProto, defaults: dict[str, torch.Tensor]) -> None:
    for name, t in defaults.items():
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.int16).numpy()
            tensor = onnx.helper.make_tensor(name, onnx.TensorProto.BFLOAT16, list(t.shape),
                                             arr.tobytes(), raw=True)
        else:
            tensor = numpy_helper.from_array(t.numpy(), name)
        model.graph.initializer.append(tensor)


def export_onnx(obj: MixedPrecisionModule | TrainStep, path: str | Path | None = None, *,
                opset: int | None = None, ir_version: int | None = None,
                keep_fp32_weights: bool = False) -> Path | onnx.ModelProto:
    """Write ``obj`` as an ONNX model that passes ``onnx.checker`` with full shape inference.

    Args:
        obj: a :class:`MixedPrecisionModule` (its eval-mode forward for the latest input
            signature) or a :class:`TrainStep` (the whole step, state in -> state out).
        path: where to write; None returns the ``onnx.ModelProto`` instead.
        opset: ONNX opset (default: torch.onnx's, or 22 for bfloat16 models).
        ir_version: IR version to write (default 10, which onnxruntime >= 1.16 loads).
        keep_fp32_weights: forward only: FP32 weights as graph inputs (defaults: their values),
            cast inside the graph, instead of low-precision initializers.
    """
    if isinstance(obj, TrainStep):
        wrapper, example, in_names, out_names, defaults, meta, records = _train_parts(obj)
        what = "the training step"
    elif isinstance(obj, MixedPrecisionModule):
        wrapper, example, in_names, out_names, defaults, meta = _forward_parts(
            obj, keep_fp32_weights)
        records = _annotate(wrapper.gm)
        legalize.run(wrapper.gm)
        what = f"the forward of {meta['model']}"
    else:
        raise ExportError(f"export_onnx takes a MixedPrecisionModule or a TrainStep, got "
                          f"{type(obj).__name__}")
    model = _export(wrapper, example, in_names, out_names, defaults, meta, records, what,
                    opset, ir_version)
    if path is None:
        return model
    path = Path(path)
    onnx.save(model, path)
    return path


def export_graph(gm: fx.GraphModule, example: list[torch.Tensor], *,
                 opset: int | None = None, ir_version: int | None = None) -> onnx.ModelProto:
    """Export any functional ATen fx graph (inputs ``input_i``, outputs ``output_i``) the way a
    training step is exported: decomposed, legalised, checked. Used for single-op regression
    tests, and for graphs of one's own."""
    gm = copy_module(gm)
    records = _annotate(gm)
    traced = _retrace(gm, example)
    n_out = len(traced.graph.output_node().args[0])
    in_names = [f"input_{i}" for i in range(len(example))]
    out_names = [f"output_{i}" for i in range(n_out)]
    wrapper = _Run(traced, [("arg", i) for i in range(len(example))], list(range(n_out)))
    return _export(wrapper, example, in_names, out_names, {}, {"kind": "graph", "dtype": ""},
                   records, "the graph", opset, ir_version)


def _export(wrapper, example, in_names, out_names, defaults, meta, records, what, opset,
            ir_version) -> onnx.ModelProto:
    if opset is None and meta["dtype"] == "bfloat16":
        opset = BF16_OPSET
    model, program = _to_onnx(wrapper, example, opset, records, what)
    names = mp_names(model, program)
    _scan(model, names, records, what)
    _io_names(model, in_names, out_names)
    _add_defaults(model, defaults)
    model.ir_version = ir_version or DEFAULT_IR_VERSION
    meta["node_map"] = names
    del model.metadata_props[:]
    model.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def metadata(model: onnx.ModelProto) -> dict:
    for p in model.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    raise ExportError("not an mpcompile export: no 'mpcompile' metadata in the model")
