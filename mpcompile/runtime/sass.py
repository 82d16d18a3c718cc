"""Read a cubin's SASS (cuobjdump + nvdisasm from the ``nvidia-cuda-cuobjdump`` /
``nvidia-cuda-nvdisasm`` wheels, or the toolkit's), to check which instructions a kernel uses."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
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


_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:\S+\s+)?(0x[0-9a-f]+)")


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without the trailing ``;``) of every SASS instruction."""
    out = []
    for line in sass.splitlines():
        m = _LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def _opcode(text: str) -> str:
    """The mnemonic of an instruction (its predicate guard ``@P0``/``@!P1`` skipped)."""
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


@dataclass(frozen=True)
class LoopStats:
    """One loop of the SASS: the instructions from a backward branch's target to the branch."""

    start: int
    end: int
    instructions: int
    hmma: int
    ldsm: int
    ldgsts: int

    @property
    def hmma_share(self) -> float:
        return self.hmma / self.instructions if self.instructions else 0.0


def loops(sass: str) -> list[LoopStats]:
    """Every backward branch's loop, in address order (NOPs are not counted)."""
    ins = instructions(sass)
    out = []
    for addr, text in ins:
        m = _BRANCH.search(text)
        if not m or int(m.group(1), 16) > addr:
            continue
        start = int(m.group(1), 16)
        body = [_opcode(t) for a, t in ins if start <= a <= addr and _opcode(t) != "NOP"]
        out.append(LoopStats(start, addr, len(body), sum(o.startswith("HMMA") for o in body),
                             sum(o.startswith("LDSM") for o in body),
                             sum(o.startswith("LDGSTS") for o in body)))
    return out


def main_loop(sass: str) -> LoopStats:
    """The loop with the most HMMA instructions: a GEMM's / convolution's K loop. When the
    compiler splits it (a copy of the loop without the refill for the last iterations), the
    longer one: the steady state, and the lower HMMA share."""
    with_mma = [lp for lp in loops(sass) if lp.hmma]
    if not with_mma:
        raise DisassemblyError("no loop with HMMA instructions in this SASS")
    return max(with_mma, key=lambda lp: (lp.hmma, lp.instructions))


def global_stores(sass: str) -> Counter:
    """Count of each global store mnemonic (``STG.E.128``, ``STG.E.U16``, ...)."""
    return Counter(o for o in (_opcode(t) for _, t in instructions(sass)) if o.startswith("STG"))
