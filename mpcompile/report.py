"""The report of a compiled program: nodes per precision, casts and their bytes, measured cast
traffic next to the local strategy and torch.autocast, generated kernels."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from . import passes
from .dtypes import dtype_name
from .fxutil import is_cast, is_getitem, val_dtype
from .measure import Traffic, autocast_traffic, measure
from .passes import Context
from .records import record
from .runtime.kernel import KernelCall

F32 = torch.float32


@dataclass(frozen=True)
class CastInfo:
    name: str
    source: str  # the tensor it casts
    src: str
    dst: str
    bytes: int
    of_parameter: bool


@dataclass(frozen=True)
class KernelInfo:
    """One matmul/convolution run by a generated kernel: which kernel, and what ran it last."""

    node: str
    kernel: str
    kind: str
    tile: str
    epilogue: str
    backend: str  # readable: state and detail
    state: str = ""  # KernelState value: "not run yet", "generated kernel", "library", "reference"

    def __str__(self) -> str:
        return (f"{self.node}: {self.kernel} ({self.kind}, tile {self.tile}, epilogue "
                f"{self.epilogue}) - {self.backend}")


def kernel_infos(gm: fx.GraphModule) -> tuple[KernelInfo, ...]:
    out = []
    for n in gm.graph.nodes:
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(mod, KernelCall):
            sp, t = mod.spec, mod.spec.tile
            out.append(KernelInfo(n.name, sp.name, sp.kind.value,
                                  f"{t.bm}x{t.bn}x{t.bk}/{t.warps}w/{t.stages}s",
                                  f"{list(sp.epilogue.ops)}->{sp.epilogue.out}"
                                  + (f", split-K {sp.split_k}" if sp.split_k > 1 else ""),
                                  mod.backend, mod.state.value))
    return tuple(out)


@dataclass(frozen=True)
class Report:
    """What mpcompile did to one program, and what it costs next to the alternatives."""

    model: str
    dtype: str
    device: str
    strategy: str
    op_nodes: int
    by_precision: dict[str, int]  # op nodes per precision ("float16", "float32", "no float")
    by_op: dict[str, dict[str, int]]  # op -> precision -> count
    by_class: dict[str, int]
    casts: tuple[CastInfo, ...]
    defaulted: dict[str, list[str]]  # op missing from the table -> nodes (ran in FP32)
    pinned: dict[str, list[str]]  # keep_fp32_modules entry -> nodes
    local_cast_bytes: int  # static forward cast bytes of the local strategy
    measured: dict[str, Traffic] = field(default_factory=dict)  # forward+backward, real calls
    autocast_error: str | None = None  # torch.autocast could not run this model
    kernels: tuple[KernelInfo, ...] = ()  # matmuls/convs run by generated kernels
    ties: dict[str, tuple[str, ...]] = field(default_factory=dict)  # shared parameters
    execution: str = ""  # which backend runs the program, why, compile time (backends.Status)

    @property
    def cast_bytes(self) -> int:
        return sum(c.bytes for c in self.casts)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["casts"] = [dataclasses.asdict(c) for c in self.casts]
        d["cast_bytes"] = self.cast_bytes
        d["measured"] = {k: v.as_dict() for k, v in self.measured.items()}
        return d

    def __str__(self) -> str:
        low = self.dtype
        n_low = self.by_precision.get(low, 0)
        lines = [
            f"mpcompile report: {self.model}, {low} on {self.device}, strategy {self.strategy}",
            f"Converted {n_low}/{self.op_nodes} op nodes to {low} using {len(self.casts)} casts "
            f"({self.cast_bytes:,} B per call).",
            *([f"Runs on: {self.execution}."] if self.execution else []),
            "",
            "op nodes by precision: " + ", ".join(f"{k}: {v}" for k, v in
                                                  sorted(self.by_precision.items())),
            "op nodes by class:     " + ", ".join(f"{k}: {v}" for k, v in
                                                  sorted(self.by_class.items())),
            "",
            f"{'op':<48}{low:>10}{'float32':>10}{'no float':>10}",
        ]
        for op, counts in sorted(self.by_op.items(), key=lambda kv: -sum(kv[1].values())):
            lines.append(f"{op:<48}{counts.get(low, 0) or '-':>10}"
                         f"{counts.get('float32', 0) or '-':>10}"
                         f"{counts.get('no float', 0) or '-':>10}")
        p = [c for c in self.casts if c.of_parameter]
        a = [c for c in self.casts if not c.of_parameter]
        lines += [
            "",
            f"casts inserted: {len(self.casts)} per call, {self.cast_bytes:,} B "
            f"(parameters: {len(p)}, {sum(c.bytes for c in p):,} B; activations and outputs: "
            f"{len(a)}, {sum(c.bytes for c in a):,} B); local strategy: "
            f"{self.local_cast_bytes:,} B",
        ]
        if self.measured:
            lines += ["", "cast traffic of one forward + backward, measured on real calls "
                          "(outputs delivered in the model's dtypes):",
                      f"{'':<28}{'fwd casts':>10}{'fwd bytes':>14}{'bwd casts':>10}"
                      f"{'bwd bytes':>14}{'total bytes':>14}"]
            for name, t in self.measured.items():
                lines.append(f"{name:<28}{t.forward_casts:>10}{t.forward_bytes:>14,}"
                             f"{t.backward_casts:>10}{t.backward_bytes:>14,}"
                             f"{t.total_bytes:>14,}")
            if self.autocast_error:
                lines.append(f"{'torch.autocast':<28}fails: {self.autocast_error[:160]}")
        lines.append("")
        if self.defaulted:
            lines.append("ops not in the policy table (ran in FP32; add them to the Policy if "
                         "safe):")
            for op, nodes in sorted(self.defaulted.items()):
                lines.append(f"  {op}: {', '.join(nodes)}")
        else:
            lines.append("ops not in the policy table: none")
        if self.kernels:
            lines.append(f"generated tensor-core kernels: {len(self.kernels)}")
            lines += [f"  {k}" for k in self.kernels]
        if self.ties:
            lines.append("tied parameters (one tensor, one master, gradients of all uses summed):")
            lines += [f"  {first} = {', '.join(others)}" for first, others in self.ties.items()]
        if self.pinned:
            lines.append("pinned to FP32 by keep_fp32_modules:")
            for pin, nodes in sorted(self.pinned.items()):
                lines.append(f"  {pin}: {len(nodes)} nodes")
        return "\n".join(lines)


def _op_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and not is_getitem(n) and record(n).created_by != "casts"]


def build_report(program, model: torch.nn.Module, measure_calls: bool = True) -> Report:
    gm = program.graph_module
    low = dtype_name(program.policy.dtype)
    by_precision: Counter = Counter()
    by_class: Counter = Counter()
    by_op: dict = defaultdict(Counter)
    defaulted: dict = defaultdict(list)
    pinned: dict = defaultdict(list)
    nodes = _op_nodes(gm)
    for n in nodes:
        rec = record(n)
        prec = dtype_name(rec.precision) if rec.precision is not None else "no float"
        by_precision[prec] += 1
        by_op[str(n.target)][prec] += 1
        by_class[str(rec.op_class)] += 1
        if rec.class_source == "default" and rec.precision is not None:
            defaulted[str(n.target)].append(n.name)
        if rec.pin:
            pinned[rec.pin.split(" (module")[0]].append(n.name)
    casts = tuple(_cast_info(n) for n in gm.graph.nodes if is_cast(n)
                  and record(n).created_by == "casts")
    other = "local" if program.policy.strategy == "mincut" else "mincut"
    other_gm = _other_strategy(program, model, other)
    other_bytes = sum(_cast_info(n).bytes for n in other_gm.graph.nodes
                      if is_cast(n) and record(n).created_by == "casts")
    measured: dict[str, Traffic] = {}
    autocast_error = None
    if measure_calls:
        args, kwargs = program.example
        out_dtypes = program.output_dtypes()
        names = {"mincut": "mpcompile (min-cut)", "local": "local strategy"}
        for strategy, g in ((program.policy.strategy, gm), (other, other_gm)):
            clone = copy.deepcopy(model)
            measured[names[strategy]] = measure(
                lambda g=g, clone=clone: program.run(clone, args, kwargs, gm=g), out_dtypes)
        if program.policy.dtype is not F32:
            try:
                measured["torch.autocast"] = autocast_traffic(
                    model, args, kwargs, program.policy.dtype, program.device_type, out_dtypes)
            except Exception as e:  # noqa: BLE001 - autocast itself fails on some models
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                autocast_error = f"{type(e).__name__}: {msg}"
    return Report(
        model=program.captured.model_name, dtype=low, device=program.device_type,
        strategy=program.policy.strategy, op_nodes=len(nodes),
        by_precision=dict(by_precision), by_op={k: dict(v) for k, v in by_op.items()},
        by_class=dict(by_class), casts=casts, defaulted=dict(defaulted), pinned=dict(pinned),
        local_cast_bytes=other_bytes if other == "local" else sum(c.bytes for c in casts),
        measured=measured, autocast_error=autocast_error,
        kernels=kernel_infos(program.executable), ties=dict(program.captured.ties),
        execution=str(program.execution) if program.runner is not None else "",
    )


def _other_strategy(program, model: torch.nn.Module, strategy: str) -> fx.GraphModule:
    policy = dataclasses.replace(program.policy, strategy=strategy)
    ctx = Context(policy, program.device_type, model, program.captured.inputs)
    return passes.run(passes.FORWARD, program.captured.gm, ctx).gm


def _cast_info(n: fx.Node) -> CastInfo:
    src = n.args[0]
    a, b = val_dtype(src), val_dtype(n)
    return CastInfo(n.name, src.name, dtype_name(a), dtype_name(b),
                    int(n.meta["val"].numel()) * (a.itemsize + b.itemsize),
                    src.op == "placeholder")
