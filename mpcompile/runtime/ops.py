"""The generated kernels as one torch custom op: ``torch.ops.mpcompile.kernel``.

    kernel(Tensor a, Tensor b, Tensor? bias, Tensor? scale, str call, str mode, bool autotune)
        -> Tensor

``call`` is the canonical JSON of a :class:`Call` (the kernel's frozen spec, the convolution
arguments, the dtype of the result, which optional operands it reads): one string, so the op's
schema stays fixed while every kernel is a different call of it. ``mode`` is
``Policy.kernels`` ("auto"/"on"), ``autotune`` whether the first CUDA use times the candidates.

Being a custom op (with a fake implementation and an autograd formula) is what lets a lowered
graph run under autograd (``convert(...)`` then ``loss.backward()``), under ``torch.compile``
and under ``torch._inductor.compile``: Inductor sees one opaque extern call per kernel, never
the torch reference inside it. The implementation (``kernel.Runtime.run``) picks per call and
device what computes it: the generated kernel, the library op or the reference.

Backward: the gradient goes through the epilogue (``relu``'s mask from the saved output when
nothing but ``round``/``scale`` follows it; otherwise the FP32 epilogue is re-run with autograd
on the accumulator recomputed by the library op), then through the product with torch's own
(library) matmul / convolution-backward ops in the operand dtype, as the unlowered graph does.
Gradients come back in the dtypes of their inputs; a bias gradient is the sum over every
output dimension but the channel one.

The op is defined when this module is imported (``torch.library`` is the registry: a graph,
pickled or compiled, names the op ``mpcompile::kernel`` and nothing else); importing it twice is
impossible in one process, and nothing else is registered.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass

import torch

from ..codegen.epilogue import OPS, Operands, channel_view
from ..codegen.spec import KernelSpec, Kind
from ..dtypes import from_name
from ..errors import KernelError
from .verify import Problem, conv_shapes

OP_NAME = "mpcompile::kernel"
SCHEMA = ("(Tensor a, Tensor b, Tensor? bias, Tensor? scale, str call, str mode, bool autotune)"
          " -> Tensor")
MODES = ("auto", "on")


@dataclass(frozen=True)
class ConvArgs:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    input_shape: tuple[int, ...] = ()
    weight_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Call:
    """Everything one kernel call computes besides its tensors."""

    spec: KernelSpec
    has_bias: bool
    has_scale: bool
    conv: ConvArgs | None = None
    final: str = ""  # the result's dtype; "" = the epilogue's output dtype

    def __post_init__(self) -> None:
        if not self.final:
            object.__setattr__(self, "final", self.spec.epilogue.out)
        if self.spec.kind is not Kind.GEMM and self.conv is None:
            raise KernelError(f"kernel {self.spec.name}: a {self.spec.kind.value} call needs its "
                              "convolution arguments (ConvArgs)")
        if self.has_bias != ("bias_n" in self.spec.epilogue.ops):
            raise KernelError(f"kernel {self.spec.name}: has_bias={self.has_bias} disagrees with "
                              f"its epilogue {self.spec.epilogue.ops}")
        if self.has_scale != ("scale" in self.spec.epilogue.ops):
            raise KernelError(f"kernel {self.spec.name}: has_scale={self.has_scale} disagrees "
                              f"with its epilogue {self.spec.epilogue.ops}")

    @property
    def problem(self) -> Problem:
        return Problem(self.spec, self.has_bias, self.has_scale, self.final)


# --- the call as one string ------------------------------------------------------------------


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _dataclass_in(t) -> type | None:
    if dataclasses.is_dataclass(t):
        return t
    return next((a for a in typing.get_args(t) if dataclasses.is_dataclass(a)), None)


def build(cls: type, d: dict):
    """``cls(**d)`` with nested dataclasses rebuilt from their dicts and lists as tuples: the
    inverse of ``dataclasses.asdict`` for frozen specs."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in d:
            continue
        v, sub = d[f.name], _dataclass_in(hints.get(f.name))
        kw[f.name] = build(sub, v) if sub is not None and isinstance(v, dict) else _tuples(v)
    return cls(**kw)


def encode(call: Call) -> str:
    """The canonical JSON of ``call``; refused if it does not decode to the same call."""
    d = {"spec": call.spec.as_dict(), "has_bias": call.has_bias, "has_scale": call.has_scale,
         "conv": None if call.conv is None else dataclasses.asdict(call.conv),
         "final": call.final}
    s = json.dumps(d, sort_keys=True, separators=(",", ":"))
    if decode(s) != call:
        raise KernelError(f"kernel {call.spec.name}: its spec does not survive a JSON round trip "
                          "(a spec field that is neither a number, a string, a tuple nor a "
                          "frozen dataclass?)")
    return s


@functools.lru_cache(maxsize=4096)
def decode(s: str) -> Call:
    """The :class:`Call` of a string made by :func:`encode` (memoised: one parse per kernel)."""
    d = json.loads(s)
    return Call(build(KernelSpec, d["spec"]), d["has_bias"], d["has_scale"],
                None if d["conv"] is None else build(ConvArgs, d["conv"]), d["final"])


def output_shape(call: Call, a: torch.Tensor) -> tuple:
    """The shape of the op's result (NCHW / KCRS for convolutions)."""
    sp = call.spec
    if sp.kind is Kind.GEMM:
        return (*a.shape[:-1], sp.n)
    s = conv_shapes(sp)
    return {Kind.CONV_FPROP: s["y"], Kind.CONV_DGRAD: s["x"], Kind.CONV_WGRAD: s["w"]}[sp.kind]


# --- the op -----------------------------------------------------------------------------------


@torch.library.custom_op(OP_NAME, mutates_args=(), schema=SCHEMA)
def kernel(a, b, bias, scale, call, mode, autotune):
    from .kernel import runtime  # the runtime imports this module

    if mode not in MODES:
        raise KernelError(f"{OP_NAME}: mode={mode!r}, use one of {MODES}")
    return runtime().run(decode(call), mode, autotune, a, b, bias, scale)


@kernel.register_fake
def _fake(a, b, bias, scale, call, mode, autotune):
    c = decode(call)
    return a.new_empty(output_shape(c, a), dtype=from_name(c.final))


# --- autograd ---------------------------------------------------------------------------------


def product_low(call: Call, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The accumulator through torch's own ops (the library) in the operand dtype."""
    sp, cv = call.spec, call.conv
    if sp.kind is Kind.GEMM:
        return torch.matmul(a, b)
    args = (cv.stride, cv.padding, cv.dilation)
    s = conv_shapes(sp)
    if sp.kind is Kind.CONV_FPROP:
        return torch.nn.functional.conv2d(a, b, None, *args)
    if sp.kind is Kind.CONV_DGRAD:
        return torch.nn.grad.conv2d_input(list(s["x"]), b, a, *args)
    return torch.nn.grad.conv2d_weight(b, list(s["w"]), a, *args)


def channel_dim(kind: Kind) -> int:
    """Where the output's N (the bias's index) lies: GEMM last, conv weights first, else 1."""
    return {Kind.GEMM: -1, Kind.CONV_WGRAD: 0}.get(kind, 1)


def _sum_to_channel(g: torch.Tensor, kind: Kind) -> torch.Tensor:
    dim = channel_dim(kind) % g.dim()
    return g.sum([d for d in range(g.dim()) if d != dim])


def _mask_from_output(ops: tuple[str, ...]) -> bool:
    """Is relu's derivative readable from the output (out != 0 iff relu's output != 0)?"""
    return "relu" in ops and all(o in ("round", "scale") for o in ops[ops.index("relu") + 1:])


def epilogue_grads(call: Call, grad, a, b, bias, scale, out, need_bias: bool, need_scale: bool):
    """(FP32 gradient of the accumulator, of the bias, of the scale)."""
    ops = call.spec.epilogue.ops
    g = grad.to(torch.float32)
    recompute = need_scale or any(o not in ("bias_n", "relu", "round", "scale") for o in ops) \
        or ("relu" in ops and not _mask_from_output(ops))
    if not recompute:
        for op in reversed(ops):
            if op == "relu":
                g = g * (out != 0)
            elif op == "scale":
                g = g * scale.to(torch.float32)
        g_bias = _sum_to_channel(g, call.spec.kind).to(bias.dtype) if need_bias else None
        return g, g_bias, None
    with torch.enable_grad():
        acc = product_low(call, a, b).to(torch.float32).requires_grad_()
        bias_f = bias.detach().to(torch.float32).requires_grad_() if bias is not None else None
        scale_f = scale.detach().to(torch.float32).requires_grad_() if scale is not None else None
        o = Operands(call.spec.dtype, None if bias_f is None else
                     channel_view(bias_f, acc.dim(), channel_dim(call.spec.kind)), scale_f)
        x = acc
        for op in ops:
            x = OPS[op].torch(x, o)
        leaves = [t for t in (acc, bias_f, scale_f) if t is not None]
        grads = list(torch.autograd.grad(x, leaves, g, allow_unused=True))
    g_acc = grads.pop(0)
    g_bias = grads.pop(0) if bias_f is not None else None
    g_scale = grads.pop(0) if scale_f is not None else None
    zeros = torch.zeros_like
    g_acc = zeros(acc) if g_acc is None else g_acc
    g_bias = (zeros(bias) if g_bias is None else g_bias.to(bias.dtype)) if need_bias else None
    g_scale = (zeros(scale) if g_scale is None else g_scale.to(scale.dtype)) if need_scale \
        else None
    return g_acc, g_bias, g_scale


def operand_grads(call: Call, g_acc: torch.Tensor, a, b, need_a: bool, need_b: bool):
    """Gradients of the two operands from the accumulator's, through the library in the operand
    dtype (what the unlowered graph's backward computes)."""
    sp, cv = call.spec, call.conv
    g = g_acc.to(a.dtype)
    if sp.kind is Kind.GEMM:
        ga = torch.matmul(g, b.transpose(-1, -2)) if need_a else None
        gb = torch.matmul(a.transpose(-1, -2), g) if need_b else None
        return ga, gb
    args = (list(cv.stride), list(cv.padding), list(cv.dilation))
    if sp.kind is Kind.CONV_FPROP:  # y = conv(x, w)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g, a, b, None, *args, False, [0, 0], 1, [need_a, need_b, False])
        return gx, gw
    fwd = torch.nn.functional.conv2d
    if sp.kind is Kind.CONV_DGRAD:  # dx = D(w)^T dy: <G, dx> = <conv(G, w), dy>
        gdy = fwd(g, b, None, *args) if need_a else None
        gw = torch.nn.grad.conv2d_weight(g, list(b.shape), a, *args) if need_b else None
        return gdy, gw
    # wgrad, dw from (dy, x): <G, dw> = <conv(x, G), dy>
    gdy = fwd(b, g, None, *args) if need_a else None
    gx = torch.nn.grad.conv2d_input(list(b.shape), g, a, *args) if need_b else None
    return gdy, gx


def _setup_context(ctx, inputs, output):
    a, b, bias, scale, call, _, _ = inputs
    ctx.call = decode(call)
    ctx.save_for_backward(a, b, bias, scale, output)


def _backward(ctx, grad):
    a, b, bias, scale, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    g_acc, g_bias, g_scale = epilogue_grads(ctx.call, grad, a, b, bias, scale, out,
                                            bias is not None and need[2],
                                            scale is not None and need[3])
    ga, gb = operand_grads(ctx.call, g_acc, a, b, need[0], need[1])
    return ga, gb, g_bias, g_scale, None, None, None


kernel.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["MODES", "OP_NAME", "Call", "ConvArgs", "build", "channel_dim", "decode", "encode",
           "epilogue_grads", "kernel", "operand_grads", "output_shape", "product_low"]
