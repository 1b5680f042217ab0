"""Small file helpers shared by the memory folder, run folders and checkpoints.

One place for "write so that a reader sees the old file or the new one, never a mix" and for the
size of a folder on disk, so that every writer in kvmap is crash-safe in the same way.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entry list to disk (after a rename into it); a no-op where that is refused."""
    with contextlib.suppress(OSError):  # some filesystems refuse to open directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A file to write ``path`` through: a uniquely named temporary beside it, fsynced and renamed over it
    on a clean exit, deleted on an error (for files too large to hold in RAM at once)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` through a uniquely named temporary beside it, fsync, then rename over it."""
    with atomic_writer(path) as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """:func:`write_bytes_atomic` of ``obj`` as UTF-8 JSON."""
    write_bytes_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8"))


def disk_usage(path: str | os.PathLike) -> int:
    """Bytes of the regular files under ``path`` (symlinks are not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                if not os.path.islink(os.path.join(root, name)):
                    total += st.st_size
    return total
