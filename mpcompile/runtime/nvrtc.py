"""CUDA C++ -> cubin with NVRTC (``cuda-bindings`` + the ``nvidia-cuda-nvrtc`` wheel), cached on
disk by hash(source, options, NVRTC version, arch).

We ship cubins, not PTX: PTX from a newer NVRTC may not load on an older driver, SASS does.
Compiling needs no GPU, so CI compiles every kernel variant and reads the ptxas report.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import KernelError


class CompileError(KernelError):
    """A generated kernel did not compile (the log says why)."""


@dataclass(frozen=True)
class PtxasInfo:
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    barriers: int


@dataclass(frozen=True)
class Compiled:
    name: str
    arch: str
    cubin: bytes
    log: str
    info: PtxasInfo
    cached: bool


def cache_dir() -> Path:
    root = os.environ.get("MPCOMPILE_CACHE") or Path.home() / ".cache" / "mpcompile"
    path = Path(root) / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def available() -> bool:
    try:
        from cuda.bindings import nvrtc  # noqa: F401
    except ImportError:
        return False
    return True


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    _check(err, "nvrtcVersion")
    return major, minor


def _check(err, what: str) -> None:
    from cuda.bindings import nvrtc

    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"{what} failed: {err}")


_INFO = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "barriers": re.compile(r"used (\d+) barriers"),
}


def parse_ptxas(log: str) -> PtxasInfo:
    values = {}
    for key, pattern in _INFO.items():
        m = pattern.search(log)
        values[key] = int(m.group(1)) if m else 0
    return PtxasInfo(**values)


def options(arch: str) -> list[str]:
    return [f"--gpu-architecture={arch}", "--std=c++17", "--ptxas-options=--verbose"]


def compile_cubin(source: str, name: str, arch: str, use_cache: bool = True) -> Compiled:
    """Compile ``source`` to a cubin for ``arch`` (``sm_80``, ``sm_90``, ``sm_90a``)."""
    from cuda.bindings import nvrtc

    opts = options(arch)
    key = hashlib.sha256("\n".join([source, *opts, str(nvrtc_version()), arch]).encode())
    stem = cache_dir() / f"{name}-{arch}-{key.hexdigest()[:16]}"
    if use_cache and stem.with_suffix(".cubin").exists():
        log = stem.with_suffix(".log").read_text()
        return Compiled(name, arch, stem.with_suffix(".cubin").read_bytes(), log,
                        parse_ptxas(log), True)
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], [])
    _check(err, "nvrtcCreateProgram")
    try:
        bopts = [o.encode() for o in opts]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(bopts), bopts)
        err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        _check(err, "nvrtcGetProgramLogSize")
        buf = b" " * size
        (err,) = nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.decode(errors="replace").rstrip("\x00 \n")
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"kernel {name} does not compile for {arch}:\n{log[-3000:]}")
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(err, "nvrtcGetCUBINSize")
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _check(err, "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    if use_cache:
        tmp = stem.with_suffix(".tmp")
        tmp.write_bytes(cubin)
        stem.with_suffix(".log").write_text(log)
        tmp.replace(stem.with_suffix(".cubin"))
    return Compiled(name, arch, cubin, log, parse_ptxas(log), False)
