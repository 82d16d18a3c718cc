"""Stage 1: each op node -> its precision class from the policy table (or a module pin).

Writes ``op_class``, ``class_reason``, ``class_source``, ``fp32_args`` and ``pin`` into the node
record. A BANNED op outside a module pinned to FP32 stops compilation here, naming every such
node and what to do.
"""

from __future__ import annotations

import torch.fx as fx

from ..capture import BindingKind, module_paths
from ..dtypes import dtype_name
from ..errors import BannedOpError
from ..fxutil import copy_module, is_getitem, val_dtype
from ..policy import OpClass
from ..records import record, update
from .context import Context

_ROLE = {BindingKind.PARAM: "parameter", BindingKind.BUFFER: "buffer",
         BindingKind.CONST: "constant", BindingKind.INPUT: "model input"}


def run(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    gm = copy_module(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for node, binding in zip(placeholders, ctx.inputs):
        target = binding.target if binding.kind is not BindingKind.CONST else "constant"
        update(node, precision=val_dtype(node), decided_by="input",
               decision=f"{_ROLE[binding.kind]} {target}: enters in "
                        f"{dtype_name(val_dtype(node))}, as the model holds it")
    banned = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or is_getitem(node):
            continue
        rule = ctx.policy.rule(node.target, ctx.device_type)
        pin = _pin(node, ctx)
        if rule.op_class is OpClass.BANNED and pin is None:
            banned.append((node, rule))
        update(node, op_class=rule.op_class, class_reason=rule.reason,
               class_source=rule.source, fp32_args=rule.fp32_args, pin=pin)
    if banned:
        lines = [f"  {n.name} ({n.target}) in module '{record(n).module or '<model>'}'"
                 f"{'  at ' + record(n).source if record(n).source else ''}"
                 for n, _ in banned]
        raise BannedOpError(
            "the model uses ops banned in low precision:\n" + "\n".join(lines)
            + f"\n{banned[0][1].reason}"
        )
    return gm


def _pin(node: fx.Node, ctx: Context) -> str | None:
    for path in module_paths(node):
        try:
            module = ctx.model.get_submodule(path)
        except AttributeError:
            module = None
        pin = ctx.policy.module_pin(path, module)
        if pin is not None:
            return f"{pin} (module '{path}')"
    return None
