"""The pipelines: each a declared list of passes (``base.Pass``), run by ``base.run``.

Every pass copies the graph it is given, rewrites the copy and returns it; after each, the
runner checks the common invariants (fx lint, fake-tensor dtype propagation, provenance on every
node) and the pass's ``ensures``, and records the graph under the pass's name.

    FORWARD     what ``convert`` compiles: the mixed-precision graph (the artefact users read)
    TRAINING    applied to FORWARD's graph for a training step; ``train.trace`` then builds the
                step graph on it
    EXECUTION   applied to the graph that runs (forward or step): generated kernels; views as
                reshapes (fake-tensor strides after a cast can differ from the real kernel's);
                a step adds ``state_in_place(names)``
    EXPORT_FORWARD, EXPORT_FORWARD_FP32_WEIGHTS, EXPORT_STEP   before ``torch.onnx.export``
"""

from __future__ import annotations

import functools

from . import (
    assign,
    casts,
    classify,
    cleanup,
    decompose,
    in_place,
    kernels,
    legalize,
    matmuls,
    views,
    working_copies,
)
from .base import Condition, Pass, PassResult, Stages, run
from .conditions import ASSIGNED, CLASSIFIED, PRECISIONS_APPLIED
from .context import Context

FOLD_MATMULS = Pass(matmuls.STAGE, matmuls.run, "bmm of a weight expanded over the batch -> "
                    "one mm on the flattened input (what eager's linear runs)")
CLASSIFY = Pass("classify", classify.run, "op -> LOWER/FP32/FP32_ACCUM/FOLLOW/PASSTHROUGH from "
                "the policy table and user overrides; module pins; bans", ensures=(CLASSIFIED,))
ASSIGN = Pass("assign", assign.run, "precision of every op: fixed by its class, or a global "
              "min-cut over the free ops", requires=(CLASSIFIED,), ensures=(ASSIGNED,))
CASTS = Pass("casts", casts.run, "one cast per (tensor, dtype); creation ops retargeted",
             requires=(ASSIGNED,), ensures=(PRECISIONS_APPLIED,))
CLEANUP = Pass("cleanup", cleanup.run, "fold exact cast chains; drop identity, duplicate and "
               "dead casts", ensures=(PRECISIONS_APPLIED,))
WORKING_COPIES = Pass("working_copies", working_copies.run, "weight casts -> low-precision "
                      "working-copy inputs", requires=(PRECISIONS_APPLIED,),
                      ensures=(PRECISIONS_APPLIED,))
RESHAPE_VIEWS = Pass("reshape_views", views.run, "view -> reshape before re-tracing: a view of "
                     "the captured strides may not fit the re-traced ones")
RUN_VIEWS = Pass("run_views", views.run, "view -> reshape in the graph that runs: a real kernel "
                 "(a cast of a permuted tensor) may return other strides than fake propagation")
KERNELS = Pass("kernels", kernels.run, "low-precision matmuls/convs -> generated tensor-core "
               "kernels (Policy.kernels), fused epilogues")
LEGALIZE = Pass("legalize", legalize.run, "valid ONNX: mixed-dtype norms widened, splits to "
                "slices")
DECOMPOSE = Pass("decompose", decompose.run, "re-trace with the export decompositions (conv "
                 "backward, batch norm, flash attention, lerp); no backward or prims op remains",
                 ensures=(decompose.EXPORTABLE,))


def state_in_place(names: tuple[str, ...]) -> Pass:
    """The training step's last execution pass: its first ``len(names)`` outputs (the state
    entries ``names``) are stored into its first inputs (``aten.copy_``), not returned."""
    return Pass("state_in_place", functools.partial(in_place.run, names=names),
                "new state stored into the state inputs (in place); the step returns loss, "
                "scale, skip flag")


FORWARD = (FOLD_MATMULS, CLASSIFY, ASSIGN, CASTS, CLEANUP)
TRAINING = (WORKING_COPIES, RESHAPE_VIEWS)
EXECUTION = (KERNELS, RUN_VIEWS)
EXPORT_FORWARD = (WORKING_COPIES, LEGALIZE)
EXPORT_FORWARD_FP32_WEIGHTS = (LEGALIZE,)
EXPORT_STEP = (RESHAPE_VIEWS, DECOMPOSE, LEGALIZE)

__all__ = ["EXECUTION", "EXPORT_FORWARD", "EXPORT_FORWARD_FP32_WEIGHTS", "EXPORT_STEP",
           "FORWARD", "TRAINING", "Condition", "Context", "Pass", "PassResult", "Stages", "run",
           "state_in_place"]
