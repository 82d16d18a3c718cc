"""Stage "kernels": matmuls and convolutions -> generated tensor-core kernels (``KernelCall``).

Every low-precision ``mm`` / ``addmm`` / ``bmm`` / ``convolution`` / ``convolution_backward``
becomes a ``call_module`` to a :class:`~mpcompile.runtime.kernel.KernelCall` holding a
:class:`~mpcompile.codegen.spec.KernelSpec` specialised to its shapes and strides. What follows
it on a single-user chain is fused into the epilogue:

- ``relu`` / ``gelu`` on the FP32 accumulator;
- 2-D transposes (``t``, ``permute [1, 0]``): the kernel computes the transposed product
  instead (operands swapped, layouts flipped);
- a cast to FP32: the output is written in FP32 after one rounding to the operand dtype (``round``),
  so the values are exactly those of the unfused cast;
- a multiplication by an FP32 0-dim tensor (the inverse loss scale when unscaling gradients):
  ``scale``, read on the device.

``Policy(kernels="auto")`` lowers graphs that run on CUDA when NVRTC can compile kernels (without
it the graph keeps its torch ops, i.e. the library in low precision, and one line is logged);
``"on"`` lowers anywhere (the reference contract runs off-GPU, e.g. to test the lowering on CPU)
and refuses a CUDA graph without NVRTC; ``"off"`` never (:func:`decide`). At run time a lowered
call uses its generated kernel only once it passed its verification on the device (see
``runtime/kernel.py``). A node that cannot be lowered keeps its torch op, with the reason in its
record.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx as fx

from ..codegen.spec import Conv, Epilogue, KernelSpec, Kind, SpecError, widest_vec
from ..codegen.tiles import choose_tile, conv_spec
from ..dtypes import FLOAT32, LOW, dtype_name
from ..errors import KernelError
from ..fxutil import copy_module, is_getitem, val_dtype
from ..records import MP, NodeRecord, record, update
from ..runtime import nvrtc
from ..runtime.kernel import NO_NVRTC, ConvArgs, KernelCall
from .context import Context

log = logging.getLogger("mpcompile.kernels")

aten = torch.ops.aten
LOWERABLE = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.convolution.default,
             aten.convolution_backward.default)
_TRANSPOSES = (aten.t.default, aten.permute.default, aten.transpose.int)
STAGE = "kernels"  # the provenance of the nodes this pass makes


def _low(dtype: torch.dtype | None) -> str | None:
    """The kernel dtype name ("float16"/"bfloat16") of a low-precision dtype; None otherwise."""
    return dtype_name(dtype) if dtype in LOW else None


def decide(mode: str, device_type: str, nvrtc_available: bool) -> tuple[bool, str | None]:
    """(lower the graph's matmuls/convs?, a line to log) for ``Policy.kernels`` = ``mode`` on
    ``device_type``. Raises :class:`KernelError` for "on" on CUDA without NVRTC."""
    if mode == "off" or (mode == "auto" and device_type != "cuda"):
        return False, None
    if device_type == "cuda" and not nvrtc_available:
        if mode == "on":
            raise KernelError(f"Policy(kernels='on') on CUDA: {NO_NVRTC}. Install it, or use "
                              "kernels='auto' (runs the library ops) or kernels='off'")
        return False, (f"generated kernels: {NO_NVRTC}; kernels='auto' keeps the library ops "
                       "(cuBLAS/cuDNN in low precision)")
    return True, None


def enabled(ctx: Context) -> bool:
    """Does the pass lower this graph? (Logs why not when "auto" lacks NVRTC on CUDA.)"""
    lower, note = decide(ctx.policy.kernels, ctx.device_type,
                         nvrtc.available() if ctx.device_type == "cuda" else True)
    if note:
        log.warning(note)
    return lower


def run(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """A copy of ``gm`` with every lowerable node replaced by a ``KernelCall`` (``gm`` is left
    as it is)."""
    gm = copy_module(gm)
    if not enabled(ctx):
        return gm
    count, mode = 0, ctx.policy.kernels
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LOWERABLE:
            continue
        try:
            lowered = _lower(gm, node, count, mode)
        except SpecError as e:
            lowered = f"no kernel spec fits: {e}"
        if isinstance(lowered, str):
            update(node, decision=(record(node).decision + "; " if record(node).decision else "")
                   + f"kept the torch op: {lowered}")
        else:
            count += lowered
    gm.graph.lint()
    gm.recompile()
    return gm


# --- operands ---------------------------------------------------------------------------------


def _val(n: fx.Node) -> torch.Tensor:
    return n.meta["val"]


def _layout(t: torch.Tensor) -> tuple[str, int]:
    """("row" | "col", leading dimension) of a 2-D (or last-two-dims) view."""
    rows, cols = t.shape[-2], t.shape[-1]
    s0, s1 = t.stride()[-2], t.stride()[-1]
    if s1 == 1 or cols == 1:
        return "row", s0 if s0 >= cols and rows > 1 else cols
    if s0 == 1 or rows == 1:
        return "col", s1 if s1 >= rows and cols > 1 else rows
    return "row", cols  # neither: the kernel module makes it contiguous at run time


def _epilogue_chain(node: fx.Node, low: str, allow_transpose: bool):
    """Follow single-user fusible ops after ``node``: (ops, out dtype, transposed, scale node,
    last node, fused nodes)."""
    ops: list[str] = []
    out, transposed, scale, last, fused = low, False, None, node, []
    while len(last.users) == 1:
        (u,) = last.users
        if u.op != "call_function":
            break
        if u.target is aten.relu.default and not ops and out == low:
            ops.append("relu")
        elif u.target is aten.gelu.default and not ops and out == low:
            ops.append("gelu_tanh" if u.kwargs.get("approximate") == "tanh" else "gelu")
        elif allow_transpose and u.target in _TRANSPOSES and _val(u).dim() == 2 and \
                (u.target is aten.t.default or list(u.args[1:]) in ([[1, 0]], [0, 1], [1, 0])):
            transposed = not transposed
        elif u.target is aten._to_copy.default and set(u.kwargs) == {"dtype"} and \
                u.kwargs["dtype"] is torch.float32 and out == low:
            ops.append("round")
            out = FLOAT32.name
        elif (u.target is aten.mul.Tensor and out == FLOAT32.name and scale is None
              and isinstance(u.args[1], fx.Node) and u.args[0] is last
              and _val(u.args[1]).dim() == 0 and val_dtype(u.args[1]) is torch.float32):
            ops.append("scale")
            scale = u.args[1]
        else:
            break
        fused.append(u)
        last = u
    # every fused op is element-wise, so it commutes with the transposes: an odd number of
    # them means the kernel computes the transposed product
    return ops, out, transposed, scale, last, fused


# --- per op -----------------------------------------------------------------------------------


def _lower(gm: fx.GraphModule, node: fx.Node, idx: int, mode: str) -> int | str:
    if node.target is aten.convolution_backward.default:
        return _lower_conv_backward(gm, node, idx, mode)
    low = _low(val_dtype(node))
    if low is None:
        return f"it computes in {dtype_name(val_dtype(node))}, not float16/bfloat16"
    if node.target is aten.convolution.default:
        return _lower_conv(gm, node, idx, low, mode)
    return _lower_gemm(gm, node, idx, low, mode)


def _lower_gemm(gm, node, idx, low, mode) -> int | str:
    bias = None
    if node.target is aten.addmm.default:
        bias, a, b = node.args[:3]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return "addmm with beta/alpha != 1"
        if _val(bias).dim() != 1:
            return f"addmm bias of shape {tuple(_val(bias).shape)} (only a per-column vector)"
    else:
        a, b = node.args[:2]
    va, vb = _val(a), _val(b)
    batched = va.dim() == 3
    ops, out, transposed, scale, last, fused = _epilogue_chain(
        node, low, allow_transpose=not batched and bias is None)
    if transposed:  # C^T = B^T A^T: swap the operands, flip their layouts
        a, b, va, vb = b, a, vb.transpose(-1, -2), va.transpose(-1, -2)
    (al, lda), (bl, ldb) = _layout(va), _layout(vb)
    m, k, n = va.shape[-2], va.shape[-1], vb.shape[-1]
    if bias is not None:
        ops = ["bias_n", *ops]
    vec_a = widest_vec(k if al == "row" else m, lda)
    vec_b = widest_vec(n if bl == "row" else k, ldb)
    spec = KernelSpec(
        Kind.GEMM, low, m, n, k, tile=choose_tile(m, n, min(vec_a, vec_b)),
        epilogue=Epilogue(tuple(ops), out, dtype_name(val_dtype(bias)) if bias is not None
                          else low),
        batch=va.shape[0] if batched else 1, a_layout=al, b_layout=bl, lda=lda, ldb=ldb,
        ldc=n, batch_stride_a=va.stride()[0] if batched else 0,
        batch_stride_b=vb.stride()[0] if batched else 0,
        batch_stride_c=m * n if batched else 0, vec_a=vec_a, vec_b=vec_b)
    if transposed:
        a_arg, b_arg = _transposed_view(gm, node, a), _transposed_view(gm, node, b)
    else:
        a_arg, b_arg = a, b
    args = [a_arg, b_arg] + ([bias] if bias is not None else []) + ([scale] if scale else [])
    _replace(gm, node, last, fused,
             KernelCall(spec, bias is not None, scale is not None, mode=mode), args, idx)
    return 1


def _transposed_view(gm, at: fx.Node, x: fx.Node) -> fx.Node:
    with gm.graph.inserting_before(at):
        v = gm.graph.call_function(aten.t.default, (x,))
    v.meta["val"] = _val(x).t()
    v.meta[MP] = NodeRecord(STAGE, precision=val_dtype(x), decided_by=STAGE,
                            decision="transposed view: the kernel computes the transposed "
                                     "product")
    return v


def _lower_conv(gm, node, idx, low, mode) -> int | str:
    x, w, bias, stride, padding, dilation, transposed, _, groups = node.args[:9]
    if transposed or groups != 1 or _val(x).dim() != 4:
        return "only 2-D, non-transposed, groups=1 convolutions have kernels"
    cv = _conv(_val(x), _val(w), stride, padding, dilation)
    ops, out, _, scale, last, fused = _epilogue_chain(node, low, allow_transpose=False)
    if bias is not None:
        ops = ["bias_n", *ops]
    spec = conv_spec(Kind.CONV_FPROP, low, cv, tuple(ops), out)
    args = [x, w] + ([bias] if bias is not None else []) + ([scale] if scale else [])
    call = KernelCall(spec, bias is not None, scale is not None,
                      ConvArgs(cv.stride, cv.pad, cv.dil, tuple(_val(x).shape),
                               tuple(_val(w).shape)), mode=mode)
    _replace(gm, node, last, fused, call, args, idx)
    return 1


def _conv(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation) -> Conv:
    return Conv(x.shape[0], x.shape[2], x.shape[3], x.shape[1], w.shape[0], w.shape[2],
                w.shape[3], tuple(stride), tuple(padding), tuple(dilation))


def _lower_conv_backward(gm, node, idx, mode) -> int | str:
    go, x, w, _, stride, padding, dilation, transposed, _, groups, mask = node.args[:11]
    low = _low(val_dtype(go))
    if low is None:
        return f"it computes in {dtype_name(val_dtype(go))}, not float16/bfloat16"
    if transposed or groups != 1 or _val(x).dim() != 4:
        return "only 2-D, non-transposed, groups=1 convolutions have kernels"
    cv = _conv(_val(x), _val(w), stride, padding, dilation)
    getitems = {u.args[1]: u for u in node.users if is_getitem(u)}
    g = gm.graph
    made = 0
    conv_args = ConvArgs(cv.stride, cv.pad, cv.dil, tuple(_val(x).shape), tuple(_val(w).shape))
    if mask[0] and 0 in getitems:
        call = KernelCall(conv_spec(Kind.CONV_DGRAD, low, cv), False, False, conv_args,
                          mode=mode)
        _replace(gm, getitems[0], getitems[0], [], call, [go, w], idx + made)
        made += 1
    if mask[1] and 1 in getitems:
        # split-K: FP32 partials summed after the kernel, rounded once to ``low``
        call = KernelCall(conv_spec(Kind.CONV_WGRAD, low, cv), False, False, conv_args,
                          final=low, mode=mode)
        _replace(gm, getitems[1], getitems[1], [], call, [go, x], idx + made)
        made += 1
    if mask[2] and 2 in getitems:  # the bias gradient stays a reduction over N, H, W
        gi = getitems[2]
        with g.inserting_before(gi):
            s = g.call_function(aten.sum.dim_IntList, (go, [0, 2, 3]))
        s.meta.update(gi.meta)
        s.meta[MP] = dataclasses.replace(record(gi), created_by=STAGE,
                                         decision="bias gradient of the lowered convolution")
        gi.replace_all_uses_with(s)
        g.erase_node(gi)
    for gi in [u for u in node.users if is_getitem(u) and not u.users]:
        g.erase_node(gi)  # outputs nobody reads (masked, or a bias the conv does not have)
    if not node.users:
        g.erase_node(node)
    return made if made else "no output of it is used"


def _replace(gm, first: fx.Node, last: fx.Node, fused: list[fx.Node], call: KernelCall,
             args: list, idx: int) -> None:
    """Put ``call`` where ``last`` was; remove ``first`` .. ``last``."""
    name = f"kernel{idx}_{call.spec.kind.value}"
    gm.add_submodule(name, call)
    g = gm.graph
    with g.inserting_before(last):
        new = g.call_module(name, tuple(args))
    new.meta["val"] = last.meta["val"]
    base = record(first)
    fused_names = ", ".join(f.name for f in fused)
    t = call.spec.tile
    new.meta[MP] = dataclasses.replace(
        base, created_by=STAGE, decided_by=STAGE,
        precision=val_dtype(first) if not is_getitem(first) else base.precision,
        decision=(f"lowered {first.name} ({first.target}) to generated kernel "
                  f"{call.spec.name}: tile {t.bm}x{t.bn}x{t.bk}, {t.warps} warps, "
                  f"{t.stages} stages, epilogue {list(call.spec.epilogue.ops)} -> "
                  f"{call.spec.epilogue.out}"
                  + (f", split-K {call.spec.split_k}" if call.spec.split_k > 1 else "")
                  + (f"; fused {fused_names}" if fused_names else "")))
    last.replace_all_uses_with(new)
    for n in reversed([first, *fused]):  # the chain, last first: each is unused by then
        if not n.users:
            g.erase_node(n)


__all__ = ["LOWERABLE", "STAGE", "decide", "enabled", "run"]
