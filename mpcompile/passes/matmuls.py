"""Fold batched matmuls of a broadcast weight back into one matmul.

``linear`` (or ``matmul``) of a 3-D input that is not a plain view of a 2-D one (attention's
in-projection on a transposed ``(seq, batch, d)`` tensor) reaches the captured graph as

    bmm(view(expand(x)), view(expand(W^T, [B, K, N])))

the weight expanded over the batch. Eager torch runs one ``mm`` on the flattened input; run as
written, the expand is materialised (B copies of the weight) and autograd's backward clones and
sums it again, hundreds of MB per call for a transformer. This pass rewrites it as

    reshape(mm(reshape(x, [B*M, K]), W^T), [B, M, N])

the same products and sums per output element. It runs first, so the rest of the pipeline sees
the matmul eager would run.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..fxutil import copy_module
from ..records import MP, record
from .context import Context

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
STAGE = "fold_matmuls"


def _shape(n: fx.Node) -> tuple[int, ...]:
    return tuple(n.meta["val"].shape)


def _broadcast_matrix(b: fx.Node) -> fx.Node | None:
    """The 2-D (or [1, K, N]) tensor that ``b`` -- a [B, K, N] bmm operand -- expands over the
    batch, or None."""
    x = b
    while x.op == "call_function" and x.target in _VIEWS and _shape(x) == _shape(b):
        x = x.args[0]
    if not (x.op == "call_function" and x.target is aten.expand.default):
        return None
    src = x.args[0]
    shape = _shape(src)
    if len(shape) == 2 or (len(shape) == 3 and shape[0] == 1):
        return src if shape[-2:] == _shape(b)[1:] else None
    return None


def _erase_dead(g: fx.Graph, x: fx.Node) -> None:
    """Erase ``x`` and the views/expand it was made of, while nothing else uses them."""
    while x.op == "call_function" and not x.users and (
            x.target in _VIEWS or x.target is aten.expand.default):
        src = x.args[0]
        g.erase_node(x)
        x = src


def run(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    gm = copy_module(gm)
    g = gm.graph
    for n in list(g.find_nodes(op="call_function", target=aten.bmm.default)):
        a, b = n.args
        w = _broadcast_matrix(b)
        if w is None:
            continue
        (bsz, m, k), n_out = _shape(a), _shape(b)[2]

        def node(target, args, n=n, why=f"bmm of a weight broadcast over {bsz} batches, "
                 "as one mm"):
            new = g.call_function(target, args)
            new.meta = {key: v for key, v in n.meta.items() if key != "val"}
            new.meta[MP] = dataclasses.replace(record(n), created_by=STAGE, decision=why)
            return new

        with g.inserting_before(n):
            flat = node(aten.reshape.default, (a, [bsz * m, k]))
            mat = w if len(_shape(w)) == 2 else node(aten.reshape.default, (w, [k, n_out]))
            out = node(aten.reshape.default, (node(aten.mm.default, (flat, mat)),
                                              [bsz, m, n_out]))
        n.replace_all_uses_with(out)
        g.erase_node(n)
        _erase_dead(g, b)
    gm.recompile()
    return gm
