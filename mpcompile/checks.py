"""The invariants checked after every pass: a valid graph, dtypes that every op accepts (by
fake-tensor propagation, which also refreshes ``node.meta["val"]``), provenance on every node.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .dtypes import dtype_name
from .errors import PassError
from .fxutil import arg_slots, val_dtype
from .records import MP


class _Prop(FakeTensorProp):
    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, stage: str):
        super().__init__(gm, mode)
        self.stage = stage

    def run_node(self, n: fx.Node):
        try:
            return super().run_node(n)
        except PassError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the node named
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            ins = ", ".join(f"{a.name}:{dtype_name(val_dtype(a))}" for _, _, a in arg_slots(n))
            raise PassError(
                f"after stage '{self.stage}', node {n.name} ({n.target}) fails on its inputs "
                f"({ins}): {msg}"
            ) from e


def fake_inputs(gm: fx.GraphModule, mode: FakeTensorMode) -> list[torch.Tensor]:
    out = []
    with mode:
        for n in gm.graph.find_nodes(op="placeholder"):
            v = n.meta["val"]
            out.append(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device))
    return out


def refresh(gm: fx.GraphModule, stage: str) -> None:
    """Re-derive ``meta['val']`` of every node by fake propagation (a dtype/shape check)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _Prop(gm, mode, stage).propagate_dont_convert_inputs(*fake_inputs(gm, mode))


def check(gm: fx.GraphModule, stage: str) -> fx.GraphModule:
    """Lint, re-propagate dtypes, and require provenance on every node."""
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001
        raise PassError(f"stage '{stage}' left an invalid graph: {e}") from e
    gm.recompile()
    refresh(gm, stage)
    for n in gm.graph.nodes:
        if n.op != "output" and MP not in n.meta:
            raise PassError(f"stage '{stage}' created node {n.name} without a provenance record")
    return gm


