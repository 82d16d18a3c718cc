"""The one pass interface and its runner.

A :class:`Pass` is a named graph -> graph function with the conditions it needs on its input
and the conditions it guarantees on its output. :func:`run` applies a list of passes; after each
it checks the common invariants (``checks.check``: a valid graph, dtypes every op accepts,
provenance on every node) and the pass's own ``ensures``, and records the graph under the pass's
name: ``explain()`` and stage diffs read those records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch.fx as fx

from ..checks import check
from ..errors import PassError
from ..fxutil import copy_module
from .context import Context


@dataclass(frozen=True)
class Condition:
    """A property of a graph, checked by a function that raises naming the node at fault."""

    name: str
    holds: Callable[[fx.GraphModule, Context, str], None]  # (graph, context, stage) -> raises

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class PassResult:
    """What a pass that also changes the context returns (e.g. new graph inputs)."""

    gm: fx.GraphModule
    ctx: Context


@dataclass(frozen=True)
class Pass:
    """One graph rewrite. ``fn`` must not mutate the graph it is given (copy, then rewrite)."""

    name: str
    fn: Callable[[fx.GraphModule, Context], fx.GraphModule | PassResult]
    doc: str
    requires: tuple[Condition, ...] = ()
    ensures: tuple[Condition, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise PassError(f"pass name {self.name!r} must be an identifier")
        if not callable(self.fn):
            raise PassError(f"pass {self.name}: fn must be callable")


@dataclass(frozen=True)
class Stages:
    """The result of running a pipeline: the final graph and context, and every stage's graph
    by pass name (in order, starting with whatever was recorded before)."""

    gm: fx.GraphModule
    ctx: Context
    graphs: dict[str, fx.GraphModule] = field(default_factory=dict)


def run(pipeline: Sequence[Pass], gm: fx.GraphModule, ctx: Context, *,
        first: str | None = None, graphs: dict[str, fx.GraphModule] | None = None) -> Stages:
    """Apply ``pipeline`` to ``gm``. ``first`` names (and checks) the input graph as a stage;
    ``graphs`` continues an earlier run's record."""
    recorded = dict(graphs or {})
    names = [p.name for p in pipeline]
    dup = {n for n in names if names.count(n) > 1 or n in recorded or n == first}
    if dup:
        raise PassError(f"pipeline names a stage twice: {sorted(dup)}")
    if first is not None:
        gm = check(copy_module(gm), first)
        recorded[first] = gm
    for p in pipeline:
        for cond in p.requires:
            cond.holds(gm, ctx, p.name)
        out = p.fn(gm, ctx)
        if isinstance(out, PassResult):
            gm, ctx = out.gm, out.ctx
        else:
            gm = out
        gm = check(gm, p.name)
        for cond in p.ensures:
            cond.holds(gm, ctx, p.name)
        recorded[p.name] = gm
    return Stages(gm, ctx, recorded)


__all__ = ["Condition", "Pass", "PassResult", "Stages", "run"]
