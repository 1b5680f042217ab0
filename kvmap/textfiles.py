"""Read user text files with clear one-line errors (missing, empty, binary, not UTF-8, not a regular file, too large)."""
from __future__ import annotations

import codecs
import os
import stat
import sys

from kvmap.errors import InputError

MAX_BYTES = 64 << 20
"""Largest text read by default (64 MiB, about 16M tokens); ``kvmap remember --max-bytes`` raises it."""

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe (FIFO)"),
          (stat.S_ISSOCK, "a socket"))


def _file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _read_capped(f, limit: int, name: str) -> bytes:
    """At most ``limit`` bytes of ``f``; InputError when there are more (reads limit + 1, so an endless stream stops)."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{name}: more than {limit} bytes; pass --max-bytes N to read larger texts, or split it")
    return data


def _open_regular(path: str):
    """Open ``path`` for reading if it is a regular file; never blocks on a FIFO and never reads a device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the path") from None
    except NotADirectoryError:
        raise InputError(f"{path}: no such file (a part of the path is not a folder); check the path") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror}); check its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a folder; give the text files inside it")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: is {_file_kind(st.st_mode)}, not a text file; give a regular file "
                         f"(or '-' to read standard input)")
    try:
        # O_NONBLOCK: should the path become a FIFO between stat and open, open does not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror}); check its permissions") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path}: is not a regular file; give a text file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _decode(data: bytes, name: str) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")  # the BOM says which byte order; decode drops it
        except UnicodeDecodeError as err:
            raise InputError(f"{name}: starts like UTF-16 text but is not valid UTF-16 (offset {err.start}); "
                             f"convert it, e.g. iconv -f utf-16 -t utf-8") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise InputError(f"{name}: looks like a binary file (NUL byte at offset {nul}); give a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{name}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         f"convert it, e.g. iconv -f latin1 -t utf-8") from None


def read_text(path: str, max_bytes: int = MAX_BYTES) -> str:
    """Return the text of ``path`` (``-`` reads standard input); raise InputError on bad input.

    Only regular files (and standard input) are read, at most ``max_bytes`` bytes. UTF-8 (with or without
    a BOM) and UTF-16 with a BOM are decoded; NUL bytes anywhere else mean a binary file.
    """
    if max_bytes < 1:
        raise InputError(f"--max-bytes must be 1 or more, got {max_bytes}")
    if path == "-":
        name = "<stdin>"
        data = _read_capped(sys.stdin.buffer, max_bytes, name)
    else:
        name = path
        with _open_regular(path) as f:
            try:
                data = _read_capped(f, max_bytes, name)
            except OSError as err:
                raise InputError(f"{path}: cannot read ({err.strerror}); check the file") from None
    return decode_text(data, name)


def decode_text(data: bytes, name: str) -> str:
    """The text of ``data`` (a file's bytes, named ``name`` in errors); InputError when binary, not UTF-8
    (or UTF-16 with a BOM) or empty. Shared by files read from disk and texts uploaded to ``kvmap explore``."""
    text = _decode(data, name)
    if not text.strip():
        raise InputError(f"{name}: file is empty; nothing to remember")
    return text
