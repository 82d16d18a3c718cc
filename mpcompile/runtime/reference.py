"""The kernels' contract computed with torch on any device: low-precision operands widened to
FP32, products accumulated in FP32, the epilogue in FP32, one rounding to the output dtype.

Used where no GPU runs the generated kernel (and under fake tensors for shape propagation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..codegen.epilogue import OPS, Operands, channel_view
from ..codegen.spec import Epilogue
from ..dtypes import from_name


def apply_epilogue(x: torch.Tensor, ep: Epilogue, dtype: str, bias: torch.Tensor | None,
                   scale: torch.Tensor | None, channel_dim: int = -1) -> torch.Tensor:
    """``x`` FP32; ``bias`` indexes the output's N dimension (``channel_dim``)."""
    o = Operands(dtype, None if bias is None else channel_view(bias, x.dim(), channel_dim), scale)
    for op in ep.ops:
        x = OPS[op].torch(x, o)
    return x.to(from_name(ep.out))


def gemm(a: torch.Tensor, b: torch.Tensor, ep: Epilogue, dtype: str,
         bias: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    acc = torch.matmul(a.to(torch.float32), b.to(torch.float32))
    return apply_epilogue(acc, ep, dtype, bias, scale)


def conv_fprop(x, w, ep: Epilogue, dtype: str, stride, padding, dilation, bias=None,
               scale=None) -> torch.Tensor:
    acc = F.conv2d(x.to(torch.float32), w.to(torch.float32), None, stride, padding, dilation)
    return apply_epilogue(acc, ep, dtype, bias, scale, channel_dim=1)


def conv_dgrad(grad_out, w, input_shape, ep: Epilogue, dtype: str, stride, padding,
               dilation, scale=None) -> torch.Tensor:
    acc = torch.nn.grad.conv2d_input(list(input_shape), w.to(torch.float32),
                                     grad_out.to(torch.float32), stride, padding, dilation)
    return apply_epilogue(acc, ep, dtype, None, scale, channel_dim=1)


def conv_wgrad(grad_out, x, weight_shape, ep: Epilogue, dtype: str, stride, padding,
               dilation, scale=None) -> torch.Tensor:
    acc = torch.nn.grad.conv2d_weight(x.to(torch.float32), list(weight_shape),
                                      grad_out.to(torch.float32), stride, padding, dilation)
    return apply_epilogue(acc, ep, dtype, None, scale, channel_dim=0)
