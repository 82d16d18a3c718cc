"""The pipeline: one straight list of graph -> graph stages.

Each stage copies the graph it is given, rewrites the copy and returns it; ``check`` runs after
every stage (fx lint, fake-tensor dtype propagation, provenance on every node), and the cast
stages also check that every op sees the precision it was assigned.
"""

from __future__ import annotations

import torch.fx as fx

from ..capture import Captured
from ..meta import check, copy_module
from . import assign, casts, classify, cleanup, lower
from .context import Context

PIPELINE = (
    ("classify", classify.run),  # op -> LOWER/FP32/FP32_ACCUM/FOLLOW/PASSTHROUGH; pins; bans
    ("assign", assign.run),  # precision of every op: fixed by class, or min-cut for free ops
    ("casts", casts.run),  # one cast per (tensor, dtype); creation ops retargeted
    ("cleanup", cleanup.run),  # fold cast chains; drop identity, duplicate and dead casts
    ("lower", lower.run),  # matmuls/convs -> generated tensor-core kernels (Policy.kernels)
)
_CHECK_PRECISIONS = ("casts", "cleanup")
UNLOWERED = "cleanup"  # the last stage before kernels: what export and reports read


def run_pipeline(captured: Captured, ctx: Context) -> dict[str, fx.GraphModule]:
    """Every stage's graph, by stage name, starting with the captured one."""
    gm = check(copy_module(captured.gm), "capture")
    stages = {"capture": gm}
    for name, stage in PIPELINE:
        gm = check(stage(gm, ctx), name)
        if name in _CHECK_PRECISIONS:
            casts.check_precisions(gm, name)
        stages[name] = gm
    return stages


__all__ = ["PIPELINE", "UNLOWERED", "Context", "run_pipeline"]
