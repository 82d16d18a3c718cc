"""Execution backends: how a compiled graph runs.

    "eager"     the fx graph runs op by op on torch's eager kernels
    "inductor"  torch's Inductor compiles the graph (C++/OpenMP on CPU, Triton on CUDA):
                element-wise chains fuse into loops, and a training step's in-place state
                updates become stores into the state tensors
    "auto"      Inductor where it can work on the device (a C++ compiler on CPU, Triton on
                CUDA), else eager

A graph Inductor cannot compile runs eagerly instead, with one logged warning; ``status``
says which backend runs, why, and how long compiling took (reports print it). Inductor's
on-disk caches (FX graph cache) are left on, so a second process compiles the same graph fast.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .errors import MPCompileError

log = logging.getLogger("mpcompile")

BACKENDS = ("auto", "inductor", "eager")


def check_backend(backend: Any) -> str:
    """``backend`` if it names a backend, else a clear error."""
    if backend not in BACKENDS:
        raise MPCompileError(f"backend={backend!r}: give one of {', '.join(map(repr, BACKENDS))}")
    return backend


def inductor_unavailable(device_type: str) -> str | None:
    """Why Inductor cannot compile for ``device_type`` here, or None when it can."""
    if device_type == "cpu":
        from torch._inductor import config

        names = [c for c in config.cpp.cxx if c]
        if not any(shutil.which(c) for c in names):
            return f"no C++ compiler ({', '.join(names)}) on the PATH"
        return None
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    return f"Inductor does not compile for {device_type} devices"


def resolve(backend: str, device_type: str) -> tuple[str, str]:
    """(the backend to use, why) for a requested one on ``device_type``."""
    check_backend(backend)
    if backend == "eager":
        return "eager", "requested"
    why_not = inductor_unavailable(device_type)
    if backend == "inductor":
        if why_not:
            raise MPCompileError(f"backend='inductor' cannot run here: {why_not}. Use "
                                 "backend='eager' (or 'auto', which falls back by itself)")
        return "inductor", "requested"
    if why_not:
        return "eager", f"auto: {why_not}"
    return "inductor", f"auto: Inductor compiles for {device_type}"


@dataclass(frozen=True)
class Status:
    """Which backend runs a graph, and why."""

    requested: str  # "auto", "inductor" or "eager"
    backend: str  # what runs: "inductor", "eager", or "inductor (not compiled yet)"
    reason: str  # auto's choice, or the error that made Inductor fall back
    compile_seconds: float | None = None  # Inductor's compile (a forward: its first call)

    def __str__(self) -> str:
        s = f"{self.backend} ({self.reason}"
        if self.compile_seconds is not None:
            s += f"; compiled in {self.compile_seconds:.1f} s"
        return s + ")"


# Errors raised while compiling (before any compiled code runs): Dynamo's and Inductor's own
# families. Anything else raised by a compiled call is the graph's own error and propagates.
def _compile_error(e: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor import exc as inductor_exc

    return isinstance(e, (TorchDynamoException, inductor_exc.OperatorIssue,
                          inductor_exc.CppCompileError, inductor_exc.InvalidCxxCompiler,
                          inductor_exc.CUDACompileError))


class Runner:
    """Runs one graph module through a backend; Inductor compiles on the first call.

    ``direct=True``: ``torch._inductor.compile`` for the first call's inputs (shapes, strides,
    which of them require grad), with no guards: the caller keeps later inputs alike (a training
    step, whose batch is checked and made contiguous; a graph Dynamo already guards). It
    compiles without running anything, so a failure leaves every input untouched (the step
    updates its state in place). ``direct=False`` (a ``convert`` forward, called in any grad
    mode): ``torch.compile``, whose guards recompile for new grad modes; the graph is
    functional, so running it eagerly after a failed compile is safe.
    """

    def __init__(self, gm: fx.GraphModule, backend: str, device_type: str, what: str,
                 direct: bool):
        self.gm = gm
        self.what = what
        self.direct = direct
        self._requested = check_backend(backend)
        used, reason = resolve(backend, device_type)
        self._fn: Callable | None = gm if used == "eager" else None
        self._status = Status(backend, used if used == "eager" else "inductor (not compiled yet)",
                              reason)
        self._lock = threading.Lock()

    @property
    def status(self) -> Status:
        return self._status

    def __call__(self, *args: torch.Tensor) -> Any:
        fn = self._fn
        if fn is None:
            with self._lock:
                if self._fn is None:
                    self._compile(args)
                fn = self._fn
        if self.direct or fn is self.gm:
            return fn(*args)
        first = self._status.compile_seconds is None
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - only compile errors are caught
            if not _compile_error(e):
                raise
            self._fall_back(e)
            return self.gm(*args)
        if first and self._fn is fn:  # torch.compile compiles during its first call
            self._status = Status(self._requested, "inductor", self._status.reason,
                                  time.perf_counter() - t0)
        return out

    def _compile(self, args: tuple) -> None:
        t0 = time.perf_counter()
        try:
            if self.direct:
                import torch._inductor as inductor

                fn = inductor.compile(self.gm, list(args))
            else:
                fn = torch.compile(self.gm, backend="inductor", fullgraph=True, dynamic=False)
        except Exception as e:  # noqa: BLE001 - any compile failure: run eagerly instead
            self._fall_back(e)
            return
        self._fn = fn
        self._status = Status(self._requested, "inductor", self._status.reason,
                              time.perf_counter() - t0 if self.direct else None)

    def _fall_back(self, e: BaseException) -> None:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = f"Inductor failed: {type(e).__name__}" + (f": {msg[:300]}" if msg else "")
        log.warning("%s runs eagerly (%s). Pass backend='eager' to skip the attempt.",
                    self.what, why)
        self._fn = self.gm
        self._status = Status(self._requested, "eager", why)
