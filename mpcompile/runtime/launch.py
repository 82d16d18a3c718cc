"""Load a cubin into torch's CUDA context and launch it on torch's current stream
(``cuda-bindings`` driver API). Only used on a machine with a GPU."""

from __future__ import annotations

import ctypes
import hashlib

import torch

from ..codegen.spec import KernelSpec
from ..errors import KernelError
from .nvrtc import Compiled

_SMEM_DEFAULT_LIMIT = 48 * 1024


class LaunchError(KernelError):
    """A CUDA driver call failed, or a launch was given tensors on another device."""


def _ok(result):
    from cuda.bindings import driver as cu

    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise LaunchError(f"CUDA driver call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


class Loaded:
    """One kernel loaded in the current context of ``device``."""

    def __init__(self, spec: KernelSpec, compiled: Compiled, device: torch.device):
        if hashlib.sha256(compiled.cubin).hexdigest() != compiled.sha256:
            raise LaunchError(f"cubin of kernel {compiled.name} ({compiled.arch}) does not match "
                              "its sha256: refusing to load it (delete the kernels folder of the "
                              "cache, $MPCOMPILE_CACHE or ~/.cache/mpcompile, and retry)")
        from cuda.bindings import driver as cu

        torch.cuda.current_stream(device)  # make torch create/make current its context
        with torch.cuda.device(device):
            _ok(cu.cuInit(0))
            self.module = _ok(cu.cuModuleLoadData(compiled.cubin))
            self.function = _ok(cu.cuModuleGetFunction(self.module, spec.name.encode()))
            self.smem = spec.smem_bytes  # the stage ring or the epilogue staging
            if self.smem > _SMEM_DEFAULT_LIMIT:
                attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                _ok(cu.cuFuncSetAttribute(self.function, attr, self.smem))
        self.spec = spec
        self.device = device

    def __call__(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                 bias: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
        from cuda.bindings import driver as cu

        for name, t in (("A", a), ("B", b), ("C", c)):
            if t.device != self.device:
                raise LaunchError(f"{name} is on {t.device}, the kernel on {self.device}")
        gx, gy, gz = self.spec.grid()
        stream = cu.CUstream(torch.cuda.current_stream(self.device).cuda_stream)
        ptrs = [t.data_ptr() if t is not None else 0 for t in (a, b, c, bias, scale)]
        params = (tuple(ptrs), tuple(ctypes.c_void_p for _ in ptrs))
        _ok(cu.cuLaunchKernel(self.function, gx, gy, gz, self.spec.tile.threads, 1, 1,
                              self.smem, stream, params, 0))
