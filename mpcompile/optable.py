"""The op table: which precision class each ATen op belongs to, as data.

``DEFAULT_TABLE`` is a tuple of :class:`Entry`, each a real ``torch.ops.aten`` op (an overload, or
a packet standing for all its overloads) with its class and the reason for it. The table is
indexed and checked for conflicts when ``policy`` is imported; a :class:`~mpcompile.policy.Policy`
adds user entries on top and is checked when it is built. Nothing here is mutable or global state.

Classes (after Micikevicius et al. 2018, and the allow/infer/deny/clear lists of TF-AMP):

- ``LOWER``: dot products (matmul, conv, attention, RNN cells): low-precision inputs, FP32
  accumulation in the kernel.
- ``FP32``: inputs and outputs must be FP32 (exp/log/pow, losses, sums whose result can leave
  FP16's range, norms, upsampling).
- ``FP32_ACCUM``: reductions whose kernel accumulates in FP32 internally and whose output range is
  bounded by the input's (softmax, layer/batch/group norm, mean, global average pooling). They may
  keep low-precision I/O, but only on a (device, dtype) a test has proven
  (``tests/test_fp32_accum.py``); elsewhere, and with ``strict_reductions=True``, they are FP32.
- ``FOLLOW``: point-wise math, fine in either precision: the assignment pass decides.
- ``PASSTHROUGH``: data movement (views, indexing, cat): one dtype on all inputs; decided too.
- ``BANNED``: unsafe in low precision; compiling a model that uses one is an error (unless the user
  moves it to FP32).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch._ops import OpOverload, OpOverloadPacket

from .errors import PolicyError

aten = torch.ops.aten


class OpClass(enum.Enum):
    LOWER = "lower"
    FP32 = "fp32"
    FP32_ACCUM = "fp32_accum"
    FOLLOW = "follow"
    PASSTHROUGH = "passthrough"
    BANNED = "banned"

    def __str__(self) -> str:
        return self.name


Op = OpOverload | OpOverloadPacket

# (device type, low-precision dtype) pairs on which tests/test_fp32_accum.py proves that an op's
# kernel accumulates in FP32 while reading and writing low precision. CUDA kernels very likely do
# too (acc_type<half> is float), but no test has run there yet, so on CUDA these ops are FP32.
CPU_PROVEN = frozenset({("cpu", torch.float16), ("cpu", torch.bfloat16)})


@dataclass(frozen=True)
class Entry:
    """One row of the op table."""

    op: Op
    op_class: OpClass
    reason: str
    # schema argument names that stay FP32 whatever precision the node runs in (norm weights,
    # running statistics): the kernels take them in FP32 next to low-precision activations.
    fp32_args: tuple[str, ...] = ()
    # FP32_ACCUM only: where a test proves FP32 accumulation with low-precision I/O.
    proven_on: frozenset[tuple[str, torch.dtype]] = frozenset()

    def __post_init__(self) -> None:
        overloads = expand(self.op)  # raises PolicyError for a non-ATen op
        if not self.reason.strip():
            raise PolicyError(f"policy entry {self.op}: give a reason")
        if self.op_class is OpClass.FP32_ACCUM and not self.proven_on:
            raise PolicyError(
                f"policy entry {self.op}: FP32_ACCUM needs proven_on (the devices where a test "
                "shows FP32 accumulation); without one, make it FP32"
            )
        if self.op_class is not OpClass.FP32_ACCUM and self.proven_on:
            raise PolicyError(f"policy entry {self.op}: proven_on only applies to FP32_ACCUM")
        for ov in overloads:
            names = {a.name for a in ov._schema.arguments}
            missing = [a for a in self.fp32_args if a not in names]
            if missing:
                raise PolicyError(
                    f"policy entry {self.op}: fp32_args {missing} are not arguments of {ov} "
                    f"(it has {sorted(names)})"
                )


def expand(op: object) -> tuple[OpOverload, ...]:
    """The ATen overloads an entry stands for; a clear error for anything else."""
    if isinstance(op, str):
        raise PolicyError(
            f"policy entry {op!r} is a string: pass the op itself, e.g. torch.ops.aten.{op}."
            "default (or torch.ops.aten.<name> for all its overloads)"
        )
    if isinstance(op, OpOverload):
        ops = (op,)
    elif isinstance(op, OpOverloadPacket):
        ops = tuple(getattr(op, name) for name in op.overloads())
    else:
        raise PolicyError(
            f"policy entry {op!r} ({type(op).__name__}) is not an ATen op: pass "
            "torch.ops.aten.<name>.<overload>, e.g. torch.ops.aten.mm.default"
        )
    for ov in ops:
        if ov.namespace != "aten":
            raise PolicyError(f"policy entry {ov} is not in the aten namespace")
    return ops


def _e(op: Op, cls: OpClass, reason: str, **kw) -> Entry:
    return Entry(op, cls, reason, **kw)


_DOT = "dot product: low-precision inputs, FP32 accumulation in the kernel (tensor cores, AMX)"
_ATTN = "attention: two dot products; the fused kernel keeps its softmax statistics in FP32"
_RNN = "RNN cell: its gates are dot products (FP32 accumulation)"
_EXPLOG = "exp/log/pow family: FP16 overflows or loses the result's relative accuracy"
_SUM = "sum/product-type reduction: the result can leave FP16's range"
_NORM = "vector norm/distance: sums of squares overflow FP16"
_LOSS = "loss: small per-element terms are summed; FP16 loses them"
_UPS = "upsampling/sampling: interpolation weights need FP32 (torch.autocast does the same)"
_FFT = "spectral op: long sums of products"
_ACC = "scatter/index accumulation: repeated adds into one element round each time in FP16"
_SOFTMAX = "softmax: the kernel accumulates the exp-sum in FP32 and writes low precision"
_LNORM = "normalisation: the kernel computes mean/variance in FP32; weights and stats stay FP32"
_MEAN = "mean/average pool: the kernel sums in FP32 and |mean| <= max|x| keeps it in range"
_PW = "point-wise: exact enough in either precision, so the assignment pass decides"
_EXACT = "comparison/selection: exact in either precision, so the assignment pass decides"
_CREATE = "creates a tensor: its dtype argument follows the precision chosen for it"
_CAST = "an explicit cast in the model: its target follows the precision chosen for it"
_RAND = "random numbers: either precision is fine, so the assignment pass decides"
_MOVE = "data movement (view, index, copy): one dtype on all inputs, no arithmetic"

L, F, A, W, P, B = (
    OpClass.LOWER,
    OpClass.FP32,
    OpClass.FP32_ACCUM,
    OpClass.FOLLOW,
    OpClass.PASSTHROUGH,
    OpClass.BANNED,
)
_BN_ARGS = ("weight", "bias", "running_mean", "running_var")

DEFAULT_TABLE: tuple[Entry, ...] = (
    # LOWER: dot products
    *(_e(op, L, _DOT) for op in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addbmm,
                                 aten.mv, aten.addmv, aten.addr, aten.matmul, aten.linear,
                                 aten.convolution, aten._convolution, aten.conv1d, aten.conv2d,
                                 aten.conv3d, aten.conv_transpose1d, aten.conv_transpose2d,
                                 aten.conv_transpose3d)),
    *(_e(op, L, _ATTN) for op in (aten.scaled_dot_product_attention,
                                  aten._scaled_dot_product_flash_attention_for_cpu,
                                  aten._scaled_dot_product_flash_attention,
                                  aten._scaled_dot_product_efficient_attention,
                                  aten._scaled_dot_product_cudnn_attention)),
    *(_e(op, L, _RNN) for op in (aten.lstm_cell, aten.gru_cell, aten.rnn_tanh_cell,
                                 aten.rnn_relu_cell, aten._thnn_fused_lstm_cell,
                                 aten._thnn_fused_gru_cell)),
    # FP32: range or accuracy demands it
    *(_e(op, F, _EXPLOG) for op in (aten.exp, aten.exp2, aten.expm1, aten.log, aten.log2,
                                    aten.log10, aten.log1p, aten.pow, aten.reciprocal,
                                    aten.rsqrt, aten.sinh, aten.cosh, aten.tan, aten.asin,
                                    aten.acos, aten.erfinv, aten.softplus, aten.logit,
                                    aten.xlogy, aten.lgamma, aten.digamma,
                                    aten._log_softmax, aten.log_softmax, aten.logsumexp)),
    *(_e(op, F, _SUM) for op in (aten.sum, aten.prod, aten.cumsum, aten.cumprod, aten.var,
                                 aten.std, aten.var_mean, aten.trace)),
    *(_e(op, F, _NORM) for op in (aten.linalg_vector_norm, aten.norm, aten._cdist_forward,
                                  aten._pdist_forward, aten.dist, aten.renorm,
                                  aten.cosine_similarity, aten.rms_norm)),
    *(_e(op, F, _LOSS) for op in (aten.nll_loss_forward, aten.nll_loss2d_forward,
                                  aten.nll_loss, aten.mse_loss, aten.l1_loss,
                                  aten.smooth_l1_loss, aten.huber_loss,
                                  aten.binary_cross_entropy_with_logits, aten.kl_div,
                                  aten.soft_margin_loss, aten.multi_margin_loss,
                                  aten.multilabel_margin_loss_forward)),
    *(_e(op, F, _UPS) for op in (aten.upsample_bilinear2d, aten.upsample_nearest2d,
                                 aten.upsample_bicubic2d, aten.upsample_linear1d,
                                 aten.upsample_trilinear3d, aten.upsample_nearest1d,
                                 aten.upsample_nearest3d, aten._upsample_bilinear2d_aa,
                                 aten.grid_sampler_2d, aten.grid_sampler_3d)),
    *(_e(op, F, _FFT) for op in (aten._fft_r2c, aten._fft_c2r)),
    *(_e(op, F, _ACC) for op in (aten.scatter_add, aten.index_add, aten.scatter_reduce,
                                 aten._embedding_bag, aten.embedding_bag)),
    # FP32_ACCUM: FP32 inside the kernel, low-precision I/O where proven
    _e(aten._softmax, A, _SOFTMAX, proven_on=CPU_PROVEN),
    _e(aten.softmax, A, _SOFTMAX, proven_on=CPU_PROVEN),
    _e(aten._safe_softmax, A, _SOFTMAX, proven_on=CPU_PROVEN),
    _e(aten.native_layer_norm, A, _LNORM, fp32_args=("weight", "bias"), proven_on=CPU_PROVEN),
    _e(aten.native_group_norm, A, _LNORM, fp32_args=("weight", "bias"), proven_on=CPU_PROVEN),
    *(_e(op, A, _LNORM, fp32_args=_BN_ARGS, proven_on=CPU_PROVEN)
      for op in (aten._native_batch_norm_legit_functional,
                 aten._native_batch_norm_legit_no_training, aten.native_batch_norm)),
    _e(aten._native_batch_norm_legit.default, A, _LNORM, fp32_args=_BN_ARGS,
       proven_on=CPU_PROVEN),
    _e(aten._native_batch_norm_legit.no_stats, A, _LNORM, fp32_args=("weight", "bias"),
       proven_on=CPU_PROVEN),
    _e(aten.mean, A, _MEAN, proven_on=CPU_PROVEN),
    _e(aten._adaptive_avg_pool2d, A, _MEAN, proven_on=CPU_PROVEN),
    # FOLLOW: point-wise math
    *(_e(op, W, _PW) for op in (aten.add, aten.sub, aten.rsub, aten.mul, aten.div, aten.neg,
                                aten.abs, aten.relu, aten.gelu, aten.silu, aten.sigmoid,
                                aten.tanh, aten.hardtanh, aten.leaky_relu, aten.elu, aten.celu,
                                aten.selu, aten.hardswish, aten.hardsigmoid, aten.mish,
                                aten.prelu, aten.glu, aten.softshrink, aten.hardshrink,
                                aten.threshold, aten.clamp, aten.clamp_min, aten.clamp_max,
                                aten.sqrt, aten.sin, aten.cos, aten.atan, aten.atan2,
                                aten.asinh, aten.acosh, aten.atanh, aten.erf, aten.sign,
                                aten.floor, aten.ceil, aten.round, aten.trunc, aten.frac,
                                aten.fmod, aten.remainder, aten.lerp, aten.addcmul,
                                aten.addcdiv, aten.nan_to_num, aten.where, aten.masked_fill,
                                aten.maximum, aten.minimum, aten.native_dropout,
                                aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
                                aten.tril, aten.triu)),
    *(_e(op, W, _EXACT) for op in (aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge,
                                   aten.isnan, aten.isinf, aten.isfinite, aten.amax,
                                   aten.amin, aten.max, aten.min, aten.argmax, aten.argmin,
                                   aten.any, aten.all, aten.topk, aten.sort)),
    *(_e(op, W, _CREATE) for op in (aten.full, aten.full_like, aten.zeros, aten.zeros_like,
                                    aten.ones, aten.ones_like, aten.empty_like,
                                    aten.empty_strided, aten.empty.memory_format,
                                    aten.scalar_tensor, aten.arange, aten.fill,
                                    aten.new_zeros, aten.new_ones, aten.new_full,
                                    aten.new_empty)),
    *(_e(op, W, _RAND) for op in (aten.rand, aten.randn, aten.rand_like, aten.randn_like,
                                  aten.bernoulli)),
    _e(aten._to_copy, W, _CAST),
    # PASSTHROUGH: data movement
    *(_e(op, P, _MOVE) for op in (aten.view, aten._unsafe_view, aten.reshape, aten.permute,
                                  aten.transpose, aten.t, aten.expand, aten.squeeze,
                                  aten.unsqueeze, aten.select, aten.slice, aten.narrow,
                                  aten.alias, aten.as_strided, aten.clone, aten.contiguous,
                                  aten.split, aten.split_with_sizes, aten.unbind,
                                  aten.chunk, aten.cat, aten.stack, aten.flip, aten.roll,
                                  aten.repeat, aten.index, aten.index_select, aten.gather,
                                  aten.embedding, aten.constant_pad_nd,
                                  aten.reflection_pad1d, aten.reflection_pad2d,
                                  aten.reflection_pad3d, aten.replication_pad1d,
                                  aten.replication_pad2d, aten.replication_pad3d,
                                  aten.diagonal, aten.select_scatter, aten.slice_scatter,
                                  aten.scatter, aten.index_put, aten.index_copy,
                                  aten.masked_scatter, aten.masked_select,
                                  aten.max_pool2d_with_indices, aten.max_pool3d_with_indices,
                                  aten.pixel_shuffle, aten.im2col, aten.col2im, aten.unfold,
                                  aten.copy, aten.lift_fresh_copy, aten.detach)),
    # BANNED
    _e(aten.binary_cross_entropy, B,
       "binary_cross_entropy on probabilities: log(p) of a low-precision p underflows. Use "
       "BCEWithLogitsLoss / binary_cross_entropy_with_logits (FP32-safe), or move this op to "
       "FP32 with Policy(fp32=[torch.ops.aten.binary_cross_entropy.default]) or "
       "keep_fp32_modules"),
)


def index_table(entries: Iterable[Entry]) -> dict[OpOverload, Entry]:
    """overload -> entry; two entries naming one overload with different classes is an error."""
    out: dict[OpOverload, Entry] = {}
    for entry in entries:
        for ov in expand(entry.op):
            prev = out.get(ov)
            if prev is not None and (prev.op_class, prev.fp32_args) != (
                entry.op_class,
                entry.fp32_args,
            ):
                raise PolicyError(
                    f"conflicting policy entries for {ov}: {prev.op_class} (from {prev.op}) "
                    f"and {entry.op_class} (from {entry.op}); keep one"
                )
            # a specific overload entry wins over its packet's entry of the same class
            if prev is None or isinstance(entry.op, OpOverload):
                out[ov] = entry
    return out
