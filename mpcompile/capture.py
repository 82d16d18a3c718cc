"""Model + example inputs -> a functional ATen graph with parameters and buffers lifted.

We use ``torch.export`` (non-strict) followed by ``run_decompositions`` to the core ATen set:

- it lifts parameters, buffers and tensor constants to placeholders and says which is which
  (``graph_signature``), and turns in-place buffer updates (batch-norm running stats,
  ``num_batches_tracked``) into extra graph outputs marked ``BUFFER_MUTATION``: nothing dropped;
- every node keeps ``nn_module_stack`` (which module made it; ``keep_fp32_modules`` needs it) and
  ``stack_trace`` (the user's source line, for ``explain``), and ``val`` (shape/dtype);
- data-dependent Python control flow fails loudly instead of being traced down one branch.

``make_fx`` would also work but records no module hierarchy. We keep
``scaled_dot_product_attention`` whole (a LOWER op with a fused kernel) instead of its
decomposition, drop ``_assert_tensor_metadata`` (it pins dtypes this compiler changes on
purpose), and wrap the model so that any output structure, dataclasses included, is flattened
here rather than by registering pytree types globally.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import io
import logging
import os
import re
import sys
import threading
import traceback
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._ops import OpOverload
from torch.export.graph_signature import InputKind, OutputKind

from .errors import CaptureError
from .records import MP, NodeRecord
from .signature import OutSpec, Signature, TensorSpec, flatten_output

aten = torch.ops.aten

_KEEP_WHOLE = (aten.scaled_dot_product_attention.default,)
_DROP = (aten._assert_tensor_metadata.default,)
_PREFIX = "model."
# torch.export swaps process-wide state while it traces (the tracing mode, sys.stderr here, a
# logger's level): two captures at once return fake tensors and can leave a model's parameters
# replaced by them. One capture at a time per process.
_CAPTURE_LOCK = threading.RLock()


# --- capture --------------------------------------------------------------------------------


class BindingKind(str, enum.Enum):
    """What a graph input is fed with, or what a graph output is."""

    PARAM = "param"  # a parameter of the model (target: its FQN)
    BUFFER = "buffer"  # a buffer (target: its FQN); as an output: the buffer's new value
    CONST = "const"  # a tensor constant of the model (target: the tensor)
    INPUT = "input"  # a tensor the caller passes (target: its position among them)
    WORKING = "working"  # the low-precision working copy of a parameter (target: its FQN)
    OUTPUT = "output"  # as an output: the model's output (target: its position)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Binding:
    """What one placeholder of the graph is fed with (or one graph output is)."""

    kind: BindingKind
    target: Any  # FQN, constant tensor, or position


@dataclass(frozen=True)
class Captured:
    gm: fx.GraphModule
    inputs: tuple[Binding, ...]  # one per placeholder, in order
    outputs: tuple[Binding, ...]  # one per graph output: BUFFER (fqn) or OUTPUT (position)
    out_spec: OutSpec
    signature: Signature
    model_name: str
    # tied (shared) parameters/buffers: canonical FQN -> the other names of the same tensor
    ties: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def mutated_buffers(self) -> tuple[str, ...]:
        return tuple(b.target for b in self.outputs if b.kind is BindingKind.BUFFER)


class _Flat(torch.nn.Module):
    """Calls the model on rebuilt (args, kwargs) and returns its output as a flat tuple."""

    def __init__(self, model: torch.nn.Module, leaves: list, spec, where: list, sink):
        super().__init__()
        self.model = model
        self._leaves = leaves
        self._spec = spec
        self._where = where
        # export restores module attributes after tracing, so the output structure leaves
        # through a callable that closes over the caller's list
        self._sink = sink

    def forward(self, *tensors):
        leaves = list(self._leaves)
        for i, t in zip(self._where, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        flat, spec = flatten_output(self.model(*args, **kwargs))
        self._sink(spec)
        return tuple(flat)


def _strip(fqn: str) -> str:
    return fqn[len(_PREFIX):] if fqn.startswith(_PREFIX) else fqn


def module_modes(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Every module's train/eval flag (``model.train(mode)`` would overwrite them all)."""
    return [(m, m.training) for m in model.modules()]


def restore_modes(modes: list[tuple[torch.nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _user_frame(e: BaseException) -> str:
    """' at file:line in fn: `code`' for the innermost frame outside torch and mpcompile."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    frames = traceback.extract_tb(e.__traceback__)
    for f in reversed(frames):
        if not f.filename.startswith((torch_dir, here)) and "<" not in f.filename:
            return f" at {os.path.basename(f.filename)}:{f.lineno} in {f.name}: `{f.line}`"
    return ""


def _hint(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    if "data-dependent" in text or "GuardOnDataDependent" in text or "Could not guard" in text:
        return (
            "The model branches in Python on a tensor's value (data-dependent control flow), "
            "which one graph cannot hold. Rewrite the branch with torch.where or torch.cond, or "
            "move it out of the model."
        )
    return "Fix the model so torch.export can trace it, or convert a submodule that it can."


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
            keep_whole: Iterable[OpOverload] = ()) -> Captured:
    """Trace ``model(*args, **kwargs)`` into a core-ATen fx graph (see module docstring).

    ``keep_whole``: ops not to decompose (the policy names them: a banned op must be seen to be
    refused, and a user's override of a composite op like ``aten.linear`` must find it)."""
    kwargs = dict(kwargs or {})
    name = type(model).__name__
    leaves, spec = pytree.tree_flatten((tuple(args), kwargs))
    where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    tensors = tuple(leaves[i] for i in where)
    box: list[OutSpec] = []
    flat = _Flat(model, leaves, spec, where, box.append)
    flat.training = model.training  # the wrapper only; the model's modules keep their own
    ep = _export(flat, tensors, keep_whole, name, model)
    out_spec = box[-1]
    gm = ep.graph_module
    sig = ep.graph_signature

    inputs, outputs = _bindings(sig, ep, name)
    inputs, ties = _untie(gm, inputs, outputs, model)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _DROP:
            gm.graph.erase_node(node)
    signature = Signature.of(args, kwargs, model.training)
    names = [n for n, leaf in zip(signature.names, signature.leaves)
             if isinstance(leaf, TensorSpec)]
    for node in gm.graph.nodes:
        node.meta[MP] = NodeRecord("capture", *_module_of(node), source=_source_of(node))
    for node, b in zip(gm.graph.find_nodes(op="placeholder"), inputs):
        # p_model_fc_weight -> p_fc_weight; tensors_0 -> arg0 / input_ids
        new = (_input_name(names[b.target]) if b.kind is BindingKind.INPUT
               else node.name.replace("_model_", "_", 1))
        if new != node.name:
            node._rename(new)
            node.target = node.name
    gm.graph.lint()
    gm.recompile()
    return Captured(gm, tuple(inputs), tuple(outputs), out_spec, signature, name, ties)


def _export(flat: torch.nn.Module, tensors: tuple, keep_whole: Iterable[OpOverload], name: str,
            model: torch.nn.Module):
    """torch.export + run_decompositions; any failure is a CaptureError naming the model's
    line. Every module's train/eval flag is left exactly as it was."""
    with _CAPTURE_LOCK:
        return _export_locked(flat, tensors, keep_whole, name, model)


def _export_locked(flat: torch.nn.Module, tensors: tuple, keep_whole: Iterable[OpOverload],
                   name: str, model: torch.nn.Module):
    modes = module_modes(model)
    # On failure torch logs and prints a partial graph; we raise a CaptureError naming the
    # model's line instead. So: quiet that logger, and hold stderr, replaying it on success.
    quiet = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    err = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(err):
            # torch-internal noise that says nothing about the user's model
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                    category=FutureWarning)
            warnings.filterwarnings("ignore", message=r".*_flat_weights.*assigned during export",
                                    category=UserWarning)
            ep = torch.export.export(flat, tensors, strict=False)
            table = torch.export.default_decompositions()
            for op in (*_KEEP_WHOLE, *keep_whole):
                table.pop(op, None)
            ep = ep.run_decompositions(table)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - every trace failure becomes a CaptureError
        eager = _eager_error(flat, tensors)
        if eager is not None:  # not torch.export's fault: say what plain PyTorch says
            first = str(eager).strip().splitlines()[0] if str(eager).strip() else ""
            raise CaptureError(
                f"{name} fails in plain PyTorch too, before mpcompile changes anything"
                f"{_user_frame(eager)}: {type(eager).__name__}: {first}. Fix the model or the "
                "example inputs (shapes, dtypes, train/eval mode)."
            ) from eager
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        at = _user_frame(e)
        raise CaptureError(
            f"could not capture {name}{at}: {_hint(e)}\n({type(e).__name__}: {first})"
        ) from e
    else:
        sys.stderr.write(err.getvalue())
    finally:
        quiet.setLevel(level)
        restore_modes(modes)  # leave every module's train/eval flag exactly as it was
    return ep


def _eager_error(flat: torch.nn.Module, tensors: tuple) -> BaseException | None:
    """Run the model once in plain PyTorch (on a copy: buffers stay untouched); its error, or
    None if it runs."""
    try:
        with torch.no_grad():
            copy.deepcopy(flat, {id(flat._spec): flat._spec})(*tensors)  # a TreeSpec is immutable
    except Exception as e:  # noqa: BLE001 - reported to the user as the cause
        return e
    return None


def _bindings(sig, ep, name: str) -> tuple[list[Binding], list[Binding]]:
    """What each placeholder is fed with and what each output is, from the export signature."""
    inputs: list[Binding] = []
    for s in sig.input_specs:
        if s.kind is InputKind.PARAMETER:
            inputs.append(Binding(BindingKind.PARAM, _strip(s.target)))
        elif s.kind is InputKind.BUFFER:
            inputs.append(Binding(BindingKind.BUFFER, _strip(s.target)))
        elif s.kind is InputKind.CONSTANT_TENSOR:
            inputs.append(Binding(BindingKind.CONST, ep.constants[s.target]))
        elif s.kind is InputKind.USER_INPUT:
            n_in = sum(1 for b in inputs if b.kind is BindingKind.INPUT)
            inputs.append(Binding(BindingKind.INPUT, n_in))
        else:
            raise CaptureError(f"{name}: unsupported graph input kind {s.kind} ({s.target})")
    outputs: list[Binding] = []
    n_user = 0
    for s in sig.output_specs:
        if s.kind is OutputKind.BUFFER_MUTATION:
            outputs.append(Binding(BindingKind.BUFFER, _strip(s.target)))
        elif s.kind is OutputKind.USER_OUTPUT:
            outputs.append(Binding(BindingKind.OUTPUT, n_user))
            n_user += 1
        elif s.kind is OutputKind.USER_INPUT_MUTATION:
            raise CaptureError(
                f"{name} modifies its input {s.target} in place; mpcompile cannot replay that. "
                "Return the new value instead of mutating the argument."
            )
        else:
            raise CaptureError(
                f"{name}: unsupported graph output kind {s.kind} ({s.target}); mutating "
                "parameters inside forward is not supported"
            )
    return inputs, outputs


def _canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter/buffer name -> the first name of the same tensor (what
    ``named_parameters()`` / ``named_buffers()`` report for it)."""
    out: dict[str, str] = {}
    for named in (model.named_parameters(remove_duplicate=False),
                  model.named_buffers(remove_duplicate=False)):
        first: dict[int, str] = {}
        for fqn, t in named:
            out[fqn] = first.setdefault(id(t), fqn)
    return out


def _untie(gm: fx.GraphModule, inputs: list[Binding], outputs: list[Binding],
           model: torch.nn.Module) -> tuple[list[Binding], dict[str, tuple[str, ...]]]:
    """One placeholder per tensor: torch.export lifts a tied parameter (an output projection
    sharing the embedding's weight) once per name; merge those into the first name's
    placeholder, so training keeps one master, one optimizer state and one working copy, and
    autograd sums the gradients of all uses."""
    canon = _canonical_names(model)
    kept: dict[tuple, fx.Node] = {}
    ties: dict[str, list[str]] = {}
    new_inputs = []
    for node, b in zip(list(gm.graph.find_nodes(op="placeholder")), inputs):
        if b.kind not in (BindingKind.PARAM, BindingKind.BUFFER):
            new_inputs.append(b)
            continue
        first = canon.get(b.target, b.target)
        key = (b.kind, first)
        if first != b.target:
            ties.setdefault(first, []).append(b.target)
        if key in kept:
            node.replace_all_uses_with(kept[key])
            gm.graph.erase_node(node)
            continue
        kept[key] = node
        new_inputs.append(Binding(b.kind, first))
    for b in outputs:
        if b.kind is BindingKind.BUFFER and canon.get(b.target, b.target) != b.target:
            raise CaptureError(f"buffer {b.target} is shared with {canon[b.target]} and updated "
                               "in forward; mpcompile cannot replay that")
    return new_inputs, {k: tuple(v) for k, v in ties.items()}


def _input_name(path: str) -> str:
    """"args[0]" -> "arg0", "kwargs['input_ids']" -> "input_ids", "args[1][0]" -> "arg1_0"."""
    m = re.fullmatch(r"kwargs\['([A-Za-z_]\w*)'\](.*)", path)
    head, rest = (m.group(1), m.group(2)) if m else ("arg", path.removeprefix("args"))
    tail = "_".join(re.findall(r"\w+", rest))
    return f"{head}{tail}" if head == "arg" else (f"{head}_{tail}" if tail else head)


def _module_of(node: fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    path = _strip(path) if path != "model" else ""
    typ = typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"
    return path, typ


def module_paths(node: fx.Node) -> list[str]:
    """Every enclosing module's dotted path, outermost first ("" = the model)."""
    out = []
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if path in ("", "model"):
            continue
        out.append(_strip(path))
    return out


_FRAME = re.compile(r'File "(.+?)", line (\d+), in (\S+)')


def _source_of(node: fx.Node) -> str:
    """The innermost frame of the node's stack trace outside torch itself: the model's line."""
    lines = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines() if ln.strip()]
    frames = []
    for i, ln in enumerate(lines):
        m = _FRAME.match(ln)
        if m:
            code = lines[i + 1] if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]) else ""
            frames.append((m.group(1), m.group(2), code))
    here = os.path.dirname(__file__).replace("\\", "/")
    for path, line, code in reversed(frames):
        norm = path.replace("\\", "/")
        if "/torch/" not in norm and not norm.startswith(here):
            return f"{path.replace(chr(92), '/').rsplit('/', 1)[-1]}:{line}  {code}"
    return ""
