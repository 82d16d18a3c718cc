"""The dataflow model of casts, shared by the assignment, the cast pass and the reports.

A *handle* is a node whose value is one floating-point tensor (a single-output op, a placeholder,
or the ``getitem`` that selects one output of a multi-output op). Each handle has uses
``(consumer, argument path, schema argument name)``. Given a *label* for every op node (the dtype
it computes in: the low dtype or float32), the model says

- which dtype each handle then has (``dtype_of``: found by running the op on fake tensors in that
  precision, so e.g. batch norm's running statistics stay float32 while its output is low),
- which dtype each use needs (``requirement``): the consumer's label, float32 for arguments the
  policy keeps in FP32 (norm weights, running stats), the original dtype for graph outputs,
  nothing for an explicit cast (it converts anyway); and tensors that were not float32 in the
  captured model are never converted,
- and so the casts (``casts``): one per (handle, needed dtype) that differs from the handle's
  dtype, costing ``numel * (bytes of source + bytes of target)`` (one read, one write).

The assignment pass minimises exactly this count; the cast pass inserts exactly these casts.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import MPCompileError
from .fxutil import arg_slots, is_cast, is_float, is_getitem, tensors_of, val_dtype
from .records import record

F32 = torch.float32


@dataclass(frozen=True)
class Use:
    node: fx.Node
    path: tuple
    slot: str


@dataclass(frozen=True)
class CastNeed:
    handle: fx.Node
    src: torch.dtype
    dst: torch.dtype
    uses: tuple[Use, ...]

    @property
    def bytes(self) -> int:
        return cast_bytes(self.handle, self.src, self.dst)


def cast_bytes(handle: fx.Node, src: torch.dtype, dst: torch.dtype) -> int:
    n = handle.meta["val"].numel()
    return int(n) * (src.itemsize + dst.itemsize)


class ProbeError(MPCompileError):
    """An op's kernel rejects a precision (caught by the assignment, which then keeps FP32)."""


def retargeted(node: fx.Node, dtype: torch.dtype) -> tuple[tuple, dict] | None:
    """(args, kwargs) of ``node`` with its float32 ``dtype`` argument set to ``dtype``: creation
    ops and explicit casts produce the precision chosen for them instead of being cast after.
    None when the node has no such argument."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    names = [a.name for a in schema.arguments]
    if "dtype" not in names:
        return None
    i = names.index("dtype")
    args, kwargs = list(node.args), dict(node.kwargs)
    cur = args[i] if i < len(args) else kwargs.get("dtype")
    has_float_input = any(is_float(val_dtype(a)) for _, _, a in arg_slots(node))
    if cur is F32 or (cur is None and not has_float_input and val_dtype(node) is F32):
        if i < len(args):
            args[i] = dtype
        else:
            kwargs["dtype"] = dtype
        return tuple(args), kwargs
    return None


def scalar_out_of_range(node: fx.Node, dtype: torch.dtype) -> float | None:
    """A finite Python number among the node's arguments that ``dtype`` cannot hold (e.g.
    ``torch.finfo(torch.float32).min`` used as a mask value), or None."""
    if dtype is F32:
        return None
    big = torch.finfo(dtype).max

    def scan(a):
        if isinstance(a, bool) or not isinstance(a, numbers.Real):
            if isinstance(a, (tuple, list)):
                for b in a:
                    r = scan(b)
                    if r is not None:
                        return r
            return None
        x = float(a)
        return x if math.isfinite(x) and abs(x) > big else None

    for a in (*node.args, *node.kwargs.values()):
        r = scan(a)
        if r is not None:
            return r
    return None


class CastModel:
    """Handles, uses and the probe table of one graph (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, low: torch.dtype):
        self.gm = gm
        self.low = low
        self.handles: list[fx.Node] = []
        self.uses: dict[fx.Node, list[Use]] = {}
        self.captured: dict[fx.Node, torch.dtype] = {}
        self.producer: dict[fx.Node, tuple[fx.Node, int]] = {}
        for n in gm.graph.nodes:
            if n.op == "output":
                continue
            if is_float(val_dtype(n)):
                self.handles.append(n)
                self.uses[n] = []
                self.captured[n] = val_dtype(n)
                if is_getitem(n):
                    self.producer[n] = (n.args[0], n.args[1])
                else:
                    self.producer[n] = (n, 0)
        self.outputs_of: dict[fx.Node, list[fx.Node]] = {}
        for h, (p, _) in self.producer.items():
            self.outputs_of.setdefault(p, []).append(h)
        for n in gm.graph.nodes:
            for path, slot, a in arg_slots(n):
                if a in self.uses:
                    self.uses[a].append(Use(n, path, slot))
        vals = [n.meta["val"] for n in self.handles if hasattr(n.meta.get("val"), "fake_mode")]
        self.mode = vals[0].fake_mode if vals else None
        self._probe: dict[tuple[fx.Node, torch.dtype], tuple] = {}

    # -- per-node facts --------------------------------------------------------------------

    def inputs(self, node: fx.Node) -> list[tuple[Use, fx.Node]]:
        """(use, handle) for each float tensor among ``node``'s arguments."""
        return [(Use(node, p, s), a) for p, s, a in arg_slots(node) if a in self.uses]

    def float_relevant(self, node: fx.Node) -> bool:
        """Does the node read or write a floating-point tensor (so its precision matters)?"""
        if any(True for _ in self.inputs(node)):
            return True
        return any(is_float(t.dtype) for t in tensors_of(node.meta.get("val")) if t is not None)

    def requirement(self, use: Use, handle: fx.Node, labels: dict) -> torch.dtype | None:
        """The dtype ``use`` needs ``handle`` in, given the labels; None: any dtype."""
        cap = self.captured[handle]
        if cap is not F32:
            return cap
        node = use.node
        if node.op == "output":
            return cap
        if is_cast(node):
            return None
        if node.op == "call_function" and use.slot in record(node).fp32_args:
            return F32
        return labels.get(node, cap)

    def probe(self, node: fx.Node, label: torch.dtype) -> tuple:
        """Output dtypes of ``node`` computing in ``label`` (fake execution, cached)."""
        key = (node, label)
        if key not in self._probe:
            self._probe[key] = self._run_probe(node, label)
        out = self._probe[key]
        if isinstance(out, ProbeError):
            raise out
        return out

    def _run_probe(self, node: fx.Node, label: torch.dtype):
        bad = scalar_out_of_range(node, label)
        if bad is not None:
            return ProbeError(f"its argument {bad:.4g} does not fit in {label}")
        labels = {node: label}
        fake_by_path = {}
        for use, h in self.inputs(node):
            need = self.requirement(use, h, labels)
            v = h.meta["val"]
            if need is not None and need != v.dtype:
                with self.mode:
                    v = v.to(need)
            fake_by_path[use.path] = v
        rt = retargeted(node, label) if label is not F32 else None
        args, kwargs = rt if rt is not None else (node.args, node.kwargs)
        args, kwargs = list(args), dict(kwargs)
        ref = (args, kwargs)

        def sub(x, path):
            if isinstance(x, fx.Node):
                return fake_by_path.get(path, x.meta.get("val"))
            if isinstance(x, (tuple, list)):
                return type(x)(sub(b, (*path, j)) for j, b in enumerate(x))
            return x

        args = [sub(a, ("args", i)) for i, a in enumerate(ref[0])]
        kwargs = {k: sub(a, ("kwargs", k)) for k, a in ref[1].items()}
        try:
            with self.mode:
                out = node.target(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the op rejects this precision
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return ProbeError(f"it fails with {label} inputs: {msg}")
        return tuple(t.dtype if t is not None else None for t in tensors_of(out))

    # -- whole-graph quantities -------------------------------------------------------------

    def dtype_of(self, handle: fx.Node, labels: dict) -> torch.dtype:
        node, idx = self.producer[handle]
        if node.op != "call_function" or node not in labels:
            return self.captured[handle]
        out = self.probe(node, labels[node])
        return out[idx] if idx < len(out) and out[idx] is not None else self.captured[handle]

    def needs(self, handle: fx.Node, labels: dict) -> dict[torch.dtype, list[Use]]:
        out: dict[torch.dtype, list[Use]] = {}
        for use in self.uses[handle]:
            r = self.requirement(use, handle, labels)
            if r is not None:
                out.setdefault(r, []).append(use)
        return out

    def casts(self, labels: dict, handles=None) -> list[CastNeed]:
        out = []
        for h in self.handles if handles is None else handles:
            d = self.dtype_of(h, labels)
            for need, uses in self.needs(h, labels).items():
                if need != d:
                    out.append(CastNeed(h, d, need, tuple(uses)))
        return out

    def cast_bytes(self, labels: dict, handles=None) -> int:
        return sum(c.bytes for c in self.casts(labels, handles))

    def touching(self, node: fx.Node) -> list[fx.Node]:
        """Handles whose cast cost can change when ``node``'s label changes."""
        hs = dict.fromkeys(h for _, h in self.inputs(node))
        hs.update(dict.fromkeys(self.outputs_of.get(node, ())))
        return list(hs)

    def traffic_saved(self, node: fx.Node) -> int:
        """Bytes of float32 tensor traffic this node avoids by computing in low precision."""
        per = F32.itemsize - self.low.itemsize
        n = sum(h.meta["val"].numel() for _, h in self.inputs(node) if self.captured[h] is F32)
        n += sum(int(t.numel()) for t in tensors_of(node.meta.get("val"))
                 if t is not None and t.dtype is F32)
        return int(n) * per
