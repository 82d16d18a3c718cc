"""Read a cubin's SASS (cuobjdump + nvdisasm from the ``nvidia-cuda-cuobjdump`` /
``nvidia-cuda-nvdisasm`` wheels, or the toolkit's), to check which instructions a kernel uses."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import KernelError


class DisassemblyError(KernelError):
    """cuobjdump could not read a cubin (its message says why)."""


def _tool_dir() -> str | None:
    try:
        import nvidia
    except ImportError:
        return None
    for base in nvidia.__path__:
        for sub in ("cu13/bin", "cuda_cuobjdump/bin"):
            d = Path(base) / sub
            if (d / "cuobjdump").exists():
                return str(d)
    return None


def available() -> bool:
    return _tool_dir() is not None or shutil.which("cuobjdump") is not None


def disassemble(cubin: bytes) -> str:
    d = _tool_dir()
    env = dict(os.environ)
    if d:
        env["PATH"] = d + os.pathsep + env.get("PATH", "")
    exe = str(Path(d) / "cuobjdump") if d else shutil.which("cuobjdump")
    if exe is None:
        raise DisassemblyError("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        r = subprocess.run([exe, "-sass", f.name], capture_output=True, text=True, env=env)
    finally:
        os.unlink(f.name)
    if r.returncode:
        raise DisassemblyError(f"cuobjdump failed: {r.stderr.strip()}")
    return r.stdout


def mma_instructions(sass: str) -> list[str]:
    """The tensor-core instruction mnemonics in ``sass`` (HMMA..., HGMMA...)."""
    out = []
    for line in sass.splitlines():
        code = line.split("*/", 1)[-1].strip()
        for word in code.replace(";", " ").split():
            if word.startswith(("HMMA", "HGMMA")):
                out.append(word)
    return out
