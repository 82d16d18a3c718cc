"""Export pass: fx -> fx rewrites that make a mixed-precision graph valid ONNX.

- ONNX ``LayerNormalization`` and ``GroupNormalization`` take the input and the scale/bias in one
  type, while mpcompile runs them (FP32_ACCUM) on low-precision activations with FP32 weights,
  which torch's kernels accept. For export such a node reads its input widened to FP32 and its
  output is rounded back: the same arithmetic as the kernel's (FP32 inside, one rounding).
- ``copy(dst, src)`` with a smaller ``src`` (``mask[0:2] = 1`` in a model) broadcasts ``src``;
  torch.onnx's translation does not (a rank error in shape inference): ``src`` is expanded first.
- ``split_with_sizes`` / ``unbind`` return lists, which torch.onnx writes as
  ``SplitToSequence`` + ``SequenceAt``; ONNX's sequence ops have no bfloat16. Each selected piece
  becomes a ``slice`` / ``select`` of the input instead (plain Slice/Gather in ONNX).
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator

import torch
import torch.fx as fx

from ..fxutil import copy_module
from ..records import MP
from .context import Context

aten = torch.ops.aten
_MIXED_NORMS = {aten.native_layer_norm.default: (2, 3), aten.native_group_norm.default: (1, 2)}
CAST = aten._to_copy.default


def _dtype(n) -> torch.dtype | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


def _as(val: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return val.to(dtype)
    with mode:
        return val.to(dtype)


def _made_here(node: fx.Node, why: str) -> None:
    rec = node.meta.get(MP)
    if rec is not None:
        node.meta[MP] = dataclasses.replace(rec, created_by="legalize", decision=why)


def run(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    gm = copy_module(gm)
    g = gm.graph
    for node in list(g.nodes):
        slots = _MIXED_NORMS.get(node.target)
        if node.op != "call_function" or slots is None:
            continue
        x = node.args[0]
        low = _dtype(x)
        wide = {_dtype(node.args[i]) for i in slots if i < len(node.args)} - {None}
        if low is None or not wide or wide == {low}:
            continue
        (target,) = wide
        with g.inserting_before(node):
            up = g.call_function(CAST, (x,), {"dtype": target})
        up.meta.update(x.meta)
        up.meta["val"] = _as(x.meta["val"], target)
        _made_here(up, f"widens {x.name} for {node.name}: ONNX wants input and scale in one type")
        node.args = (up, *node.args[1:])
        for user in list(node.users):
            if user.target is operator.getitem and user.args[1] == 0:
                with g.inserting_after(user):
                    down = g.call_function(CAST, (user,), {"dtype": low})
                down.meta.update(user.meta)
                user.meta["val"] = _as(user.meta["val"], target)
                _made_here(down, f"rounds {node.name}'s output back to its precision")
                user.replace_all_uses_with(down, delete_user_cb=lambda u, d=down: u is not d)
    _split_to_slices(g)
    _broadcast_copies(g)
    g.lint()
    gm.recompile()
    return gm


def _split_to_slices(g: fx.Graph) -> None:
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.split_with_sizes.default:
            x, sizes = node.args[0], node.args[1]
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            starts = [sum(sizes[:i]) for i in range(len(sizes))]

            def piece(i, x=x, dim=dim, starts=starts, sizes=sizes):
                return aten.slice.Tensor, (x, dim, starts[i], starts[i] + sizes[i])
        elif node.target is aten.unbind.int:
            x = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)

            def piece(i, x=x, dim=dim):
                return aten.select.int, (x, dim, i)
        else:
            continue
        users = list(node.users)
        if not all(u.target is operator.getitem for u in users):
            continue
        for u in users:
            target, args = piece(u.args[1])
            with g.inserting_before(u):
                new = g.call_function(target, args)
            new.meta.update(u.meta)
            _made_here(new, f"a slice in place of {node.name} (ONNX sequences have no bfloat16)")
            u.replace_all_uses_with(new)
            g.erase_node(u)
        g.erase_node(node)


def _broadcast_copies(g: fx.Graph) -> None:
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not aten.copy.default:
            continue
        dst, src = node.args[:2]
        if not isinstance(src, fx.Node):
            continue
        shape = list(dst.meta["val"].shape)
        if list(src.meta["val"].shape) == shape:
            continue
        with g.inserting_before(node):
            wide = g.call_function(aten.expand.default, (src, shape))
        wide.meta.update(src.meta)
        mode = getattr(src.meta["val"], "fake_mode", None)
        with mode if mode is not None else contextlib.nullcontext():
            wide.meta["val"] = src.meta["val"].expand(shape)
        _made_here(wide, f"broadcasts {src.name} for {node.name}: ONNX's copy does not")
        node.args = (dst, wide, *node.args[2:])
