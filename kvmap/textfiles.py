"""Read user text files with clear one-line errors (missing, empty, binary, not UTF-8)."""
from __future__ import annotations

import sys
from pathlib import Path

from kvmap.errors import InputError


def read_text(path: str) -> str:
    """Return the UTF-8 text of ``path`` (``-`` reads standard input); raise InputError on bad input."""
    if path == "-":
        data = sys.stdin.buffer.read()
        name = "<stdin>"
    else:
        p = Path(path)
        if not p.exists():
            raise InputError(f"{path}: no such file; check the path")
        if p.is_dir():
            raise InputError(f"{path}: is a folder; give the text files inside it")
        try:
            data = p.read_bytes()
        except OSError as err:
            raise InputError(f"{path}: cannot read ({err.strerror}); check its permissions") from None
        name = path
    if b"\x00" in data[:65536]:
        raise InputError(f"{name}: looks like a binary file (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{name}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         f"convert it, e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise InputError(f"{name}: file is empty; nothing to remember")
    return text
