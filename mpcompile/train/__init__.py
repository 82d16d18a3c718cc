"""The compiled training step: ``compile_train_step`` -> ``TrainStep``.

    compile.py     compile_train_step: validation, the pipelines, state, tracing
    layout.py      the state: names, kinds, initial values
    trace.py       the step function traced with make_fx (inputs, forward, backward)
    phases.py      unscale, found_inf, clip, update, gate, working copy, scale update
    provenance.py  phases as node annotations -> a record on every node
    step.py        TrainStep (runs it, holds the state), StepResult, CompiledStep
    report.py      TrainReport
    distributed.py data parallelism: the group, the fingerprint check across ranks, bucketed
                   gradient all-reduce, found_inf MAX, loss mean, buffer broadcast
"""

from .compile import compile_train_step
from .layout import OUTPUTS, StateKind, StateLayout
from .report import TrainReport
from .step import CompiledStep, StepResult, TrainStep

__all__ = ["OUTPUTS", "CompiledStep", "StateKind", "StateLayout", "StepResult", "TrainReport",
           "TrainStep", "compile_train_step"]
