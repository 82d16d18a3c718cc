"""Counting what really runs: casts (and ops by dtype) seen by a ``TorchDispatchMode``.

A dispatch mode sees every ATen call below autograd, torch.autocast's own casts and the backward
included, so one counter measures mpcompile, the local strategy and torch.autocast the same way.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .signature import flatten_output

aten = torch.ops.aten
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device}


class CastCounter(TorchDispatchMode):
    """Records every dtype-changing float cast (count and bytes read + written) and, for each op,
    the dtypes of its floating-point inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.casts: list[tuple[torch.dtype, torch.dtype, int]] = []
        self.op_dtypes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func in _CASTS and src is not None and isinstance(out, torch.Tensor):
            if src.dtype != out.dtype and src.is_floating_point() and out.is_floating_point():
                self.casts.append((src.dtype, out.dtype, out.numel()))
        elif func is aten.copy_.default and src is not None and args[1].dtype != src.dtype:
            if src.is_floating_point() and args[1].is_floating_point():
                self.casts.append((args[1].dtype, src.dtype, src.numel()))
        else:
            dts = tuple(sorted({str(a.dtype) for a in args if isinstance(a, torch.Tensor)
                                and a.is_floating_point()}))
            if dts:
                self.op_dtypes[(str(func), dts)] += 1
        return out

    @property
    def count(self) -> int:
        return len(self.casts)

    @property
    def bytes(self) -> int:
        return sum(n * (a.itemsize + b.itemsize) for a, b, n in self.casts)


@dataclass(frozen=True)
class Traffic:
    """Casts of one forward + backward call, measured."""

    forward_casts: int
    forward_bytes: int
    backward_casts: int
    backward_bytes: int
    forward_ops: dict = field(default_factory=dict, compare=False)

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("forward_ops")
        return d


def measure(forward: Callable[[], object], out_dtypes: list[torch.dtype] | None = None
            ) -> Traffic:
    """Run ``forward()`` and a backward from all its float outputs, counting casts in each.

    Protocol: the outputs are delivered in ``out_dtypes`` (the model's own output dtypes, as a
    loss would consume them; torch.autocast returns low-precision outputs, so this counts the
    cast every loss in autocast's FP32 list makes), and the backward is seeded with ones in those
    dtypes."""
    fwd = CastCounter()
    with fwd:
        out = forward()
        leaves, _ = flatten_output(out)
        if out_dtypes is not None:
            leaves = [t.to(d) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                      for t, d in zip(leaves, out_dtypes)]
    outs = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    bwd = CastCounter()
    if outs:
        with bwd:
            torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
    return Traffic(fwd.count, fwd.bytes, bwd.count, bwd.bytes, dict(fwd.op_dtypes))


def autocast_traffic(model: torch.nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype,
                     device_type: str, out_dtypes: list[torch.dtype] | None = None) -> Traffic:
    """What ``torch.autocast`` does on a copy of ``model`` (the model itself is untouched)."""
    clone = copy.deepcopy(model)

    def fwd():
        with torch.autocast(device_type, dtype=dtype):
            return clone(*args, **kwargs)

    return measure(fwd, out_dtypes)
