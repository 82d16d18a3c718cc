"""Writing files so that a crash never leaves a half-written one: the helpers the atomic writers
(``export_onnx``, ``TrainStep.save``) share. Each writer makes a ``tempfile.mkstemp`` file in the
target's folder, writes and fsyncs it, gives it :func:`new_file_mode`, ``os.replace``s it over the
target and calls :func:`sync_folder`; :func:`replacing` does all after the writing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path, tmp: str) -> Iterator[None]:
    """Write ``tmp`` (and fsync it) inside the block; then it gets :func:`new_file_mode` and is
    renamed over ``path``, and the folder is synced. On any failure ``tmp`` is removed, whatever
    was at ``path`` is untouched, and the exception goes on to the caller."""
    try:
        yield
        os.chmod(tmp, new_file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_folder(path.parent)


def new_file_mode(path: Path) -> int:
    """The permissions ``path`` would get from a plain open(): its own if it exists, else
    0o666 less the umask (mkstemp's files are 0o600)."""
    with contextlib.suppress(OSError):
        return os.stat(path).st_mode & 0o7777
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
