"""Checks the memory commands run before they load a model or write anything: each fails with one line."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from kvmap.errors import InputError, KVMapError


def _stat(path: Path, flag: str) -> os.stat_result | None:
    """``os.stat(path)``; None if it does not exist; InputError if the path cannot lead anywhere."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise InputError(f"{flag} {path}: a part of the path is a file, not a folder; choose another folder") from None
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot look at it ({err.strerror}); choose another folder") from None


def memory_folder(path: str, create: bool, flag: str = "--memory") -> Path:
    """``path`` checked as a memory folder: an existing folder, or (``create``) one that can be made and written."""
    folder = Path(path).expanduser()
    st = _stat(folder, flag)
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise InputError(f"{flag} {folder}: is a file, not a memory folder; choose a folder")
        if create and (folder / "manifest.json").exists() and not os.access(folder, os.W_OK):
            raise KVMapError(f"memory {folder} is read-only (no write permission, or a read-only file system); "
                             f"copy it somewhere writable or choose another --memory folder")
        return folder
    if not create:
        raise InputError(f"{flag} {folder}: no such memory folder; make one with `kvmap remember FILE --memory {folder}`")
    parent = folder.parent
    while _stat(parent, flag) is None and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {folder}: {parent} is a file, not a folder; choose another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {folder}: cannot make it, {parent} is not writable (read-only or no "
                         f"permission); choose a folder you can write to")
    return folder


def source_name(path: str, text: str) -> str:
    """The name a text is remembered under: its path as given; standard input by content, ``<stdin:ab12cd34>``."""
    if path == "-":
        return f"<stdin:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}>"
    return path


def stored_token_texts(memory, source: str) -> list[str]:
    """The token texts ``memory`` holds for ``source``, in reading order (public Memory API only)."""
    start = 0
    runs = []
    for row in memory.sources():
        runs.append((row["source"], start, row["n_tokens"]))
        start += row["n_tokens"]
    texts = memory.token_texts()
    contiguous = all(n == 0 or (memory.entry(s).source == src and memory.entry(s + n - 1).source == src)
                     for src, s, n in runs)
    if contiguous:  # one segment per source, as the CLI writes them
        return next((texts[s:s + n] for src, s, n in runs if src == source), [])
    return [t for i, t in enumerate(texts) if memory.entry(i).source == source]


def same_text(memory, source: str, tokenizer, text: str, sinks: int) -> bool:
    """Whether ``memory``'s copy of ``source`` holds the same tokens as ``text`` (sinks are not stored)."""
    from kvmap.reader import token_texts

    new = token_texts(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
    stored = stored_token_texts(memory, source)
    return stored in (new[sinks:], new)


def check_window(window: int | None, prompt_tokens: int, max_new_tokens: int, what: str = "the question") -> None:
    """InputError unless ``prompt_tokens`` plus ``max_new_tokens`` fit the model's ``window``."""
    if window is None:
        return
    if max_new_tokens >= window:
        raise InputError(f"--max-new-tokens {max_new_tokens} does not fit the model's window of {window} tokens; "
                         f"give less than {window}")
    if prompt_tokens + max_new_tokens > window:
        raise InputError(f"{what} makes a prompt of {prompt_tokens} tokens; with --max-new-tokens {max_new_tokens} "
                         f"it must stay within the model's window of {window} tokens (at most "
                         f"{window - max_new_tokens} prompt tokens); shorten it")
