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
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from onnx import numpy_helper

from ..api import MixedPrecisionModule
from ..errors import ExportError
from ..fileio import replacing
from ..train import TrainStep
from .parts import Parts, forward_parts, graph_parts, step_parts

DEFAULT_IR_VERSION = 10  # onnx 1.23 writes 14; onnxruntime 1.31-1.32 loads at most 13
# opset 22 is the first with bfloat16 on Conv and most arithmetic ops; float16 models keep
# torch.onnx's default (18), which older onnxruntime releases load too
BF16_OPSET = 22
STANDARD_DOMAINS = ("", "ai.onnx")
META_KEY = "mpcompile"


# --- common -----------------------------------------------------------------------------------


def _describe(name: str | None, records: dict) -> str:
    rec = records.get(name) if name else None
    if rec is None:
        return f"node {name}" if name else "an unnamed node"
    where = f" in module '{rec.module or '<model>'}'"
    return f"node {name}{where}" + (f" ({rec.source})" if rec.source else "")


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
        if obj.data_parallel is not None:
            raise ExportError(
                f"export_onnx: this training step is {obj.data_parallel}: its graph all-reduces "
                "gradients across processes, which ONNX cannot express. Export a step compiled "
                "on one process (compile_train_step without process_group, torch.distributed "
                "not initialised)")
        parts = step_parts(obj)
    elif isinstance(obj, MixedPrecisionModule):
        parts = forward_parts(obj, keep_fp32_weights)
    else:
        raise ExportError(f"export_onnx takes a MixedPrecisionModule or a TrainStep, got "
                          f"{type(obj).__name__}")
    if path is not None:
        path = _check_path(path)  # before the export: a bad path fails in a moment, not after it
    model = _export(parts, opset, ir_version)
    if path is None:
        return model
    return _save(model, path)


def _check_path(path: str | Path) -> Path:
    """``path`` as a Path, or an ExportError saying why no file can be written there."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"export_onnx: cannot write {str(path)!r}: it is a directory; give a "
                          f"file path such as {str(path / 'model.onnx')!r}")
    folder = path.parent
    if not folder.is_dir():
        raise ExportError(f"export_onnx: cannot write {str(path)!r}: the folder {str(folder)!r} "
                          "does not exist; create it first or give a path in an existing folder")
    fd, probe = _temp_file(path)  # can a file be created there at all?
    os.close(fd)
    os.unlink(probe)
    return path


def _temp_file(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` (same folder: ``os.replace`` stays one rename)."""
    try:
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ExportError(f"export_onnx: cannot write {str(path)!r}: cannot create a file in "
                          f"{str(path.parent)!r} ({e.strerror or e}); give a path in a writable "
                          "folder") from e


def _save(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``model`` to ``path`` as one file, atomically: a temporary file in the same folder,
    flushed to disk, then renamed over ``path``; on any failure the temporary file is removed
    and whatever was at ``path`` is untouched."""
    if model.ByteSize() > onnx.checker.MAXIMUM_PROTOBUF:
        raise ExportError(f"export_onnx: the model is too large for one ONNX file (protobuf's "
                          f"2 GiB limit); {str(path)!r} was not written")
    fd, tmp = _temp_file(path)
    try:
        with replacing(path, tmp):
            os.close(fd)
            # a file object (named, so onnx finds no extension to guess from): one file, no
            # external data; an os.fdopen object would not do, onnx takes its int name for a path
            with open(tmp, "wb") as f:
                onnx.save(model, f, format="protobuf")
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise ExportError(f"export_onnx: writing {str(path)!r} failed ({e.strerror or e}); "
                          "nothing was changed there; check the disk space and permissions "
                          "and export again") from e
    return path


def export_graph(gm: fx.GraphModule, example: list[torch.Tensor], *,
                 opset: int | None = None, ir_version: int | None = None) -> onnx.ModelProto:
    """Export any functional ATen fx graph (inputs ``input_i``, outputs ``output_i``) the way a
    training step is exported: decomposed, legalised, checked. Used for single-op regression
    tests, and for graphs of one's own."""
    return _export(graph_parts(gm, example), opset, ir_version)


def _export(parts: Parts, opset: int | None, ir_version: int | None) -> onnx.ModelProto:
    meta = dict(parts.meta)
    if opset is None and meta["dtype"] == "bfloat16":
        opset = BF16_OPSET
    model, program = _to_onnx(parts.runner, parts.example, opset, parts.records, parts.what)
    names = mp_names(model, program)
    _scan(model, names, parts.records, parts.what)
    _io_names(model, parts.in_names, parts.out_names)
    _add_defaults(model, parts.defaults)
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
