"""Stage 4: tidy the casts.

- a cast of a cast folds when the middle dtype holds every value of the first exactly
  (fp16 -> fp32 -> fp16 is the identity; fp16 -> fp32 -> bf16 is fp16 -> bf16); a rounding cast
  in the middle (fp32 -> fp16 -> fp32) is real arithmetic and stays;
- a cast to the dtype its input already has is dropped;
- two casts of one tensor to one dtype become one;
- a cast nobody uses is dropped.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..dtypes import dtype_name
from ..fxutil import copy_module, is_cast, val_dtype
from ..records import record, update
from .context import Context

_WIDER = {
    torch.float32: (torch.float16, torch.bfloat16),
    torch.float64: (torch.float16, torch.bfloat16, torch.float32),
}


def exact(middle: torch.dtype, src: torch.dtype) -> bool:
    """Does ``middle`` represent every value of ``src`` exactly?"""
    return middle == src or src in _WIDER.get(middle, ())


def _plain(n: fx.Node) -> bool:
    """A cast that only changes dtype (no device, layout or memory-format change)."""
    return is_cast(n) and set(n.kwargs) == {"dtype"} and len(n.args) == 1


def run(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    gm = copy_module(gm)
    g = gm.graph
    for n in list(g.nodes):
        mid = n.args[0] if _plain(n) else None
        if not isinstance(mid, fx.Node) or not _plain(mid):
            continue
        x = mid.args[0]
        src, a, b = val_dtype(x), mid.kwargs["dtype"], n.kwargs["dtype"]
        if src is None or not exact(a, src):
            continue
        note = f" (folded {dtype_name(src)}->{dtype_name(a)}->{dtype_name(b)})"
        if b == src:
            n.replace_all_uses_with(x)
            g.erase_node(n)
        else:
            n.args = (x,)
            update(n, decision=record(n).decision + note)
    for n in list(g.nodes):
        src = n.args[0] if _plain(n) else None
        # (an identity cast of an input that is returned as is stays: outputs don't alias inputs)
        aliasing = src is not None and src.op == "placeholder" and any(
            u.op == "output" for u in n.users)
        if src is not None and val_dtype(src) == n.kwargs["dtype"] and not aliasing:
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
    seen: dict = {}
    for n in list(g.nodes):
        if _plain(n):
            key = (n.args[0], n.kwargs["dtype"])
            if key in seen:
                n.replace_all_uses_with(seen[key])
                g.erase_node(n)
            else:
                seen[key] = n
    changed = True
    while changed:
        changed = False
        for n in reversed(list(g.nodes)):
            if is_cast(n) and not n.users:
                g.erase_node(n)
                changed = True
    return gm
