"""Tensor maps (``CUtensorMap``) for the Hopper kernel's TMA loads, and its launcher.

:func:`tensor_map_args` is pure: it computes every argument of ``cuTensorMapEncodeTiled`` for
operand ``a`` or ``b`` of a spec (dims innermost first, byte strides, the box, element strides,
no interleave, the 128-byte swizzle, 256-byte L2 promotion, zero fill out of bounds) and checks
the driver's documented limits, so it is tested without a GPU. :func:`encode` makes the driver
call; :class:`HopperLoaded` loads the cubin and launches the persistent grid with the two maps
passed by value as ``const __grid_constant__`` kernel parameters.
"""

from __future__ import annotations

import ctypes
import hashlib
from dataclasses import dataclass

import torch

from ..codegen import hopper
from ..codegen import wgmma as wg
from ..codegen.hopper import HopperConfig
from ..codegen.spec import KernelSpec
from ..dtypes import info
from ..errors import KernelError
from .nvrtc import Compiled

_DATA_TYPE = {"float16": "CU_TENSOR_MAP_DATA_TYPE_FLOAT16",
              "bfloat16": "CU_TENSOR_MAP_DATA_TYPE_BFLOAT16"}


class TensorMapError(KernelError, ValueError):
    """Tensor-map arguments outside what ``cuTensorMapEncodeTiled`` accepts (says which)."""


@dataclass(frozen=True)
class TensorMapArgs:
    """The arguments of ``cuTensorMapEncodeTiled`` except the address, by name of the driver's
    enums (resolved only when encoding)."""

    operand: str
    data_type: str
    dims: tuple[int, int]  # elements, innermost (contiguous) first
    strides: tuple[int]  # bytes between consecutive indices of dims[1]
    box: tuple[int, int]
    element_strides: tuple[int, int] = (1, 1)
    interleave: str = "CU_TENSOR_MAP_INTERLEAVE_NONE"
    swizzle: str = "CU_TENSOR_MAP_SWIZZLE_128B"
    l2_promotion: str = "CU_TENSOR_MAP_L2_PROMOTION_L2_256B"
    oob_fill: str = "CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE"  # NONE = zeros (NAN_REQUEST_ZERO_FMA: NaN)

    def __post_init__(self) -> None:
        what = f"tensor map of operand {self.operand}"
        if not all(1 <= d <= 2 ** 32 for d in self.dims):
            raise TensorMapError(f"{what}: dims {self.dims} must be in 1..2^32")
        if any(s % 16 or not 0 < s < 2 ** 40 for s in self.strides):
            raise TensorMapError(f"{what}: strides {self.strides} bytes must be positive "
                                 "multiples of 16 below 2^40 (pad the leading dimension)")
        if not all(1 <= b <= 256 for b in self.box):
            raise TensorMapError(f"{what}: box {self.box} must be in 1..256 per dimension")
        inner = self.box[0] * wg.ELEM_BYTES
        if inner % 16 or inner > wg.SWIZZLE_BYTES:
            raise TensorMapError(f"{what}: box inner extent {inner} B must be a multiple of 16 "
                                 f"and <= {wg.SWIZZLE_BYTES} (the 128B swizzle span)")
        if not all(1 <= e <= 8 for e in self.element_strides):
            raise TensorMapError(f"{what}: element strides {self.element_strides} in 1..8")

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def box_bytes(self) -> int:
        return self.box[0] * self.box[1] * wg.ELEM_BYTES

    def offset(self, inner, outer):
        """Element offset in global memory of tensor-map coordinates (``inner``, ``outer``)."""
        return outer * (self.strides[0] // wg.ELEM_BYTES) + inner


def tensor_map_args(spec: KernelSpec, config: HopperConfig, operand: str) -> TensorMapArgs:
    """The tensor map the Hopper kernel of ``spec`` reads operand ``a`` or ``b`` through."""
    hopper.check(spec, config)
    plan = hopper.operand_plan(spec, config, operand)
    if operand == "a":
        dims = (spec.k, spec.m) if plan.k_major else (spec.m, spec.k)
        ld = spec.lda
    else:
        dims = (spec.k, spec.n) if plan.k_major else (spec.n, spec.k)
        ld = spec.ldb
    return TensorMapArgs(operand, _DATA_TYPE[spec.dtype], dims, (ld * wg.ELEM_BYTES,),
                         plan.box)


class LaunchError(KernelError):
    """A CUDA driver call failed, or an operand cannot be read by the kernel as given."""


def _ok(result, what: str):
    from cuda.bindings import driver as cu

    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise LaunchError(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def encode(args: TensorMapArgs, address: int):
    """``cuTensorMapEncodeTiled`` (needs the CUDA driver): the 128-byte ``CUtensorMap``."""
    from cuda.bindings import driver as cu

    if address % 16:
        raise LaunchError(f"operand {args.operand} at {address:#x}: TMA needs a 16-byte aligned "
                          "base address (pass a tensor whose storage offset keeps it aligned)")
    return _ok(cu.cuTensorMapEncodeTiled(
        getattr(cu.CUtensorMapDataType, args.data_type), args.rank, address,
        [cu.cuuint64_t(d) for d in args.dims], [cu.cuuint64_t(s) for s in args.strides],
        [cu.cuuint32_t(b) for b in args.box], [cu.cuuint32_t(e) for e in args.element_strides],
        getattr(cu.CUtensorMapInterleave, args.interleave),
        getattr(cu.CUtensorMapSwizzle, args.swizzle),
        getattr(cu.CUtensorMapL2promotion, args.l2_promotion),
        getattr(cu.CUtensorMapFloatOOBfill, args.oob_fill)),
        f"cuTensorMapEncodeTiled (operand {args.operand}, {args})")


def grid_size(spec: KernelSpec, config: HopperConfig, sms: int) -> int:
    """Persistent grid: one CTA per SM, never more CTAs than output tiles."""
    tm, tn = hopper.tiles(spec, config)
    return max(1, min(sms, tm * tn))


def c_alignment(spec: KernelSpec) -> int:
    """Byte alignment the kernel needs of C: 16 for its 16-byte stores when the epilogue is
    staged, else that of an element pair."""
    if hopper.staged_epilogue(spec):
        return wg.STORE_BYTES
    return 2 * info(spec.epilogue.out).torch.itemsize


class HopperLoaded:
    """The Hopper kernel of ``spec`` loaded in ``device``'s context; call it like
    ``launch.Loaded``: ``(a, b, c, bias, scale)`` on torch's current stream."""

    def __init__(self, spec: KernelSpec, config: HopperConfig, compiled: Compiled,
                 device: torch.device):
        hopper.check(spec, config)
        if hashlib.sha256(compiled.cubin).hexdigest() != compiled.sha256:
            raise LaunchError(f"cubin of kernel {compiled.name} does not match its sha256: "
                              "refusing to load it (clear the mpcompile kernel cache and retry)")
        if compiled.name != hopper.kernel_name(spec, config):
            raise LaunchError(f"cubin {compiled.name} was not compiled for this spec/config "
                              f"(expected {hopper.kernel_name(spec, config)})")
        from cuda.bindings import driver as cu

        self.spec, self.config, self.device = spec, config, torch.device(device)
        self.args = {op: tensor_map_args(spec, config, op) for op in ("a", "b")}
        torch.cuda.current_stream(self.device)  # makes torch create and push its context
        with torch.cuda.device(self.device):
            self.module = _ok(cu.cuModuleLoadData(compiled.cubin), "cuModuleLoadData")
            self.function = _ok(cu.cuModuleGetFunction(self.module, compiled.name.encode()),
                                "cuModuleGetFunction")
            attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _ok(cu.cuFuncSetAttribute(self.function, attr, config.smem_bytes),
                "cuFuncSetAttribute(max dynamic shared memory)")
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.grid = grid_size(spec, config, sms)

    def _check(self, name: str, t: torch.Tensor | None, dtype: str | None, align: int) -> int:
        if t is None:
            return 0
        if t.device != self.device:
            raise LaunchError(f"{name} is on {t.device}, the kernel on {self.device}")
        if dtype is not None and t.dtype != info(dtype).torch:
            raise LaunchError(f"{name} is {t.dtype}, kernel {self.spec.name} expects {dtype}")
        if t.data_ptr() % align:
            raise LaunchError(f"{name} at {t.data_ptr():#x} is not {align}-byte aligned")
        return t.data_ptr()

    def __call__(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                 bias: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
        from cuda.bindings import driver as cu

        spec, ep = self.spec, self.spec.epilogue
        pa = self._check("A", a, spec.dtype, 16)
        pb = self._check("B", b, spec.dtype, 16)
        pc = self._check("C", c, ep.out, c_alignment(spec))
        pbias = self._check("bias", bias, ep.bias_dtype, 1)
        pscale = self._check("scale", scale, "float32", 4)
        if "bias_n" in ep.ops and not pbias:
            raise LaunchError(f"kernel {spec.name} adds a bias: pass it")
        if "scale" in ep.ops and not pscale:
            raise LaunchError(f"kernel {spec.name} multiplies by a scale: pass it")
        maps = [encode(self.args["a"], pa), encode(self.args["b"], pb)]
        stream = cu.CUstream(torch.cuda.current_stream(self.device).cuda_stream)
        values = (*maps, pc, pbias, pscale)
        types = (None, None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
        _ok(cu.cuLaunchKernel(self.function, self.grid, 1, 1, self.config.threads, 1, 1,
                              self.config.smem_bytes, stream, (values, types), 0),
            f"cuLaunchKernel({spec.name})")


__all__ = ["HopperLoaded", "LaunchError", "TensorMapArgs", "TensorMapError", "c_alignment",
           "encode", "grid_size", "tensor_map_args"]
