"""``KernelCall``: the module a lowered graph calls in place of a matmul or convolution.

On a CUDA tensor it runs the generated kernel (compiled on first use for the device's arch,
cached on disk); anywhere else, under fake tensors, or if compiling/launching fails, it computes
the same contract with torch (``reference.py``) and says why (``backend`` and a log line once):
never a silent wrong answer.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

from ..codegen.render import render_source
from ..codegen.spec import KernelSpec
from . import reference

log = logging.getLogger("mpcompile.kernels")
_DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ConvArgs:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    input_shape: tuple[int, ...] = ()
    weight_shape: tuple[int, ...] = ()


class KernelCall(torch.nn.Module):
    """``role``: "gemm" (args a, b[, bias][, scale]), "conv" (x, w[, bias][, scale]), "dgrad"
    (grad_out, w[, scale]) or "wgrad" (grad_out, x[, scale])."""

    def __init__(self, spec: KernelSpec, role: str, has_bias: bool, has_scale: bool,
                 conv: ConvArgs | None = None, final: str | None = None):
        super().__init__()
        self.spec = spec
        # the dtype the graph expects: split-K results are summed in FP32, then rounded once
        self.final = _DT[final or spec.epilogue.out]
        self.role = role
        self.has_bias = has_bias
        self.has_scale = has_scale
        self.conv = conv
        self.backend = "not run yet"
        self.autotune = True  # on the first CUDA call: time the tile presets and the library
        self.choice: str | None = None  # "kernel" or "library", after the first CUDA call
        self.timings: dict[str, float] = {}  # candidate -> milliseconds
        self._loaded: dict = {}
        self._failed: str | None = None

    def extra_repr(self) -> str:
        return f"{self.spec.name}, role={self.role}, backend={self.backend!r}"

    # -- dispatch ------------------------------------------------------------------------------

    def forward(self, *args):
        x, y, rest = args[0], args[1], list(args[2:])
        bias = rest.pop(0) if self.has_bias else None
        scale = rest.pop(0) if self.has_scale else None
        reason = self._why_not_gpu(x, y)
        if reason is None:
            try:
                if self.choice is None:
                    self._first_use(x, y, bias, scale)
                if self.choice == "library":
                    return self._library(x, y, bias, scale).to(self.final)
                return self._gpu(x, y, bias, scale).to(self.final)
            except Exception as e:  # noqa: BLE001 - fall back loudly, never silently wrong
                self._failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                log.warning("kernel %s failed (%s); running the torch reference instead",
                            self.spec.name, self._failed)
                reason = self._failed
        if not is_fake(x):
            self.backend = f"reference ({reason})"
        return self._reference(x, y, bias, scale).to(self.final)

    def _why_not_gpu(self, x: torch.Tensor, y: torch.Tensor) -> str | None:
        if is_fake(x) or is_fake(y):
            return "fake tensors"
        if not x.is_cuda:
            return f"tensors on {x.device.type}, no GPU"
        if self._failed:
            return self._failed
        from . import nvrtc

        if not nvrtc.available():
            return "NVRTC not installed (pip install mpcompile[gpu])"
        return None

    # -- reference -----------------------------------------------------------------------------

    def _reference(self, x, y, bias, scale):
        sp, ep, cv = self.spec, self.spec.epilogue, self.conv
        if self.role == "gemm":
            return reference.gemm(x, y, ep, sp.dtype, bias, scale)
        if self.role == "conv":
            return reference.conv_fprop(x, y, ep, sp.dtype, cv.stride, cv.padding,
                                        cv.dilation, bias, scale)
        if self.role == "dgrad":
            return reference.conv_dgrad(x, y, cv.input_shape, ep, sp.dtype, cv.stride,
                                        cv.padding, cv.dilation, scale)
        return reference.conv_wgrad(x, y, cv.weight_shape, ep, sp.dtype, cv.stride,
                                    cv.padding, cv.dilation, scale)

    # -- GPU -------------------------------------------------------------------------------------

    def _library(self, x, y, bias, scale):
        """The same op through torch's CUDA libraries (cuBLAS/cuDNN) in the operand dtype, then
        the epilogue in FP32 (one extra rounding, before the epilogue)."""
        sp, cv = self.spec, self.conv
        if self.role == "gemm":
            acc = torch.matmul(x, y)
        elif self.role == "conv":
            acc = torch.nn.functional.conv2d(x, y, None, cv.stride, cv.padding, cv.dilation)
        elif self.role == "dgrad":
            acc = torch.nn.grad.conv2d_input(list(cv.input_shape), y, x, cv.stride,
                                             cv.padding, cv.dilation)
        else:
            acc = torch.nn.grad.conv2d_weight(y, list(cv.weight_shape), x, cv.stride,
                                              cv.padding, cv.dilation)
        return reference.apply_epilogue(acc.to(torch.float32), sp.epilogue, sp.dtype, bias, scale,
                                        channel_dim=-1 if self.role == "gemm" else
                                        (0 if self.role == "wgrad" else 1))

    def _first_use(self, x, y, bias, scale) -> None:
        """Autotune (optional), then check the kernel's result against the library op on the
        same inputs: beyond 16 units of rounding of the output, this call switches to the
        library for good, and says so."""
        if self.autotune:
            self._tune(x, y, bias, scale)
        if self.choice == "library":
            return
        got = self._gpu(x, y, bias, scale).to(torch.float32)
        want = self._library(x, y, bias, scale).to(torch.float32)
        u = 2.0 ** -(11 if self.spec.dtype == "float16" else 8)
        err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
        if not err <= 16 * u:  # also catches NaN
            self.choice = "library"
            self.backend = (f"library: the generated kernel's result differed from "
                            f"cuBLAS/cuDNN by {err / u:.1f} u on first use")
            log.warning("kernel %s: %s; using the library op", self.spec.name, self.backend)
            return
        self.choice = "kernel"
        if not self.autotune:
            self.backend = f"generated kernel (checked on first use: {err / u:.2f} u)"
        else:
            self.backend += f"; checked on first use: {err / u:.2f} u"

    def _tune(self, x, y, bias, scale) -> None:
        """Time the generated kernel with each preset tile that fits, and the library op; keep
        the fastest (recorded in ``backend`` and ``timings``)."""
        from ..passes.lower import TILES

        def ms(fn) -> float:
            for _ in range(2):
                fn()
            start, end = torch.cuda.Event(True), torch.cuda.Event(True)
            start.record()
            for _ in range(5):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 5

        best = (float("inf"), None, None)
        for name, tile in TILES.items():
            try:
                spec = dataclasses.replace(self.spec, tile=tile)
            except ValueError:
                continue  # this tile cannot build this problem
            saved = self.spec, self._loaded
            self.spec, self._loaded = spec, {}
            try:
                t = ms(lambda: self._gpu(x, y, bias, scale))
                self.timings[f"kernel {name}"] = t
                if t < best[0]:
                    best = (t, spec, self._loaded)
            except Exception as e:  # noqa: BLE001 - a candidate that fails is skipped
                log.info("tile %s failed for %s: %s", name, saved[0].name, e)
            finally:
                self.spec, self._loaded = saved
        t_lib = ms(lambda: self._library(x, y, bias, scale))
        self.timings["library"] = t_lib
        if best[1] is None or t_lib < best[0]:
            self.choice = "library"
            self.backend = (f"library (cuBLAS/cuDNN via torch: {t_lib:.3f} ms"
                            + (f" < kernel {best[0]:.3f} ms)" if best[1] else ")"))
        else:
            self.choice = "kernel"
            self.spec, self._loaded = best[1], best[2]
            t = self.spec.tile
            self.backend = (f"generated kernel, tile {t.bm}x{t.bn}x{t.bk} autotuned "
                            f"({best[0]:.3f} ms, library {t_lib:.3f} ms)")

    def _kernel(self, device: torch.device):
        from .launch import Loaded, device_arch
        from .nvrtc import compile_cubin

        key = (device.index,)
        if key not in self._loaded:
            compiled = compile_cubin(render_source(self.spec), self.spec.name,
                                     device_arch(device))
            self._loaded[key] = Loaded(self.spec, compiled, device)
        return self._loaded[key]

    def _gpu(self, x, y, bias, scale):
        sp, dev = self.spec, x.device
        out_dtype = _DT[sp.epilogue.out]
        splits = (sp.split_k,) if sp.split_k > 1 else ()  # FP32 partials, summed below
        if bias is not None:
            bias = bias.contiguous()
        if scale is not None:
            scale = scale.to(torch.float32).contiguous()
        if self.role == "gemm":
            a, b = self._operand(x, "a"), self._operand(y, "b")
            shape = (sp.batch, sp.m, sp.n) if sp.batch > 1 else (sp.m, sp.n)
            c = torch.empty(splits + shape, dtype=out_dtype, device=dev)
            self._kernel(dev)(a, b, c, bias, scale)
            return c.sum(0) if splits else c
        cv = sp.conv
        nhwc = lambda t: t.permute(0, 2, 3, 1).contiguous()  # noqa: E731
        shape = {"conv": (cv.n, cv.p, cv.q, cv.k), "dgrad": (cv.n, cv.h, cv.w, cv.c),
                 "wgrad": (cv.k, cv.r, cv.s, cv.c)}[self.role]
        c = torch.empty(splits + shape, dtype=out_dtype, device=dev)
        self._kernel(dev)(nhwc(x), nhwc(y), c, bias if self.role == "conv" else None, scale)
        if splits:
            c = c.sum(0)
        return c.permute(0, 3, 1, 2)

    def _operand(self, t: torch.Tensor, which: str) -> torch.Tensor:
        """The operand with the strides the kernel was generated for (a copy only if the
        runtime tensor's layout differs from the captured one)."""
        sp = self.spec
        layout = sp.a_layout if which == "a" else sp.b_layout
        ld = sp.lda if which == "a" else sp.ldb
        # row: element [i, j] at i*ld + j; col: at j*ld + i (for A [m, k] and B [k, n] alike)
        ld_dim = -2 if layout == "row" else -1
        want_stride = [0] * t.dim()
        want_stride[ld_dim] = ld
        want_stride[-1 if ld_dim == -2 else -2] = 1
        if t.dim() == 3:
            want_stride[0] = sp.batch_stride_a if which == "a" else sp.batch_stride_b
        if list(t.stride()) != want_stride or t.data_ptr() % 16:
            fixed = (t.contiguous() if layout == "row"
                     else t.transpose(-1, -2).contiguous().transpose(-1, -2))
            if list(fixed.stride()) != want_stride:
                raise ValueError(f"operand {which} strides {tuple(t.stride())} do not match "
                                 f"the kernel's {tuple(want_stride)}")
            return fixed
        return t


__all__ = ["ConvArgs", "KernelCall"]
