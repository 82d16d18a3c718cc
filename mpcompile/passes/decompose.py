"""Export pass: re-trace a graph with the decompositions the ONNX export needs, and why.

torch.onnx (dynamo path) has no translation for ``convolution_backward`` and translates
training-mode batch norm and ``nll_loss_backward`` *silently wrong* unless they are decomposed
first. The training graph is therefore re-traced with ``core_aten_decompositions()`` plus:

- the batch-norm decompositions (``_native_batch_norm_legit_functional``, ``native_batch_norm``)
  and ``max_pool2d_with_indices_backward``;
- ``convolution_backward`` as two convolutions (its GEMM identities): grad_input is a transposed
  convolution of grad_output with the weight; grad_weight a convolution of the input (channels as
  batch) with grad_output (batch as channels), groups handled by regrouping;
- the CPU flash attention forward and backward in matrix form (FP32 inside, as the kernel),
  the backward recomputing the probabilities from the saved log-sum-exp (torch's own forward
  decomposition returns the attention matrix where the log-sum-exp belongs).

A table built by a function call, not a registry: nothing changes at import.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch._decomp import core_aten_decompositions, get_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

from ..errors import ExportError
from ..fxutil import copy_module
from ..records import MP, NodeRecord
from .base import Condition
from .context import Context

aten = torch.ops.aten


def convolution_backward(grad_out, inp, weight, bias_sizes, stride, padding, dilation,
                         transposed, output_padding, groups, output_mask):
    if transposed:
        raise ExportError("the backward of a transposed convolution has no ONNX export yet")
    nd = inp.dim() - 2
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        out_pad = []
        for d in range(nd):
            reach = ((grad_out.shape[2 + d] - 1) * stride[d] - 2 * padding[d]
                     + dilation[d] * (weight.shape[2 + d] - 1) + 1)
            out_pad.append(inp.shape[2 + d] - reach)
        grad_input = aten.convolution.default(grad_out, weight, None, stride, padding, dilation,
                                              True, out_pad, groups)
    if output_mask[1]:
        n, g = inp.shape[0], groups
        cin, cout = inp.shape[1] // g, grad_out.shape[1] // g
        spatial = list(range(3, 3 + nd))
        # channels as batch, batch as channels: one ordinary convolution per group
        x = inp.reshape(n, g, cin, *inp.shape[2:]).transpose(0, 2)
        x = x.reshape(cin, g * n, *inp.shape[2:])
        gy = grad_out.reshape(n, g, cout, *grad_out.shape[2:]).permute(1, 2, 0, *spatial)
        gy = gy.reshape(g * cout, n, *grad_out.shape[2:])
        w = aten.convolution.default(x, gy, None, dilation, padding, stride, False, [0] * nd, g)
        w = w.transpose(0, 1)
        for d in range(nd):
            w = w.narrow(2 + d, 0, weight.shape[2 + d])
        grad_weight = w.contiguous()
    if output_mask[2]:
        grad_bias = grad_out.sum([0, *range(2, 2 + nd)])
    return grad_input, grad_weight, grad_bias


def _scores(q32, k32, s, attn_mask, is_causal):
    scores = torch.matmul(q32, k32.transpose(-2, -1)) * s
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask.to(torch.float32)
    if is_causal:
        lq, lk = scores.shape[-2], scores.shape[-1]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q32.device).tril()
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
    return scores


def flash_attention(q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """(output, logsumexp) as the CPU flash kernel returns them, in FP32 inside. torch's own
    decomposition returns the attention matrix in place of the log-sum-exp, which a backward
    that reads it cannot use."""
    if dropout_p:
        raise ExportError("attention dropout in training cannot be exported (its mask is "
                          "not replayable); set dropout to 0 for export")
    s = scale if scale is not None else q.shape[-1] ** -0.5
    q32, k32, v32 = (t.to(torch.float32) for t in (q, k, v))
    scores = _scores(q32, k32, s, attn_mask, is_causal)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v32).to(q.dtype)
    # the kernel lays its (N, H, L, E) output out as (L, N, H, E) in memory, and the graph's
    # later views rely on those strides (torch's decomposition does the same)
    out = out.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    return out, lse


def flash_attention_backward(grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, *,
                             attn_mask=None, scale=None):
    """dV = P^T dO; dS = P * (dO V^T - rowsum(dO * O)); dQ = dS K s; dK = dS^T Q s, with
    P = exp(Q K^T s + mask - lse) recomputed, in FP32 as the CPU kernel accumulates."""
    if dropout_p:
        raise ExportError("attention dropout in training cannot be exported (its mask is "
                          "not replayable); set dropout to 0 for export")
    dt = q.dtype
    q32, k32, v32, o32, g32 = (t.to(torch.float32) for t in (q, k, v, out, grad_out))
    s = scale if scale is not None else q.shape[-1] ** -0.5
    scores = _scores(q32, k32, s, attn_mask, is_causal)
    p = torch.exp(scores - logsumexp.to(torch.float32).unsqueeze(-1))
    dv = torch.matmul(p.transpose(-2, -1), g32)
    dp = torch.matmul(g32, v32.transpose(-2, -1))
    delta = (g32 * o32).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k32) * s
    dk = torch.matmul(ds.transpose(-2, -1), q32) * s
    return dq.to(dt), dk.to(dt), dv.to(dt)


def lerp(start, end, weight):
    """torch's kernel: start + w (end - start) for w < 0.5, else end - (end - start)(1 - w).
    (The reference decomposition emits prims.copy_strided when the operands' strides differ,
    which has no ONNX translation.)"""
    diff = end - start
    if isinstance(weight, torch.Tensor):
        return torch.where(weight < 0.5, start + weight * diff, end - diff * (1 - weight))
    return start + weight * diff if weight < 0.5 else end - diff * (1 - weight)


def empty_permuted(size, physical_layout, *, dtype=None, layout=None, device=None,
                   pin_memory=None):
    """Uninitialised memory (dropout's mask before ``bernoulli_`` fills it) has no ONNX
    translation; zeros in the same layout serve, since every element is overwritten."""
    inverse = [physical_layout.index(i) for i in range(len(physical_layout))]
    return torch.zeros([size[p] for p in physical_layout], dtype=dtype,
                       device=device).permute(inverse)


def export_decompositions() -> dict:
    table = dict(core_aten_decompositions())
    table.update(get_decompositions([
        aten.max_pool2d_with_indices_backward,
        aten._native_batch_norm_legit_functional,
        aten.native_batch_norm,
    ]))
    table[aten.convolution_backward.default] = convolution_backward
    table[aten.empty_permuted.default] = empty_permuted
    table[aten.lerp.Scalar] = lerp
    table[aten.lerp.Tensor] = lerp
    table[aten._scaled_dot_product_flash_attention_for_cpu.default] = flash_attention
    table[aten._scaled_dot_product_flash_attention_for_cpu_backward.default] = (
        flash_attention_backward)
    return table


def run(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Re-trace ``gm`` with :func:`export_decompositions`; each new node keeps the record of the
    node it came from (``meta["custom"]["mp_name"]`` names it)."""
    gm = copy_module(gm)
    records = {}
    for n in gm.graph.nodes:
        n.meta["custom"] = {**(n.meta.get("custom") or {}), "mp_name": n.name}
        records[n.name] = n.meta[MP]
    old_inputs = list(gm.graph.find_nodes(op="placeholder"))
    example = [torch.zeros(ph.meta["val"].shape, dtype=ph.meta["val"].dtype,
                           device=ph.meta["val"].device) for ph in old_inputs]
    with fx_traceback.preserve_node_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = make_fx(lambda *a: _as_tuple(fx.Interpreter(gm).run(*a)),
                         decomposition_table=export_decompositions(),
                         tracing_mode="fake")(*example)
    for old, new in zip(old_inputs, traced.graph.find_nodes(op="placeholder")):
        new._rename(old.name)
        new.target = new.name
        new.meta[MP] = old.meta[MP]
        new.meta["custom"] = {"mp_name": old.name}
    for n in traced.graph.nodes:
        if n.op == "placeholder":
            continue
        name = (n.meta.get("custom") or {}).get("mp_name")
        rec = records.get(name)
        if rec is None:
            n.meta[MP] = NodeRecord("decompose", decision="made while re-tracing for export")
        elif n.name != name:
            n.meta[MP] = dataclasses.replace(rec, created_by="decompose",
                                             decision=f"from {name}: {rec.decision}")
        else:
            n.meta[MP] = rec
    traced.recompile()
    return traced


def _as_tuple(out):
    """A graph's outputs as a tuple (a graph of one's own may return a single tensor)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def describe(node: fx.Node) -> str:
    """'node <mpcompile name> in module <m> (<source line>)' for error messages."""
    name = (node.meta.get("custom") or {}).get("mp_name", node.name)
    rec = node.meta.get(MP)
    if rec is None:
        return f"node {name}"
    return (f"node {name} in module '{rec.module or '<model>'}'"
            + (f" ({rec.source})" if rec.source else ""))


def _exportable(gm: fx.GraphModule, ctx: Context, stage: str) -> None:
    """After decomposition no backward op and no prims op may remain: torch.onnx has no
    translation for some and translates others wrongly."""
    for n in gm.graph.nodes:
        target = str(n.target)
        if n.op == "call_function" and ("backward" in target or target.startswith("prims.")):
            raise ExportError(
                f"{n.target} (from {describe(n)}) has no correct ONNX translation and no "
                "decomposition; it cannot be exported"
            )


EXPORTABLE = Condition("exportable", _exportable)
"""no backward op and no prims op: everything left has a correct ONNX translation"""
