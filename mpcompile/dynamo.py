"""``torch.compile(model, backend="mpcompile")``: every graph Dynamo captures runs in mixed
precision.

Dynamo splits a model at graph breaks and hands each captured graph to the backend, with the
model's parameters lifted to ordinary graph inputs. Each graph is converted by
:func:`mpcompile.convert` (same options: ``dtype``, the :class:`~mpcompile.Policy` fields,
``backend``), so casts carry gradients back to the real FP32 parameters and a ``torch.optim``
optimizer updates them as usual.

Two ways in:

- ``torch.compile(model, backend="mpcompile", options={...})`` (the ``torch_dynamo_backends``
  entry point :func:`mpcompile_backend`): nothing is kept; each graph's one-line summary is logged
  at INFO on the ``"mpcompile"`` logger, and ``options={"report": True}`` prints its report.
- ``torch.compile(model, backend=MPBackend(...))``: the backend object keeps every converted
  graph (:attr:`MPBackend.subgraphs`), so :meth:`MPBackend.reports` gives one report per graph.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from . import backends
from .api import MixedPrecisionModule
from .dtypes import dtype_name, from_name
from .errors import CaptureError, MPCompileError
from .policy import Policy
from .report import Report

log = logging.getLogger("mpcompile")

# Policy's own constructor arguments, usable directly as options
POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(Policy) if f.init)
OPTIONS = ("policy", "backend", "report", *POLICY_FIELDS)


@dataclass(frozen=True)
class Options:
    """The options of one backend, validated: what every captured graph is converted with."""

    policy: Policy
    backend: str = "auto"  # how each converted graph runs: "auto", "inductor" or "eager"
    report: bool = False  # print each graph's report when it is converted


def parse_options(options: Mapping[str, Any]) -> Options:
    """Validate backend options once, so a typo fails naming the option instead of being
    ignored; accepts what ``convert`` accepts (``dtype`` also as a name such as ``"bf16"``)."""
    if not isinstance(options, Mapping):
        raise MPCompileError(f"mpcompile options must be a dict, got {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in OPTIONS)
    if unknown:
        raise MPCompileError(
            f"unknown mpcompile option(s) {', '.join(map(repr, unknown))}: the options are "
            f"{', '.join(map(repr, OPTIONS))}")
    fields = {k: v for k, v in options.items() if k in POLICY_FIELDS}
    if "dtype" in fields:
        fields["dtype"] = _dtype(fields["dtype"])
    if fields.get("keep_fp32_modules"):
        raise MPCompileError(
            "option 'keep_fp32_modules' cannot work under torch.compile: Dynamo inlines the "
            "model's submodules, so its graphs have no module paths to match. Pin ops instead "
            "(option 'fp32': [torch.ops.aten.<op>]), or use mpcompile.convert(model, ...)")
    policy = options.get("policy")
    if policy is None:
        policy = Policy(**fields)
    elif not isinstance(policy, Policy):
        raise MPCompileError(f"option 'policy' must be an mpcompile.Policy, got "
                             f"{type(policy).__name__}")
    else:
        # as in convert(): a dtype equal to the policy's is fine, any other field is ambiguous
        clash = sorted(k for k, v in fields.items() if k != "dtype" or v != policy.dtype)
        if clash:
            raise MPCompileError(
                f"option(s) {', '.join(map(repr, clash))} conflict with option 'policy': give "
                "them inside the Policy, or drop 'policy'")
    backend = options.get("backend", "auto")
    if backend not in backends.BACKENDS:
        raise MPCompileError(f"option 'backend'={backend!r}: give one of "
                             f"{', '.join(map(repr, backends.BACKENDS))}")
    report = options.get("report", False)
    if not isinstance(report, bool):
        raise MPCompileError(f"option 'report'={report!r}: give True or False")
    return Options(policy, backend, report)


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, str):
        try:
            return from_name(value)
        except MPCompileError as e:
            raise MPCompileError(f"option 'dtype'={value!r}: {e}") from None
    return value  # a torch.dtype; Policy() rejects anything it cannot use, naming dtype


class Subgraph:
    """One graph Dynamo captured, converted to mixed precision; Dynamo's compiled code calls it
    in place of the graph.

    The graph is captured on its first call, not when Dynamo hands it over: Dynamo's example
    inputs are real tensors in torch 2.13, with symbolic sizes (``SymInt``) among them for
    dynamic shapes, and its backend contract allows fake tensors; calls always get real values.
    ``module`` is the :class:`~mpcompile.MixedPrecisionModule` (``graph_module``, ``report()``,
    ``explain()``); it compiles one program per input signature (with dynamic shapes, one per
    concrete shape).
    """

    def __init__(self, gm: fx.GraphModule, options: Options):
        self.name = _graph_name(gm)
        self.options = options
        # Inductor gets each graph directly (direct=True: torch._inductor.compile, whose
        # AOTAutograd also compiles the backward), not through a second Dynamo: under Dynamo's
        # compiled code, torch.compile(fullgraph=True) raises "found no compiled frames" (torch
        # 2.13), and Dynamo's guards already fix the shapes, grad mode and requires_grad each
        # graph is called with
        self.module = MixedPrecisionModule(gm, options.policy, backend=options.backend,
                                           direct=True,
                                           label=f"graph {self.name} under torch.compile")

    def __call__(self, *args: Any) -> Any:
        first = not self.compiled
        try:
            program = self.module.program_for(args)
        except CaptureError as e:
            raise CaptureError(_capture_hint(self.name, e)) from e
        out = program.run(self.module, args, {})
        if first:
            self._announce()
        return out

    @property
    def compiled(self) -> bool:
        """Has the graph been captured and converted (by its first call)?"""
        return bool(self.module.programs)

    def report(self, measure: bool = False) -> Report:
        """This graph's :class:`~mpcompile.Report` (``measure=True`` also re-runs the inputs of
        its first call to count the casts that really happen)."""
        return self.module.report(measure=measure)

    def summary(self) -> str:
        """One line: how much of this graph runs in low precision, and on which backend."""
        if not self.compiled:
            return f"graph {self.name}: not run yet (converted on its first call)"
        r = self.report()
        low = r.by_precision.get(r.dtype, 0)
        return (f"graph {self.name}: {low}/{r.op_nodes} op nodes in {r.dtype}, "
                f"{len(r.casts)} casts ({r.cast_bytes:,} B per call), runs "
                f"{self.module.execution}")

    def _announce(self) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("mpcompile: %s", self.summary())
        if self.options.report:
            print(f"mpcompile: graph {self.name}\n{self.report()}")

    def __repr__(self) -> str:
        return (f"Subgraph({self.name}, {dtype_name(self.options.policy.dtype)}, "
                f"backend={self.options.backend!r})")


def _capture_hint(name: str, e: CaptureError) -> str:
    """A capture error in Dynamo's terms: the user never wrote this graph's inputs."""
    return (f"torch.compile graph {name} cannot be converted to mixed precision: {e}\n"
            "Under torch.compile, Dynamo passes the model's parameters and buffers to each graph "
            "as inputs, so a buffer the model updates in place (BatchNorm's running statistics "
            "in training mode) is an input mutation here. Convert such a model with "
            "mpcompile.convert(model, ...), which keeps buffers as buffers.")


def _graph_name(gm: fx.GraphModule) -> str:
    """Dynamo's compile id ("0/0": frame/recompile), which its own logs use too."""
    cid = gm.meta.get("dynamo_compile_id") if hasattr(gm, "meta") else None
    return str(cid) if cid is not None else type(gm).__name__


def _check_call(kwargs: Mapping[str, Any], where: str) -> dict:
    """torch.compile passes ``mode`` (when not "default") and ``options`` as keywords."""
    kwargs = dict(kwargs)
    mode = kwargs.pop("mode", None)
    options = kwargs.pop("options", None) or {}
    if mode is not None:
        raise MPCompileError(
            f"torch.compile(mode={mode!r}) is an Inductor setting and means nothing to "
            f"{where}; drop it (option 'backend': 'inductor' runs each graph through Inductor)")
    if kwargs:
        raise MPCompileError(f"{where} got unexpected argument(s) {sorted(kwargs)}")
    return options


def mpcompile_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                      **kwargs: Any) -> Callable[..., Any]:
    """The ``torch_dynamo_backends`` entry point: ``torch.compile(model, backend="mpcompile",
    options={"dtype": torch.bfloat16, "backend": "eager", "report": True, ...})``.

    Keeps nothing between graphs (pass an :class:`MPBackend` to keep the reports)."""
    options = parse_options(_check_call(kwargs, 'backend="mpcompile"'))
    return Subgraph(gm, options)


class MPBackend:
    """A Dynamo backend that keeps what it compiled:
    ``torch.compile(model, backend=MPBackend(dtype=torch.bfloat16))``.

    Takes the options of :func:`mpcompile_backend` as keywords (validated here). Every graph
    Dynamo hands it (one per graph break, plus recompilations) is appended to
    :attr:`subgraphs`; :meth:`reports` gives their reports. ``torch._dynamo.reset()`` clears it.
    """

    def __init__(self, **options: Any):
        self.options = parse_options(options)
        self.subgraphs: list[Subgraph] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any],
                 **kwargs: Any) -> Subgraph:
        if _check_call(kwargs, "an MPBackend"):
            raise MPCompileError("an MPBackend takes its options when built, "
                                 "MPBackend(dtype=...), not through torch.compile(options=...)")
        sub = Subgraph(gm, self.options)
        self.subgraphs.append(sub)
        return sub

    def reports(self, measure: bool = False) -> list[Report]:
        """One report per converted graph, in the order Dynamo compiled them (graphs not
        captured yet, because Dynamo gave symbolic inputs and they never ran, are skipped)."""
        return [s.report(measure) for s in self.subgraphs if s.compiled]

    def reset(self) -> None:
        """Forget the converted graphs (``torch._dynamo.reset()`` calls this)."""
        self.subgraphs.clear()

    def __repr__(self) -> str:
        return (f"MPBackend({dtype_name(self.options.policy.dtype)}, "
                f"backend={self.options.backend!r}, {len(self.subgraphs)} graphs)")


__all__ = ["OPTIONS", "MPBackend", "Options", "Subgraph", "mpcompile_backend", "parse_options"]
