"""CUDA C++ -> cubin with NVRTC (``cuda-bindings`` + the ``nvidia-cuda-nvrtc`` wheel), cached on
disk by hash(source, options, NVRTC version, arch).

We ship cubins, not PTX: PTX from a newer NVRTC may not load on an older driver, SASS does.
Compiling needs no GPU, so CI compiles every kernel variant and reads the ptxas report.

The disk cache (``$MPCOMPILE_CACHE/kernels``, default ``~/.cache/mpcompile/kernels``) holds one
file per kernel, ``<name>-<arch>-<key16>.kernel``: a JSON header line (full key, sha256 of the
cubin and of the ptxas log, the log) followed by the cubin bytes. Folders are created 0700 and
refused if another user owns them or group/others may write them (:class:`CacheError`); files
are 0600, written to a unique ``mkstemp`` name and ``os.replace``-d into place (atomic, never
written through a symlink), so threads and processes compiling the same kernel are safe. A cached
entry is opened without following symlinks and returned only if its key and digests verify;
anything else is a cache miss (one warning), recompiled and overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KernelError

log = logging.getLogger("mpcompile.kernels")

_FORMAT = 1
_SUFFIX = ".kernel"


class CompileError(KernelError):
    """A generated kernel did not compile (the log says why)."""


class CacheError(KernelError):
    """The kernel cache folder is unsafe to use (owned by another user, or writable by group or
    others) or is not a folder; the message names it and says what to do."""


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
    sha256: str = field(default="")  # of ``cubin``; checked again before the driver loads it

    def __post_init__(self):
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.cubin).hexdigest())


def _cache_root() -> Path:
    return Path(os.environ.get("MPCOMPILE_CACHE") or Path.home() / ".cache" / "mpcompile")


def _check_private(path: Path) -> None:
    """Refuse a cache folder that another user owns or that group/others may write."""
    fix = ("set MPCOMPILE_CACHE to a new folder only you own and can write (e.g. "
           "`mkdir -m 700 ~/.mpcompile-cache`)")
    try:
        st = os.stat(path)
    except OSError as e:
        raise CacheError(f"kernel cache folder {path} cannot be used ({e}); {fix}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"kernel cache folder {path} is not a folder; {fix}")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():  # POSIX
        raise CacheError(f"kernel cache folder {path} is owned by uid {st.st_uid}, not by you "
                         f"(uid {os.geteuid()}): another user could plant kernels there; {fix}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheError(f"kernel cache folder {path} is writable by group or others "
                         f"(mode {stat.S_IMODE(st.st_mode):o}): another user could plant kernels "
                         f"there (so do not just chmod it and reuse its files); {fix}")


def _mkdirs_private(path: Path) -> None:
    """Create ``path`` and its missing parents 0700 (as XDG asks of ``~/.cache``); a folder made
    meanwhile by another process is fine."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)


def cache_dir() -> Path:
    """The kernel cache folder, created 0700; :class:`CacheError` if it is not private."""
    root = _cache_root()
    path = root / "kernels"
    try:
        _mkdirs_private(root)
        _check_private(root)
        _mkdirs_private(path)
    except OSError as e:
        raise CacheError(f"kernel cache folder {path} cannot be created ({e}); set "
                         "MPCOMPILE_CACHE to a folder you can write") from e
    _check_private(path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:  # ours and not writable by others, but readable: made by an older version
        os.chmod(path, mode & 0o700)
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


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_entry(path: Path, key: str) -> tuple[bytes, str, str] | None:
    """(cubin, log, sha256) of a verified cache entry, or None (a miss; warned unless absent)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK  # a FIFO must not block the open
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as e:  # a symlink (ELOOP), unreadable, ...
        log.warning("kernel cache entry %s cannot be opened safely (%s); recompiling", path, e)
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a folder, a device, ...
        os.close(fd)
        log.warning("kernel cache entry %s is not a regular file; recompiling", path)
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    head, _, cubin = data.partition(b"\n")
    try:
        meta = json.loads(head)
        ok = (meta["format"] == _FORMAT and meta["key"] == key
              and meta["sha256"] == _sha(cubin)
              and meta["log_sha256"] == _sha(meta["log"].encode()))
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        log.warning("kernel cache entry %s does not verify (sha256 / key mismatch: corrupted or "
                    "planted); ignoring it, recompiling and overwriting it", path)
        return None
    return cubin, meta["log"], meta["sha256"]


def _write_entry(path: Path, key: str, compiled: Compiled) -> None:
    """Write atomically: a unique 0600 temp file in the cache folder, then ``os.replace`` (which
    replaces a symlink at ``path`` rather than writing through it)."""
    meta = {"format": _FORMAT, "key": key, "name": compiled.name, "arch": compiled.arch,
            "sha256": compiled.sha256, "log_sha256": _sha(compiled.log.encode()),
            "log": compiled.log}
    data = json.dumps(meta).encode() + b"\n" + compiled.cubin
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        log.warning("kernel cache entry %s not written (%s)", path, e)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(e, OSError):
            raise
        log.warning("kernel cache entry %s not written (%s)", path, e)


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def _key_lock(key: str) -> threading.Lock:
    """One lock per cache key: threads of one process compile a kernel once."""
    with _LOCKS_LOCK:
        return _LOCKS.setdefault(key, threading.Lock())


def _nvrtc_compile(source: str, name: str, arch: str, opts: list[str]) -> Compiled:
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], [])
    _check(err, "nvrtcCreateProgram")
    try:
        bopts = [o.encode() for o in opts]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(bopts), bopts)
        err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        _check(err, "nvrtcGetProgramLogSize")
        buf = b" " * size
        (err,) = nvrtc.nvrtcGetProgramLog(prog, buf)
        log_text = buf.decode(errors="replace").rstrip("\x00 \n")
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"kernel {name} does not compile for {arch}:\n{log_text[-3000:]}")
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(err, "nvrtcGetCUBINSize")
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _check(err, "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return Compiled(name, arch, cubin, log_text, parse_ptxas(log_text), False)


def entry_path(name: str, arch: str, key: str) -> Path:
    """The cache file of one kernel (``name`` and ``arch`` made file-name safe)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-{arch}")
    return cache_dir() / f"{safe}-{key[:16]}{_SUFFIX}"


def cache_key(source: str, arch: str) -> str:
    return _sha("\n".join([source, *options(arch), str(nvrtc_version()), arch]).encode())


def compile_cubin(source: str, name: str, arch: str, use_cache: bool = True) -> Compiled:
    """Compile ``source`` to a cubin for ``arch`` (``sm_80``, ``sm_90``, ``sm_90a``)."""
    opts = options(arch)
    if not use_cache:
        return _nvrtc_compile(source, name, arch, opts)
    key = cache_key(source, arch)
    path = entry_path(name, arch, key)
    with _key_lock(key):
        hit = _read_entry(path, key)
        if hit is not None:
            cubin, log_text, digest = hit
            return Compiled(name, arch, cubin, log_text, parse_ptxas(log_text), True, digest)
        compiled = _nvrtc_compile(source, name, arch, opts)
        _write_entry(path, key, compiled)
    return compiled
