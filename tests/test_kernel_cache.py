"""The on-disk kernel cache (``runtime/nvrtc.py``): private folders and files, refusal of folders
other users could write, verification of cached cubins (sha256 + key) before they are returned,
atomic writes that never follow a planted symlink, and concurrent compiles of one kernel by
threads and by processes."""
import hashlib
import logging
import multiprocessing
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mpcompile.codegen.render import render_source
from mpcompile.codegen.spec import Epilogue, KernelSpec, Tile
from mpcompile.errors import KernelError
from mpcompile.runtime import nvrtc, sass
from mpcompile.runtime.launch import LaunchError, Loaded

needs_nvrtc = pytest.mark.skipif(not (nvrtc.available() and sass.available()),
                                 reason="NVRTC / cuobjdump wheels not installed")
ARCH = "sm_80"


def _spec(n: int = 32) -> KernelSpec:
    return KernelSpec("gemm", "float16", 32, n, 32, tile=Tile(32, 32, 16, 1, 2, 2),
                      epilogue=Epilogue((), "float32"), lda=32, ldb=n, ldc=n)


SPEC = _spec()
SOURCE = render_source(SPEC)


def _compile(spec: KernelSpec = SPEC) -> nvrtc.Compiled:
    return nvrtc.compile_cubin(render_source(spec), spec.name, ARCH)


def _entry(spec: KernelSpec = SPEC):
    return nvrtc.entry_path(spec.name, ARCH, nvrtc.cache_key(render_source(spec), ARCH))


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MPCOMPILE_CACHE", str(root))
    return root


def _cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mpcompile.kernels"]


# --- folders and files ------------------------------------------------------------------------


@needs_nvrtc
def test_cache_folders_are_created_0700_and_entries_0600(tmp_path, monkeypatch):
    """Even under umask 0: every folder the cache creates (missing parents included) is 0700,
    every entry 0600, and no temp file is left behind."""
    root = tmp_path / "new" / "cache"
    monkeypatch.setenv("MPCOMPILE_CACHE", str(root))
    old = os.umask(0)
    try:
        compiled = _compile()
    finally:
        os.umask(old)
    assert not compiled.cached
    assert _mode(tmp_path / "new") == _mode(root) == _mode(root / "kernels") == 0o700
    entries = list((root / "kernels").iterdir())
    assert [p.name for p in entries] == [_entry().name]
    assert _mode(entries[0]) == 0o600
    assert _compile().cached


def test_existing_readable_kernels_folder_is_tightened_to_0700(cache):
    """A kernels folder an older version made 0755 is ours and not writable by others: kept,
    and made 0700; the user's own (0755) root folder is accepted as it is."""
    (cache / "kernels").mkdir(parents=True)
    os.chmod(cache, 0o755)
    os.chmod(cache / "kernels", 0o755)
    assert nvrtc.cache_dir() == cache / "kernels"
    assert _mode(cache / "kernels") == 0o700 and _mode(cache) == 0o755


@pytest.mark.parametrize("folder", ["root", "kernels"])
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_cache_folder_writable_by_group_or_others_is_refused(cache, folder, mode):
    (cache / "kernels").mkdir(parents=True, mode=0o700)
    path = cache if folder == "root" else cache / "kernels"
    os.chmod(path, mode)
    with pytest.raises(nvrtc.CacheError, match="writable by group or others") as info:
        nvrtc.compile_cubin(SOURCE, SPEC.name, ARCH)  # refused before NVRTC is needed
    assert isinstance(info.value, KernelError)
    assert str(path) in str(info.value) and "MPCOMPILE_CACHE" in str(info.value)
    assert list((cache / "kernels").iterdir()) == []


@pytest.mark.parametrize("folder", ["root", "kernels"])
def test_cache_folder_owned_by_another_user_is_refused(cache, folder, monkeypatch):
    """As root (CI): chown to nobody (65534). Otherwise: pretend to be another uid."""
    (cache / "kernels").mkdir(parents=True, mode=0o700)
    path = cache if folder == "root" else cache / "kernels"
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    elif folder == "root":  # every folder is then another user's; the root is checked first
        uid = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    else:
        pytest.skip("giving only the kernels folder another owner needs root")
    with pytest.raises(nvrtc.CacheError, match="is owned by uid") as info:
        nvrtc.cache_dir()
    assert str(path) in str(info.value) and "MPCOMPILE_CACHE" in str(info.value)


def test_cache_path_that_is_not_a_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("MPCOMPILE_CACHE", str(tmp_path / "file"))
    with pytest.raises(nvrtc.CacheError, match="MPCOMPILE_CACHE"):
        nvrtc.cache_dir()


# --- verification of cached entries -----------------------------------------------------------


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes(b ^ 0xFF for b in data[at:at + 8]) + data[at + 8:]


CORRUPTIONS = {
    "cubin_bytes_flipped": lambda data, other: _flip(data, len(data) - 100),
    "log_bytes_flipped": lambda data, other: _flip(data, data.index(b'"log": "') + 12),
    "log_text_edited": lambda data, other: data.replace(b"Used ", b"Used 1", 1),  # valid JSON
    "header_digest_edited": lambda data, other: data.replace(b'"sha256": "', b'"sha256": "0', 1),
    "truncated": lambda data, other: data[:-10],
    "another_kernels_entry": lambda data, other: other,
    "raw_cubin": lambda data, other: other.partition(b"\n")[2],
    "empty": lambda data, other: b"",
}


@needs_nvrtc
@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupted_or_planted_entry_is_recompiled_not_returned(cache, caplog, how):
    """A cached entry whose bytes do not verify is a miss: one warning, never returned, the
    kernel recompiled (bytes equal to a fresh compile) and the entry overwritten."""
    good = _compile()
    other = _compile(_spec(64))
    path = _entry()
    path.write_bytes(CORRUPTIONS[how](path.read_bytes(), _entry(_spec(64)).read_bytes()))
    caplog.set_level(logging.WARNING, "mpcompile.kernels")
    again = _compile()
    assert not again.cached
    assert again.cubin == good.cubin != other.cubin and again.info == good.info  # log: timings
    assert again.sha256 == hashlib.sha256(again.cubin).hexdigest()
    warned = _cache_warnings(caplog)
    assert len(warned) == 1 and str(path) in warned[0], warned
    third = _compile()
    assert third.cached and third.cubin == good.cubin
    assert len(_cache_warnings(caplog)) == 1


def test_launch_refuses_a_cubin_that_does_not_match_its_sha256():
    """The last check before cuModuleLoadData; made before any CUDA call, so no GPU needed."""
    ok = nvrtc.Compiled("k", ARCH, b"cubin", "", nvrtc.parse_ptxas(""), False)
    assert ok.sha256 == hashlib.sha256(b"cubin").hexdigest()
    bad = nvrtc.Compiled("k", ARCH, b"planted", "", nvrtc.parse_ptxas(""), True, ok.sha256)
    with pytest.raises(LaunchError, match="does not match its sha256"):
        Loaded(SPEC, bad, torch.device("cuda", 0))


# --- symlinks ---------------------------------------------------------------------------------


@needs_nvrtc
def test_planted_symlinks_are_neither_written_through_nor_read_through(cache, tmp_path, caplog):
    """Symlinks at the entry's name and at the predictable temp names of older versions, all to
    a file outside the cache: the file is unchanged, the entry becomes a real 0600 file. A
    symlink at the entry's name to a valid entry elsewhere is not read (O_NOFOLLOW)."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = _entry()
    for name in (path, path.with_suffix(".tmp"), path.with_suffix(".cubin"),
                 path.with_suffix(".log")):
        name.symlink_to(victim)
    caplog.set_level(logging.WARNING, "mpcompile.kernels")
    good = _compile()
    assert not good.cached and victim.read_bytes() == b"precious"
    assert not path.is_symlink() and _mode(path) == 0o600
    assert len(_cache_warnings(caplog)) == 1  # the link at the entry's name: not followed
    elsewhere = tmp_path / "elsewhere"
    os.replace(path, elsewhere)
    path.symlink_to(elsewhere)
    again = _compile()
    assert not again.cached and again.cubin == good.cubin and not path.is_symlink()
    assert victim.read_bytes() == b"precious"


@needs_nvrtc
@pytest.mark.parametrize("what", ["fifo", "folder"])
def test_planted_fifo_or_folder_at_the_entry_name_is_a_miss_not_a_hang(cache, caplog, what):
    """A FIFO there must not block the open (O_NONBLOCK + regular-file check) and is replaced;
    a folder there cannot be replaced: the kernel is still returned, with a warning."""
    path = _entry()
    os.mkfifo(path) if what == "fifo" else path.mkdir()
    caplog.set_level(logging.WARNING, "mpcompile.kernels")
    out = []
    worker = threading.Thread(target=lambda: out.append(_compile()), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "compile_cubin hung on the planted entry"
    assert not out[0].cached and out[0].sha256 == hashlib.sha256(out[0].cubin).hexdigest()
    assert path.is_file() == (what == "fifo") and _leftovers(cache / "kernels") == []
    assert len(_cache_warnings(caplog)) == 1 + (what == "folder")  # not a file; not written


# --- concurrency ------------------------------------------------------------------------------

ROUNDS = 4


def _compile_rounds(barrier) -> dict:
    """After ``barrier``: one compile of SPEC (all workers together, on an empty cache), then,
    after ``barrier`` again, ROUNDS compiles each preceded by deleting the entry, so that the
    compiles race on writing it. Returns digests, cached flags, errors and cache warnings."""
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("mpcompile.kernels")
    handler = Catch(logging.WARNING)
    logger.addHandler(handler)
    out = {"digests": [], "cached": [], "errors": [], "warnings": seen}
    try:
        for i in range(1 + ROUNDS):
            if i < 2:
                barrier.wait(timeout=300)
            try:
                if i:
                    _entry().unlink(missing_ok=True)
                c = _compile()
                out["digests"].append(hashlib.sha256(c.cubin).hexdigest())
                out["cached"].append(c.cached)
            except Exception as e:  # reported, not raised: the parent counts them
                out["errors"].append(repr(e))
    finally:
        logger.removeHandler(handler)
    return out


def _process_worker(cache: str, barrier, queue) -> None:
    os.environ["MPCOMPILE_CACHE"] = cache
    queue.put(_compile_rounds(barrier))


def _check_concurrent(results: list[dict], cache) -> None:
    """No error, no warning (no torn entry was ever read), identical bytes everywhere, the entry
    on disk one of them and 0600, no temp file left behind."""
    assert [e for r in results for e in r["errors"]] == []
    assert [w for r in results for w in r["warnings"]] == []
    digests = {d for r in results for d in r["digests"]}
    assert len(digests) == 1 and sum(len(r["digests"]) for r in results) == 8 * (1 + ROUNDS)
    entry = _entry()
    assert hashlib.sha256(entry.read_bytes().partition(b"\n")[2]).hexdigest() in digests
    assert _leftovers(cache / "kernels") == [] and _mode(entry) == 0o600
    assert _compile().cached


@pytest.mark.slow  # ~30 s: eight interpreters importing torch (the thread test runs by default)
@needs_nvrtc
def test_eight_processes_compiling_one_kernel_all_succeed(cache):
    """8 spawned processes compile one kernel together on an empty cache, then ROUNDS times
    more, each deleting the entry first so that every compile writes it."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(str(cache), barrier, queue))
             for _ in range(8)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 8
    _check_concurrent(results, cache)


@needs_nvrtc
def test_eight_threads_compiling_one_kernel_all_succeed(cache):
    """As the processes; the first round compiles once (the other threads wait for that compile
    and read its entry)."""
    barrier = threading.Barrier(8)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _compile_rounds(barrier), range(8)))
    _check_concurrent(results, cache)
    assert sum(not r["cached"][0] for r in results) == 1
