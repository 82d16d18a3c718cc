"""Provenance: the frozen :class:`NodeRecord` every node carries in ``node.meta["mp"]``.

Which stage made the node, its module and source line, its precision class and the reason, and
how its precision was decided. ``explain()`` reads only these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import PassError
from .policy import OpClass

MP = "mp"


@dataclass(frozen=True)
class NodeRecord:
    """Provenance and precision decision of one node."""

    created_by: str  # the stage that made the node: "capture", "casts", ...
    module: str = ""  # dotted path of the innermost nn.Module ("" = the model itself)
    module_type: str = ""
    source: str = ""  # the model's source line that produced the node
    op_class: OpClass | None = None
    class_reason: str = ""
    class_source: str = ""  # "table", "user", "default", "strict_reductions", "unproven"
    fp32_args: tuple[str, ...] = ()
    pin: str | None = None  # the keep_fp32_modules entry that pinned this node
    precision: torch.dtype | None = None  # dtype the node computes in; None: no float math
    decided_by: str = ""  # "class", "pin", "mincut", "local", "cast", "input", ...
    decision: str = ""  # human-readable reason, with costs for min-cut decisions
    subject: str = ""  # training nodes: the parameter (or state) the node works on


def record(node: fx.Node) -> NodeRecord:
    rec = node.meta.get(MP)
    if rec is None:
        raise PassError(f"node {node.name} ({node.target}) has no mpcompile record")
    return rec


def update(node: fx.Node, **changes) -> None:
    node.meta[MP] = dataclasses.replace(record(node), **changes)


__all__ = ["MP", "NodeRecord", "record", "update"]
