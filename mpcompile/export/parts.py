"""What ``export_onnx`` hands to ``torch.onnx.export``: a small module that runs our fx graph,
its example arguments, input/output names, default initializers and metadata.

The graphs come from the export pipelines (``passes.EXPORT_FORWARD``, ``EXPORT_STEP``); the
training step is read through ``TrainStep``'s public attributes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .. import passes
from ..api import MixedPrecisionModule, Program
from ..capture import BindingKind, module_modes, restore_modes
from ..dtypes import dtype_name
from ..fxutil import copy_module
from ..records import MP, NodeRecord
from ..train import StateKind, TrainStep


class Runner(torch.nn.Module):
    """Runs ``gm`` on (constants held here as buffers) + (the forward's arguments), under
    ``fx.Interpreter`` so every traced node keeps our node's meta."""

    def __init__(self, gm: fx.GraphModule, feed: list[tuple[str, Any]], keep: list[int]):
        super().__init__()
        self.gm = gm
        self._feed = []  # (True, buffer name) | (False, argument index)
        for i, (kind, value) in enumerate(feed):
            if kind == "const":
                self.register_buffer(f"c{i}", value)
                self._feed.append((True, f"c{i}"))
            else:
                self._feed.append((False, value))
        self._keep = keep  # which graph outputs the exported model returns

    def forward(self, *args):
        feed = [getattr(self, v) if held else args[v] for held, v in self._feed]
        outs = fx.Interpreter(self.gm).run(*feed)
        return tuple(outs[i] for i in self._keep)


@dataclass(frozen=True)
class Parts:
    runner: Runner
    example: list[torch.Tensor]
    in_names: list[str]
    out_names: list[str]
    defaults: dict[str, torch.Tensor]  # input name -> default initializer value
    meta: dict[str, Any]  # stored in the ONNX model's metadata
    records: dict[str, Any]  # our node name -> NodeRecord (error messages)
    what: str  # "the training step", "the forward of CNN", ...


def annotate(gm: fx.GraphModule) -> dict[str, Any]:
    """Name each node in its custom meta (kept by the exporter; an earlier name, from
    re-tracing, wins); return our node name -> record."""
    records = {}
    for n in gm.graph.nodes:
        custom = n.meta.get("custom") or {}
        name = custom.get("mp_name", n.name)
        n.meta["custom"] = {**custom, "mp_name": name}
        if MP in n.meta:
            records.setdefault(name, n.meta[MP])
    return records


def _eval_program(mp: MixedPrecisionModule) -> Program:
    """The eval-mode program of the latest input signature (compiled if needed); the module's
    train/eval flags are left as they were."""
    args, kwargs = mp.program.example
    modes = [(mp, mp.training), *module_modes(mp.original)]
    try:
        mp.eval()
        return mp.program_for(args, kwargs)
    finally:
        restore_modes(modes)


def forward_parts(mp: MixedPrecisionModule, keep_fp32_weights: bool) -> Parts:
    prog = _eval_program(mp)
    low, model = mp.policy.dtype, mp.original
    args, kwargs = prog.example
    inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
              if isinstance(t, torch.Tensor)]
    pipeline = (passes.EXPORT_FORWARD_FP32_WEIGHTS if keep_fp32_weights
                else passes.EXPORT_FORWARD)
    done = passes.run(pipeline, prog.graph_module, prog.context(model))
    gm = copy_module(done.gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    feed, example, in_names, defaults = [], [], [], {}
    for ph, b in zip(placeholders, done.ctx.inputs):
        if b.kind is BindingKind.INPUT:
            feed.append(("arg", len(example)))
            example.append(inputs[b.target])
            in_names.append(ph.name)
        elif b.kind is BindingKind.PARAM and keep_fp32_weights:
            feed.append(("arg", len(example)))
            w = model.get_parameter(b.target).detach()
            example.append(w)
            in_names.append(b.target)
            defaults[b.target] = w
        elif b.kind in (BindingKind.PARAM, BindingKind.WORKING):
            w = model.get_parameter(b.target).detach()
            feed.append(("const", w.to(low) if b.kind is BindingKind.WORKING else w.clone()))
        elif b.kind is BindingKind.BUFFER:
            feed.append(("const", model.get_buffer(b.target).detach().clone()))
        else:
            feed.append(("const", b.target))
    keep = [i for i, b in enumerate(prog.captured.outputs) if b.kind is BindingKind.OUTPUT]
    out_names = [f"output_{k}" for k in range(len(keep))]
    n_inputs = sum(1 for b in done.ctx.inputs if b.kind is BindingKind.INPUT)
    meta = {"kind": "forward", "model": prog.captured.model_name, "dtype": dtype_name(low),
            "inputs": in_names, "outputs": out_names, "n_model_inputs": n_inputs}
    records = annotate(gm)
    return Parts(Runner(gm, feed, keep), example, in_names, out_names, defaults, meta, records,
                 f"the forward of {meta['model']}")


def step_parts(step: TrainStep) -> Parts:
    """The whole step, state in -> state out: every state entry is an input (its current value
    the default initializer) and comes back as ``next.<name>``."""
    model = step.compiled.forward.captured.model_name
    ctx = passes.Context(step.policy, step.compiled.forward.device_type, None, ())
    done = passes.run(passes.EXPORT_STEP, step.graph_module, ctx)
    n_const = len(step.compiled.constants)
    args = step.example_args()
    example = args[:len(args) - n_const]  # the model's constants are stored in the graph
    names, n_state = step.layout.names, len(step.layout.names)
    lr_names = [n for n in step.input_names if n.startswith("lr")][: len(step.plan.groups)]
    in_names = list(step.input_names[:len(step.input_names) - n_const])
    out_names = list(step.output_names)
    defaults = dict(zip(names, step.state))
    defaults.update({n: t for n, t in zip(lr_names, example[n_state:])})
    meta = {"kind": "train_step", "model": model, "dtype": dtype_name(step.dtype),
            "state": list(names), "lrs": lr_names,
            "batch": in_names[n_state + len(lr_names):],
            "n_inputs": step.n_model_inputs, "outputs": out_names,
            "masters": _with_ties(step.layout.of_kind(StateKind.MASTER), step.ties),
            "working": _with_ties(step.layout.of_kind(StateKind.WORKING), step.ties),
            "buffers": step.layout.of_kind(StateKind.BUFFER)}
    records = annotate(done.gm)
    feed = [("arg", i) for i in range(len(example))]
    feed += [("const", t) for t in step.compiled.constants]
    return Parts(Runner(done.gm, feed, list(range(len(out_names)))), example, in_names,
                 out_names, defaults, meta, records, "the training step")


def _with_ties(by_fqn: dict[str, str], ties: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """A tied parameter's state under each of its names (``model.load_state_dict`` wants all)."""
    out = dict(by_fqn)
    for first, others in ties.items():
        if first in by_fqn:
            out.update({o: by_fqn[first] for o in others})
    return out


def graph_parts(gm: fx.GraphModule, example: list[torch.Tensor]) -> Parts:
    """Any functional ATen graph, decomposed and legalised like a training step."""
    gm = copy_module(gm)
    for i, n in enumerate(gm.graph.nodes):
        n.meta.setdefault(MP, NodeRecord("input" if n.op == "placeholder" else "graph"))
        if n.op == "placeholder" and "val" not in n.meta:
            n.meta["val"] = example[i]
    ctx = passes.Context(None, "cpu", None, ())
    done = passes.run(passes.EXPORT_STEP, gm, ctx)
    records = annotate(done.gm)
    n_out = len(done.gm.graph.output_node().args[0])
    in_names = [f"input_{i}" for i in range(len(example))]
    out_names = [f"output_{i}" for i in range(n_out)]
    runner = Runner(done.gm, [("arg", i) for i in range(len(example))], list(range(n_out)))
    return Parts(runner, example, in_names, out_names, {}, {"kind": "graph", "dtype": ""},
                 records, "the graph")
