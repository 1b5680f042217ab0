"""Reading ``.npy`` / ``.npz`` files of a memory folder with bounded, checked reads.

``np.load`` trusts a file's header: a damaged one that claims 10**12 values allocates them
before failing. Here the header is checked against the shape and dtype the caller expects
before any data is read, pickles are never loaded, and symlinks are refused.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

MAX_BYTES = 1 << 36
"""Largest array read (64 GiB): past any real segment's tokens, bounds or LSH tables."""


def _read_array(f, name: str, shape: tuple, kinds: str) -> np.ndarray:
    """Read one ``.npy`` stream after checking its header: no pickles, no surprise sizes.

    ``shape`` may hold None for a free axis. A header is checked before any data is read, so a
    damaged file that claims 10**12 values costs nothing.
    """
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        got, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        got, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"{name}: .npy version {version}")
    if dtype.hasobject or dtype.kind not in kinds or dtype.itemsize > 8 or len(got) != len(shape) \
            or any(w is not None and w != g for w, g in zip(shape, got)):
        raise ValueError(f"{name} holds {dtype} {got}, expected shape {shape}")
    count = int(np.prod(got, dtype=np.int64))
    if count * dtype.itemsize > MAX_BYTES:
        raise ValueError(f"{name} is too large")
    data = f.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ValueError(f"{name} is truncated")
    return np.frombuffer(data, dtype=dtype).reshape(got, order="F" if fortran else "C")


def read_npz(file: Path, spec: dict[str, tuple[tuple, str]]) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` named in ``spec`` (name -> (shape, dtype kinds, e.g. "iu")), checked.

    Raises ``ValueError`` (or zipfile's errors) on anything unexpected; callers turn that into
    a ``MemoryFormatError``. The file must be a regular file (symlinks are refused).
    """
    if os.path.islink(file):
        raise ValueError(f"{file.name} is a symlink")
    with zipfile.ZipFile(file) as z:
        out = {}
        for name, (shape, kinds) in spec.items():
            with z.open(f"{name}.npy") as f:
                out[name] = _read_array(f, name, shape, kinds)
        return out


def read_npy(file: Path, shape: tuple, kinds: str) -> np.ndarray:
    """One checked ``.npy`` file (see :func:`read_npz`)."""
    if os.path.islink(file):
        raise ValueError(f"{file.name} is a symlink")
    with open(file, "rb") as f:
        return _read_array(f, file.name, shape, kinds)
