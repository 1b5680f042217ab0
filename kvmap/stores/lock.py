"""The memory's advisory lock, and the cleanup that runs under it.

Writers and cleanup hold the lock; readers never wait for it.

``fcntl.flock`` on ``<memory>/.lock``: the kernel drops it when its holder dies, even by SIGKILL,
so a killed writer never leaves a memory locked.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from kvmap.errors import KVMapError, MemoryFormatError
from kvmap.stores.folder import LOCK, MANIFEST_TMP, SEGMENT_NAME, SEGMENTS, TMP_PREFIX, check_folder, read_manifest

try:  # advisory lock between writers and cleanup (POSIX); without it cleanup is unguarded
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

HELD, BUSY, READ_ONLY = "held", "busy", "read-only"
"""What :func:`lock` found: we hold it, another process does, or the folder cannot be written."""


@contextlib.contextmanager
def lock(root: Path) -> Iterator[str]:
    """Try to take the memory's exclusive lock, without waiting; yields HELD, BUSY or READ_ONLY.

    The lock file is opened with ``O_NOFOLLOW`` (a symlinked ``.lock`` is refused, never
    created elsewhere). The kernel drops the lock when its holder dies, even by SIGKILL.
    """
    if fcntl is None:  # pragma: no cover - non-POSIX
        yield HELD
        return
    fd = _open_lock_file(root)
    if fd is None:
        yield READ_ONLY  # nobody can be writing a folder nobody may write
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield BUSY
            return
        try:
            yield HELD
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_lock_file(root: Path) -> int | None:
    """File descriptor of ``.lock`` (created if missing, never through a symlink); None when the
    folder is read-only."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(root / LOCK, flags, 0o644)
    except OSError as err:
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return None
        if err.errno == errno.ELOOP:
            raise MemoryFormatError(f"memory {root} has a symlink {LOCK}; delete it "
                                    "(kvmap memories never contain symlinks)") from None
        raise MemoryFormatError(f"memory {root} has an unusable {LOCK} ({err.strerror}); delete it") from None


@contextlib.contextmanager
def write_lock(root: Path) -> Iterator[None]:
    """Hold the lock for a change; a one-line error when another writer has it or the folder is
    read-only (never "being written" for a folder nobody may write). Only one writer, in any
    process, may change a memory at a time."""
    check_folder(root)
    with lock(root) as state:
        if state == BUSY:
            raise KVMapError(f"memory {root} is being written by another writer; wait for it to finish")
        if state != HELD:
            raise KVMapError(f"memory {root} is read-only; copy it to a writable folder to change it")
        yield


# ----------------------------------------------------------------------------------------------
# cleanup


def cleanup(root: Path) -> None:
    """Delete what a killed writer left: ``.tmp-*`` folders, unnamed segments, manifest temporaries.

    Runs only while holding the lock (skipped when a writer holds it or the folder is
    read-only), and reads the manifest again under it: a manifest read before taking the lock
    may predate a segment another process has just committed. Deletes only real folders whose
    names kvmap gives (``.tmp-*`` and 16 hex digits), never through a symlink.
    """
    seg_dir = root / SEGMENTS
    with lock(root) as state:
        if state != HELD:
            return
        named = {rec["name"] for rec in read_manifest(root)["segments"]}
        stale = []
        if seg_dir.is_dir() and not seg_dir.is_symlink():
            with os.scandir(seg_dir) as entries:
                stale = [e.path for e in entries if e.is_dir(follow_symlinks=False) and
                         (e.name.startswith(TMP_PREFIX) or (SEGMENT_NAME.fullmatch(e.name) and e.name not in named))]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        with os.scandir(root) as entries:
            temps = [e.path for e in entries if e.is_file(follow_symlinks=False) and MANIFEST_TMP.fullmatch(e.name)]
        for path in temps:
            with contextlib.suppress(OSError):
                os.unlink(path)
