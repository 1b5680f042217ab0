"""The memory folder's format on disk: names, strict reading of manifest.json and meta.json, errors.

::

    memory/
      manifest.json             format_version, model_id, layout, dtype, store, segments, n_tokens
      .lock                     advisory lock held by writers and by cleanup
      segments/<16 hex digits>/
        k00.bin v00.bin ...     per layer, raw token-major (n, H, d) arrays in the memory's dtype
        tokens.npz              token_ids, doc_ids, offsets (n,) integers
        texts.json              each token's text
        <index files>           the store kind's per-layer index (none for "exact")
        meta.json               shapes, dtype, size and sha256 of every file above
        bounds-b<size>.npy      derived key bounds (not in meta.json; rebuilt when damaged)

A memory folder is read as untrusted input: every field is checked explicitly (never with
``assert``, which ``python -O`` strips), names must match fixed patterns, and nothing inside
may be a symlink, so that no name or link in a memory can make kvmap read, write or delete
anything outside it. Every problem is a one-line :class:`MemoryFormatError`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from kvmap.errors import InputError, KVMapError, MemoryFormatError
from kvmap.fileio import write_json_atomic
from kvmap.ports import KVLayout
from kvmap.stores.base import STORE_KINDS, make_index

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SEGMENTS = "segments"
TMP_PREFIX = ".tmp-"
LOCK = ".lock"
DTYPES = ("float16", "float32")

SEGMENT_NAME = re.compile(r"[0-9a-f]{16}")
"""Every committed segment folder's name (``uuid4().hex[:16]``); cleanup deletes nothing else."""
SHA256 = re.compile(r"[0-9a-f]{64}")
MANIFEST_TMP = re.compile(r"(manifest\.json\.tmp|\.manifest\.json\.[0-9a-f]{8}\.tmp)")
"""Temporaries of a killed manifest replace (older kvmap, and :func:`kvmap.fileio.write_bytes_atomic`)."""

MAX_TOKENS = 1 << 40  # per segment: far past any disk; refuses absurd counts before any arithmetic
MAX_LAYERS, MAX_HEADS, MAX_HEAD_DIM = 1024, 1024, 1 << 16
MAX_PARAM = (1 << 31) - 1
FIX_MANIFEST = "restore it or start a new --memory folder"
FIX_SEGMENT = "restore the folder or `kvmap forget` its source"


def show(x: Any, limit: int = 40) -> str:
    """A short one-line ``repr`` of a value read from a damaged file, for messages."""
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def whole(x: Any, lo: int, hi: int) -> bool:
    """``x`` is a JSON integer (not a bool, not 30.0, not "30") in lo..hi."""
    return type(x) is int and lo <= x <= hi


# ----------------------------------------------------------------------------------------------
# files and folders


def file_digest(path: Path, dtype: np.dtype | None = None) -> tuple[str, bool]:
    """sha256 of a file and, given the dtype of its values, whether every value is finite.

    One pass: ``verify`` reads every byte for the checksum anyway, so NaN/inf K/V are found
    at no extra read.
    """
    h, finite = hashlib.sha256(), True
    step = (1 << 20) - (1 << 20) % (dtype.itemsize if dtype is not None else 1)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(step), b""):
            h.update(block)
            if dtype is not None and finite and len(block) % dtype.itemsize == 0:
                finite = bool(np.isfinite(np.frombuffer(block, dtype=dtype)).all())
    return h.hexdigest(), finite


def real_entry(path: Path, root: Path, want_dir: bool, fix: str = FIX_SEGMENT) -> os.stat_result:
    """``lstat`` of a folder or regular file inside memory ``root``; refuses symlinks and the rest.

    A symlink could point anywhere: reading it would read outside the memory, and cleanup or
    ``forget`` would delete what it points at.
    """
    what = "folder" if want_dir else "file"
    try:
        st = os.lstat(path)
    except OSError as err:
        raise MemoryFormatError(f"memory {root} cannot read {path} ({err.strerror}); {fix}") from None
    if stat.S_ISLNK(st.st_mode):
        raise MemoryFormatError(f"memory {root} contains a symlink {path}; replace it with the real {what} "
                                "(kvmap memories never contain symlinks)")
    if not (stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)):
        raise MemoryFormatError(f"memory {root}: {path} is not a {what}; {fix}")
    return st


def check_folder(root: Path) -> None:
    """Refuse a memory whose ``segments/``, ``.lock`` or ``manifest.json`` is a symlink."""
    for name in (MANIFEST, LOCK, SEGMENTS):
        if (root / name).is_symlink():
            raise MemoryFormatError(f"memory {root} has a symlink {name}; replace it with the real "
                                    f"{'folder' if name == SEGMENTS else 'file'} (kvmap memories never contain symlinks)")
    if (root / SEGMENTS).exists():
        real_entry(root / SEGMENTS, root, want_dir=True)


def write_error(root: Path, err: OSError, doing: str) -> KVMapError:
    """One-line error for an OS error while changing memory ``root`` (disk full, read-only...)."""
    reason, fix = {
        errno.ENOSPC: ("the disk is full", "free disk space and run it again"),
        errno.EDQUOT: ("the disk quota is exceeded", "free disk space and run it again"),
        errno.EROFS: ("the file system is read-only", "use a --memory folder on a writable disk"),
        errno.EACCES: ("permission denied", "use a --memory folder you may write"),
        errno.EPERM: ("permission denied", "use a --memory folder you may write"),
        errno.ENOTDIR: ("a part of its path is a file, not a folder", "choose another --memory path"),
        errno.EEXIST: ("something already exists at that path", "choose another --memory path"),
    }.get(err.errno, (err.strerror or type(err).__name__, "fix the folder and run it again"))
    return KVMapError(f"cannot {doing} memory {root}: {reason}; {fix}")


# ----------------------------------------------------------------------------------------------
# manifest.json


def read_json(file: Path, root: Path) -> Any:
    """Parse a JSON file of the memory; ``ValueError`` for anything that is not JSON."""
    real_entry(file, root, want_dir=False, fix=FIX_MANIFEST)
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, RecursionError) as err:
        raise ValueError(type(err).__name__) from None


def read_manifest(root: Path) -> dict:
    """Parse and check ``manifest.json`` field by field; one-line ``MemoryFormatError`` otherwise."""
    file = root / MANIFEST
    if not file.is_file() and not file.is_symlink():
        raise MemoryFormatError(f"not a kvmap memory: {root} (no manifest.json); create one with `kvmap remember`")
    try:
        manifest = read_json(file, root)
    except (OSError, ValueError) as err:
        raise MemoryFormatError(f"memory {root} has a damaged manifest.json ({type(err).__name__}); "
                                f"{FIX_MANIFEST}") from None
    damaged = f"memory {root} has a damaged manifest.json"
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise MemoryFormatError(f"{damaged} (no format_version); {FIX_MANIFEST}")
    version = manifest["format_version"]
    if not whole(version, FORMAT_VERSION, FORMAT_VERSION):
        raise MemoryFormatError(f"memory {root} has format version {show(version)}; this kvmap reads version "
                                f"{FORMAT_VERSION}: upgrade kvmap or start a new --memory folder")
    kind = manifest.get("store", {}).get("kind") if isinstance(manifest.get("store"), dict) else None
    if isinstance(kind, str) and kind not in STORE_KINDS:
        raise MemoryFormatError(f"memory {root} uses store kind {show(kind)}, unknown to this kvmap; upgrade kvmap")
    problem = manifest_problem(manifest)
    if problem:
        raise MemoryFormatError(f"{damaged} ({problem}); {FIX_MANIFEST}")
    return manifest


def manifest_problem(m: dict) -> str | None:
    """What is wrong with a parsed manifest, or None."""
    for key in ("model_id", "layout", "dtype", "store", "segments", "n_tokens"):
        if key not in m:
            return f"missing {key!r}"
    if not isinstance(m["model_id"], str) or not m["model_id"].isprintable() or not 0 < len(m["model_id"]) <= 1000:
        return f"model_id must be a printable string, not {show(m['model_id'])}"
    problem = layout_problem(m["layout"]) or store_problem(m["store"])
    if problem:
        return problem
    if not isinstance(m["dtype"], str) or m["dtype"] not in DTYPES:
        return f"dtype must be one of {DTYPES}, not {show(m['dtype'])}"
    if not isinstance(m["segments"], list):
        return f"segments must be a list, not {show(m['segments'])}"
    names = set()
    for rec in m["segments"]:
        problem = record_problem(rec)
        if problem:
            return problem
        if rec["name"] in names:
            return f"segment {rec['name']} is listed twice"
        names.add(rec["name"])
    total = sum(rec["n_tokens"] for rec in m["segments"])
    if not whole(m["n_tokens"], 0, MAX_TOKENS * max(1, len(names))) or m["n_tokens"] != total:
        return f"n_tokens {show(m['n_tokens'])} is not the segments' total {total}"
    return None


def layout_problem(layout: Any) -> str | None:
    if not isinstance(layout, dict) or set(layout) != {"n_layers", "n_kv_heads", "head_dim"}:
        return f"layout must hold n_layers, n_kv_heads and head_dim, not {show(layout)}"
    for key, hi in (("n_layers", MAX_LAYERS), ("n_kv_heads", MAX_HEADS), ("head_dim", MAX_HEAD_DIM)):
        if not whole(layout[key], 1, hi):
            return f"{key} must be a whole number in 1..{hi}, not {show(layout[key])}"
    return None


def store_problem(store: Any) -> str | None:
    if not isinstance(store, dict) or not isinstance(store.get("kind"), str):
        return f"store must be {{'kind': name, 'params': {{...}}}}, not {show(store)}"
    params = store.get("params")
    if not isinstance(params, dict):
        return f"store params must be a dict, not {show(params)}"
    for key, value in params.items():  # every store parameter is a count, a seed or None
        if value is not None and not whole(value, 0, MAX_PARAM):
            return f"store parameter {show(key)} must be a whole number in 0..{MAX_PARAM}, not {show(value)}"
    try:
        make_index(store["kind"], **params)
    except InputError:
        return f"bad parameters {show(params, 80)} for store {store['kind']!r}"
    return None


def record_problem(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return f"a segment record is {show(rec)}, not a dict"
    name = rec.get("name")
    if not isinstance(name, str) or not SEGMENT_NAME.fullmatch(name):
        return f"segment name {show(name)} is not 16 hex digits"
    if not isinstance(rec.get("source"), str):
        return f"segment {name} has source {show(rec.get('source'))}, not a string"
    if not isinstance(rec.get("meta_sha256"), str) or not SHA256.fullmatch(rec["meta_sha256"]):
        return f"segment {name} has no valid meta_sha256"
    if not whole(rec.get("n_tokens"), 1, MAX_TOKENS):
        return f"segment {name} has n_tokens {show(rec.get('n_tokens'))}, not a whole number in 1..{MAX_TOKENS}"
    if not whole(rec.get("n_docs"), 0, rec["n_tokens"]):
        return f"segment {name} has n_docs {show(rec.get('n_docs'))}, not in 0..{rec['n_tokens']}"
    return None


def check_expected(path: Path, manifest: dict, model_id: str | None, layout: KVLayout | None) -> None:
    """Refuse a memory made by another model or of another K/V layout."""
    if model_id is not None and manifest["model_id"] != model_id:
        made_by = manifest["model_id"]
        raise MemoryFormatError(f"memory {path} was made by model {made_by}, not {model_id}; "
                                f"use --model {made_by} or a new --memory folder")
    found = KVLayout(**manifest["layout"])
    if layout is not None and found != layout:
        raise MemoryFormatError(f"memory {path} holds K/V of layout {found.as_dict()}, not {layout.as_dict()}; "
                                "use the model that made it or a new --memory folder")


def create_folder(path: Path, manifest: dict) -> None:
    """Make the folder of a new, empty memory: ``segments/`` and the manifest.

    ``path`` must not exist or be an empty folder. On failure the folder is left as empty as it
    was, so that creating it can be retried.
    """
    try:
        if os.path.lexists(path) and (not path.is_dir() or path.is_symlink() or any(path.iterdir())):
            raise MemoryFormatError(f"{path} exists and is not an empty folder; choose a new --memory folder")
        (path / SEGMENTS).mkdir(parents=True, exist_ok=True)
        try:
            write_json_atomic(path / MANIFEST, manifest)
        except BaseException:
            with contextlib.suppress(OSError):
                (path / SEGMENTS).rmdir()
            raise
    except OSError as err:
        raise write_error(path, err, "create") from None


# ----------------------------------------------------------------------------------------------
# meta.json


def expected_files(layout: dict, kind: str) -> set[str]:
    """The exact file names a segment of this layout and store kind holds (meta.json's keys)."""
    names = {f"{kv}{layer:02d}.bin" for layer in range(layout["n_layers"]) for kv in "kv"}
    names |= {"tokens.npz", "texts.json"}
    for layer in range(layout["n_layers"]):
        names.update(STORE_KINDS[kind].file_names(layer, layout["n_kv_heads"]))
    return names


def read_meta(root: Path, folder: Path, rec: dict, manifest: dict) -> dict[str, tuple[int, str]]:
    """Check ``meta.json`` against its manifest record; the files it lists: name -> (size, sha256)."""
    damaged = f"segment {folder} has a damaged meta.json"
    real_entry(folder / "meta.json", root, want_dir=False)
    try:
        meta_bytes = (folder / "meta.json").read_bytes()
    except OSError as err:
        raise MemoryFormatError(f"cannot read {folder / 'meta.json'} ({err.strerror}); {FIX_SEGMENT}") from None
    if hashlib.sha256(meta_bytes).hexdigest() != rec["meta_sha256"]:
        raise MemoryFormatError(f"{damaged} (checksum mismatch); {FIX_SEGMENT}")
    try:
        meta = json.loads(meta_bytes.decode("utf-8"))
    except (ValueError, RecursionError):
        raise MemoryFormatError(f"{damaged}; {FIX_SEGMENT}") from None
    problem = meta_problem(meta, rec, manifest)
    if problem:
        raise MemoryFormatError(f"{damaged} ({problem}); {FIX_SEGMENT}")
    return {name: (info["size"], info["sha256"]) for name, info in meta["files"].items()}


def meta_problem(meta: Any, rec: dict, manifest: dict) -> str | None:
    """What is wrong with a parsed meta.json, or None."""
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        return "no files"
    for key in ("source", "n_tokens", "layout", "dtype"):
        want = rec[key] if key in rec else manifest[key]
        if meta.get(key) != want or type(meta.get(key)) is not type(want):
            return f"{key} {show(meta.get(key))} differs from the manifest's {show(want)}"
    if meta.get("store") != manifest["store"]:  # the index was built with these parameters
        return f"store {show(meta.get('store'))} differs from the manifest's"
    files, expected = meta["files"], expected_files(manifest["layout"], manifest["store"]["kind"])
    for name, info in files.items():
        if name not in expected:
            return f"unexpected file {show(name)}"
        if not isinstance(info, dict) or not whole(info.get("size"), 0, 1 << 50) \
                or not isinstance(info.get("sha256"), str) or not SHA256.fullmatch(info["sha256"]):
            return f"file {name} has no valid size and sha256"
    missing = sorted(expected - set(files))
    if missing:
        return f"it does not record {missing[0]}"
    return None
