"""``KernelCall``: the module a lowered graph calls in place of a matmul or convolution.

On a CUDA tensor it runs the generated kernel (compiled on first use for the device's arch,
cached on disk); anywhere else, under fake tensors, or if compiling/launching fails, it computes
the same contract with torch (``reference.py``) and says why (``state`` and ``detail``, read
together as ``backend``, and a log line once): never a silent wrong answer.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

from ..codegen.render import render_source
from ..codegen.spec import KernelSpec, Kind, SpecError
from ..codegen.tiles import TILES
from ..dtypes import from_name, unit_roundoff
from . import nvrtc, reference
from .launch import LaunchError, Loaded, device_arch

log = logging.getLogger("mpcompile.kernels")
CHECK_UNITS = 16  # first-use check: max difference from the library op, in units of rounding


class KernelState(enum.Enum):
    """What ran a :class:`KernelCall` last (its ``detail`` says why or how well)."""

    NOT_RUN = "not run yet"
    REFERENCE = "reference"  # the torch contract: off-GPU, fake tensors, or after a failure
    KERNEL = "generated kernel"
    LIBRARY = "library"  # cuBLAS/cuDNN through torch: faster, or the kernel failed its check


@dataclass(frozen=True)
class ConvArgs:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    input_shape: tuple[int, ...] = ()
    weight_shape: tuple[int, ...] = ()


class KernelCall(torch.nn.Module):
    """Arguments by ``role`` (the spec's kind): GEMM a, b[, bias][, scale]; CONV_FPROP x, w[,
    bias][, scale]; CONV_DGRAD grad_out, w[, scale]; CONV_WGRAD grad_out, x[, scale]."""

    def __init__(self, spec: KernelSpec, has_bias: bool, has_scale: bool,
                 conv: ConvArgs | None = None, final: str | None = None):
        super().__init__()
        self.spec = spec
        # the dtype the graph expects: split-K results are summed in FP32, then rounded once
        self.final = from_name(final or spec.epilogue.out)
        self.has_bias = has_bias
        self.has_scale = has_scale
        self.conv = conv
        self.state = KernelState.NOT_RUN
        self.detail = ""
        self.autotune = True  # on the first CUDA call: time the tile presets and the library
        self.timings: dict[str, float] = {}  # candidate -> milliseconds
        self._decision: tuple[KernelState, str] | None = None  # KERNEL/LIBRARY on CUDA
        self._loaded: dict = {}
        self._failed: str | None = None

    @property
    def role(self) -> Kind:
        return self.spec.kind

    @property
    def backend(self) -> str:
        """What ran this call last, in words (reports print it)."""
        return f"{self.state.value} ({self.detail})" if self.detail else self.state.value

    def extra_repr(self) -> str:
        return f"{self.spec.name}, role={self.role.value}, backend={self.backend!r}"

    # -- dispatch ------------------------------------------------------------------------------

    def forward(self, *args):
        x, y, rest = args[0], args[1], list(args[2:])
        bias = rest.pop(0) if self.has_bias else None
        scale = rest.pop(0) if self.has_scale else None
        reason = self._why_not_gpu(x, y)
        if reason is None:
            try:
                if self._decision is None:
                    self._first_use(x, y, bias, scale)
                self.state, self.detail = self._decision
                if self.state is KernelState.LIBRARY:
                    return self._library(x, y, bias, scale).to(self.final)
                return self._gpu(x, y, bias, scale).to(self.final)
            except Exception as e:  # noqa: BLE001 - fall back loudly, never silently wrong
                self._failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                log.warning("kernel %s failed (%s); running the torch reference instead",
                            self.spec.name, self._failed)
                reason = self._failed
        if not is_fake(x):
            self.state, self.detail = KernelState.REFERENCE, reason
        return self._reference(x, y, bias, scale).to(self.final)

    def _why_not_gpu(self, x: torch.Tensor, y: torch.Tensor) -> str | None:
        if is_fake(x) or is_fake(y):
            return "fake tensors"
        if not x.is_cuda:
            return f"tensors on {x.device.type}, no GPU"
        if self._failed:
            return self._failed
        if not nvrtc.available():
            return "NVRTC not installed (pip install mpcompile[gpu])"
        return None

    # -- reference -----------------------------------------------------------------------------

    def _reference(self, x, y, bias, scale):
        sp, ep, cv = self.spec, self.spec.epilogue, self.conv
        if self.role is Kind.GEMM:
            return reference.gemm(x, y, ep, sp.dtype, bias, scale)
        if self.role is Kind.CONV_FPROP:
            return reference.conv_fprop(x, y, ep, sp.dtype, cv.stride, cv.padding,
                                        cv.dilation, bias, scale)
        if self.role is Kind.CONV_DGRAD:
            return reference.conv_dgrad(x, y, cv.input_shape, ep, sp.dtype, cv.stride,
                                        cv.padding, cv.dilation, scale)
        return reference.conv_wgrad(x, y, cv.weight_shape, ep, sp.dtype, cv.stride,
                                    cv.padding, cv.dilation, scale)

    # -- GPU -------------------------------------------------------------------------------------

    def _library(self, x, y, bias, scale):
        """The same op through torch's CUDA libraries (cuBLAS/cuDNN) in the operand dtype, then
        the epilogue in FP32 (one extra rounding, before the epilogue)."""
        sp, cv = self.spec, self.conv
        if self.role is Kind.GEMM:
            acc = torch.matmul(x, y)
        elif self.role is Kind.CONV_FPROP:
            acc = torch.nn.functional.conv2d(x, y, None, cv.stride, cv.padding, cv.dilation)
        elif self.role is Kind.CONV_DGRAD:
            acc = torch.nn.grad.conv2d_input(list(cv.input_shape), y, x, cv.stride,
                                             cv.padding, cv.dilation)
        else:
            acc = torch.nn.grad.conv2d_weight(y, list(cv.weight_shape), x, cv.stride,
                                              cv.padding, cv.dilation)
        channel_dim = {Kind.GEMM: -1, Kind.CONV_WGRAD: 0}.get(self.role, 1)  # where N lies
        return reference.apply_epilogue(acc.to(torch.float32), sp.epilogue, sp.dtype, bias, scale,
                                        channel_dim=channel_dim)

    def _first_use(self, x, y, bias, scale) -> None:
        """Autotune (optional), then check the kernel's result against the library op on the
        same inputs: beyond ``CHECK_UNITS`` units of rounding of the output, this call switches
        to the library for good, and says so."""
        tuned = self._tune(x, y, bias, scale) if self.autotune else None
        if tuned is not None and tuned[0] is KernelState.LIBRARY:
            self._decision = tuned
            return
        got = self._gpu(x, y, bias, scale).to(torch.float32)
        want = self._library(x, y, bias, scale).to(torch.float32)
        u = unit_roundoff(self.spec.dtype)
        err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
        if not err <= CHECK_UNITS * u:  # also catches NaN
            detail = (f"the generated kernel's result differed from cuBLAS/cuDNN by "
                      f"{err / u:.1f} u on first use")
            log.warning("kernel %s: %s; using the library op", self.spec.name, detail)
            self._decision = (KernelState.LIBRARY, detail)
            return
        checked = f"checked on first use: {err / u:.2f} u"
        self._decision = (KernelState.KERNEL,
                          f"{tuned[1]}; {checked}" if tuned is not None else checked)

    def _tune(self, x, y, bias, scale) -> tuple[KernelState, str]:
        """Time the generated kernel with each preset tile that fits, and the library op; keep
        the fastest (recorded in ``timings``); (state, detail) of the winner."""

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
            except SpecError:
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
            return KernelState.LIBRARY, (f"cuBLAS/cuDNN via torch: {t_lib:.3f} ms"
                                         + (f" < kernel {best[0]:.3f} ms" if best[1] else ""))
        self.spec, self._loaded = best[1], best[2]
        t = self.spec.tile
        return KernelState.KERNEL, (f"tile {t.bm}x{t.bn}x{t.bk} autotuned: {best[0]:.3f} ms, "
                                    f"library {t_lib:.3f} ms")

    def _kernel(self, device: torch.device):
        key = (device.index,)
        if key not in self._loaded:
            compiled = nvrtc.compile_cubin(render_source(self.spec), self.spec.name,
                                           device_arch(device))
            self._loaded[key] = Loaded(self.spec, compiled, device)
        return self._loaded[key]

    def _gpu(self, x, y, bias, scale):
        sp, dev = self.spec, x.device
        out_dtype = from_name(sp.epilogue.out)
        splits = (sp.split_k,) if sp.split_k > 1 else ()  # FP32 partials, summed below
        if bias is not None:
            bias = bias.contiguous()
        if scale is not None:
            scale = scale.to(torch.float32).contiguous()
        if self.role is Kind.GEMM:
            a, b = self._operand(x, "a"), self._operand(y, "b")
            shape = (sp.batch, sp.m, sp.n) if sp.batch > 1 else (sp.m, sp.n)
            c = torch.empty(splits + shape, dtype=out_dtype, device=dev)
            self._kernel(dev)(a, b, c, bias, scale)
            return c.sum(0) if splits else c
        cv = sp.conv
        nhwc = lambda t: t.permute(0, 2, 3, 1).contiguous()  # noqa: E731
        shape = {Kind.CONV_FPROP: (cv.n, cv.p, cv.q, cv.k),
                 Kind.CONV_DGRAD: (cv.n, cv.h, cv.w, cv.c),
                 Kind.CONV_WGRAD: (cv.k, cv.r, cv.s, cv.c)}[self.role]
        c = torch.empty(splits + shape, dtype=out_dtype, device=dev)
        self._kernel(dev)(nhwc(x), nhwc(y), c, bias if self.role is Kind.CONV_FPROP else None,
                          scale)
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
                raise LaunchError(f"operand {which} strides {tuple(t.stride())} do not match "
                                  f"the kernel's {tuple(want_stride)}")
            return fixed
        return t


__all__ = ["CHECK_UNITS", "ConvArgs", "KernelCall", "KernelState"]
