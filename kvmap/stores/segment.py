"""One segment of a memory folder: reading a committed one (:class:`Segment`), writing a new one
(:class:`SegmentWriter`).

Crash safety: a segment is written into ``segments/.tmp-<uuid>/``, renamed into place, and only
then does an atomically replaced manifest name it (:meth:`kvmap.stores.Memory.writer`). A
process killed at any point leaves the previous manifest, which names only complete segments.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from kvmap.errors import InputError, KVMapError, MemoryFormatError
from kvmap.fileio import fsync_dir, write_bytes_atomic
from kvmap.ports import KVLayout
from kvmap.stores.base import STORE_KINDS, KVIndex, make_index
from kvmap.stores.folder import (
    FIX_SEGMENT, FORMAT_VERSION, SEGMENTS, TMP_PREFIX, file_digest, read_meta, read_npy, read_npz,
    real_entry, show, write_error,
)

MAX_TOKEN_ID = (1 << 31) - 1
"""Token ids past this are no vocabulary's (the largest are ~2**18): a damaged tokens.npz."""


def as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as err:
        raise InputError(f"{name} is not an array: {err}") from None


# ----------------------------------------------------------------------------------------------
# read side


class Segment:
    """A committed segment: lazily opened memory-maps, tokens, texts and indexes."""

    def __init__(self, folder: Path, record: dict, layout: KVLayout, dtype: str):
        self.folder = folder
        self.name: str = record["name"]
        self.source: str = record["source"]
        self.n_tokens: int = record["n_tokens"]
        self.n_docs: int = record["n_docs"]
        self.layout = layout
        self.dtype = np.dtype(dtype)
        self._maps: dict[str, np.ndarray] = {}
        self._tokens: dict[str, np.ndarray] | None = None
        self._texts: list[str] | None = None
        self.indexes: dict[int, KVIndex] = {}

    def _damaged(self, name: str, err: object) -> MemoryFormatError:
        msg = " ".join(str(err).split())[:200]
        return MemoryFormatError(f"cannot read {self.folder / name}: {msg}; {FIX_SEGMENT}")

    def array(self, name: str) -> np.ndarray:
        """Read-only memory-map of ``k{l:02d}.bin`` / ``v{l:02d}.bin``: (n, H, d)."""
        if name not in self._maps:
            shape = (self.n_tokens, self.layout.n_kv_heads, self.layout.head_dim)
            try:
                self._maps[name] = np.memmap(self.folder / name, dtype=self.dtype, mode="r", shape=shape)
            except (OSError, ValueError) as err:
                raise self._damaged(name, err) from None
        return self._maps[name]

    def keys(self, layer: int) -> np.ndarray:
        return self.array(f"k{layer:02d}.bin")

    def values(self, layer: int) -> np.ndarray:
        return self.array(f"v{layer:02d}.bin")

    def release(self, layer: int) -> None:
        """Unmap the pages of this layer's K/V that reads touched, so they stop counting as this
        process's resident memory (they stay in the OS page cache; the next read maps them again)."""
        for name in (f"k{layer:02d}.bin", f"v{layer:02d}.bin"):
            mapped = getattr(self._maps.get(name), "_mmap", None)  # np.memmap's mmap object
            if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
                mapped.madvise(mmap.MADV_DONTNEED)

    def key_chunks(self, layer: int, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, keys (n, H, d)) of ``layer`` a chunk at a time, by plain reads (not the memory-map,
        so a scan of a memory larger than RAM does not stay resident)."""
        H, d = self.layout.n_kv_heads, self.layout.head_dim
        row_bytes = H * d * self.dtype.itemsize
        name = f"k{layer:02d}.bin"
        try:
            with open(self.folder / name, "rb") as f:
                for start in range(0, self.n_tokens, chunk):
                    n = min(chunk, self.n_tokens - start)
                    raw = f.read(n * row_bytes)
                    if len(raw) != n * row_bytes:
                        raise ValueError("the file is shorter than the manifest says")
                    yield start, np.frombuffer(raw, dtype=self.dtype).reshape(n, H, d)
        except (OSError, ValueError) as err:
            raise self._damaged(name, err) from None

    def tokens(self) -> dict[str, np.ndarray]:
        """token_ids, doc_ids, offsets: (n,) int64 each, checked (ids of a vocabulary, offsets >= 0)."""
        if self._tokens is None:
            n = self.n_tokens
            try:
                raw = read_npz(self.folder / "tokens.npz", {k: ((n,), "iu") for k in ("token_ids", "doc_ids", "offsets")})
            except Exception as err:  # zipfile and numpy raise many kinds
                raise self._damaged("tokens.npz", err) from None
            for key, hi in (("token_ids", MAX_TOKEN_ID), ("doc_ids", 1 << 62), ("offsets", 1 << 62)):
                col = raw[key]
                if n and (col.min() < 0 or col.max() > hi):
                    raise self._damaged("tokens.npz", f"{key} outside 0..{hi}")
            self._tokens = {k: v.astype(np.int64) for k, v in raw.items()}
        return self._tokens

    def texts(self) -> list[str]:
        """Each token's text: a list of n strings."""
        if self._texts is None:
            try:
                texts = json.loads((self.folder / "texts.json").read_bytes().decode("utf-8"))
            except (OSError, ValueError, RecursionError) as err:
                raise self._damaged("texts.json", type(err).__name__) from None
            if not isinstance(texts, list) or len(texts) != self.n_tokens or not all(isinstance(t, str) for t in texts):
                raise self._damaged("texts.json", f"it does not hold {self.n_tokens} strings")
            self._texts = texts
        return self._texts

    def key_bounds(self, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel key min and max of each block of this segment: two (L, n_blocks, H, d) arrays.

        Derived data, cached beside the segment in ``bounds-b<size>.npy`` (not part of meta.json: a
        missing or damaged file is just computed again). Keys are read with plain reads, not the
        memory-map, so building the bounds of a large memory does not leave it resident.
        """
        from kvmap.stores.candidates import key_bounds

        L, H, d = self.layout.n_layers, self.layout.n_kv_heads, self.layout.head_dim
        n_blocks = -(-self.n_tokens // block_size)
        file = self.folder / f"bounds-b{block_size}.npy"
        with contextlib.suppress(Exception):  # damaged or foreign: computed again below
            both = read_npy(file, (2, L, n_blocks, H, d), "f")
            if both.dtype == self.dtype and np.isfinite(both).all():
                return both[0], both[1]
        both = np.empty((2, L, n_blocks, H, d), self.dtype)
        for layer in range(L):
            keys = np.concatenate([k for _, k in self.key_chunks(layer, max(1, self.n_tokens))])
            both[0, layer], both[1, layer] = key_bounds(keys, block_size)
        buf = io.BytesIO()
        np.save(buf, both)
        with contextlib.suppress(OSError):  # a read-only memory just keeps them in RAM
            write_bytes_atomic(file, buf.getvalue())  # replaces a symlink itself, never its target
        return both[0], both[1]

    def index(self, layer: int, kind: str, params: dict) -> KVIndex:
        """This segment's index for ``layer``, loaded on first use."""
        if layer not in self.indexes:
            index = make_index(kind, **params)
            try:
                index.load(self.folder, layer, self.keys(layer))
            except KVMapError:
                raise
            except Exception as err:  # faiss raises RuntimeError, numpy ValueError/OSError...
                msg = " ".join(str(err).split())[:300]
                raise MemoryFormatError(f"damaged index of layer {layer} in {self.folder}: {msg}") from None
            self.indexes[layer] = index
        return self.indexes[layer]

    def search(self, layer: int, kind: str, params: dict, queries: torch.Tensor, k: int):
        """Top-k of this segment's index: scores, local ids (H, M, k)."""
        index = self.index(layer, kind, params)
        try:
            return index.search(queries, k)
        except KVMapError:
            raise
        except Exception as err:  # a loaded but inconsistent index (faiss RuntimeError...)
            msg = " ".join(str(err).split())[:300]
            raise MemoryFormatError(f"damaged index of layer {layer} in {self.folder}: {msg}") from None


def open_segment(root: Path, rec: dict, manifest: dict, verify: bool) -> Segment:
    """Check a segment against its manifest record and meta.json; ``verify`` adds sha256 checks
    of every file, and checks that every stored K/V value is finite."""
    folder = root / SEGMENTS / rec["name"]
    if not os.path.lexists(folder):
        raise MemoryFormatError(f"memory {root} is missing segment {rec['name']} ({show(rec['source'])}); "
                                f"{FIX_SEGMENT}")
    real_entry(folder, root, want_dir=True)
    files = read_meta(root, folder, rec, manifest)
    layout, dtype = KVLayout(**manifest["layout"]), np.dtype(manifest["dtype"])
    expected_bin = rec["n_tokens"] * layout.n_kv_heads * layout.head_dim * dtype.itemsize
    for name, (want_size, want_sha) in sorted(files.items()):
        if name.endswith(".bin") and want_size != expected_bin:
            raise MemoryFormatError(f"segment {folder} does not record {name} of {expected_bin} bytes; {FIX_SEGMENT}")
        if not os.path.lexists(folder / name):
            raise MemoryFormatError(f"segment {folder} is missing {name}; {FIX_SEGMENT}")
        size = real_entry(folder / name, root, want_dir=False).st_size
        if size != want_size:
            raise MemoryFormatError(f"segment {folder} has a truncated or altered {name} "
                                    f"({size} bytes, expected {want_size}); {FIX_SEGMENT}")
        if verify:
            try:
                sha, finite = file_digest(folder / name, dtype if name.endswith(".bin") else None)
            except OSError as err:
                raise MemoryFormatError(f"cannot read {folder / name} ({err.strerror}); {FIX_SEGMENT}") from None
            if sha != want_sha:
                raise MemoryFormatError(f"segment {folder} has a corrupted {name} (checksum mismatch); {FIX_SEGMENT}")
            if not finite:
                raise MemoryFormatError(f"segment {folder} has NaN or infinite values in {name}; {FIX_SEGMENT}")
    return Segment(folder, rec, layout, manifest["dtype"])


# ----------------------------------------------------------------------------------------------
# write side


def write_all(f, data: memoryview) -> None:
    """Append ``data`` to an open file (one place, so tests can simulate a full disk)."""
    f.write(data)


class SegmentWriter:
    """Streams one segment to ``segments/.tmp-<uuid>/``; ``Memory.writer`` commits or discards it.

    OS errors (disk full, read-only disk) become one-line ``KVMapError`` s; the memory itself is
    left as it was.
    """

    def __init__(self, memory, source: str):
        self.memory = memory
        self.source = str(source)
        self.layout = memory.layout
        self.dtype = np.dtype(memory.dtype)
        self.name = uuid.uuid4().hex[:16]
        self.folder = memory.path / SEGMENTS / f"{TMP_PREFIX}{self.name}"
        self.n_tokens = 0
        self._files, self._hashes, self._sizes = {}, {}, {}
        self._token_ids: list[np.ndarray] = []
        self._doc_ids: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        self._texts: list[str] = []
        try:
            self.folder.mkdir(parents=True)
            for layer in range(self.layout.n_layers):
                for kv in "kv":
                    name = f"{kv}{layer:02d}.bin"
                    self._files[name] = open(self.folder / name, "xb")
                    self._hashes[name] = hashlib.sha256()
                    self._sizes[name] = 0
        except OSError as err:
            self.discard()
            raise write_error(memory.path, err, "write") from None

    def append(self, keys, values, token_ids, doc_ids, offsets, texts: Sequence[str]) -> None:
        """Append n tokens.

        Parameters
        ----------
        keys, values : (n_layers, n_kv_heads, n, head_dim) float32/float16, numpy or torch
        token_ids, doc_ids, offsets : (n,) ints
        texts : n strings, each token's text
        """
        L, H, d = self.layout.n_layers, self.layout.n_kv_heads, self.layout.head_dim
        k, v = as_numpy(keys, "keys"), as_numpy(values, "values")
        if k.ndim != 4 or k.shape[:2] != (L, H) or k.shape[3] != d or v.shape != k.shape:
            raise InputError(f"keys and values must both have shape ({L}, {H}, n, {d}), got {k.shape} and {v.shape}")
        n = k.shape[2]
        cols = [as_numpy(x, name).reshape(-1) for x, name in
                ((token_ids, "token_ids"), (doc_ids, "doc_ids"), (offsets, "offsets"))]
        if any(len(c) != n for c in cols) or len(texts) != n:
            raise InputError(f"token_ids, doc_ids, offsets and texts must each have {n} entries")
        if n == 0:
            return
        blocks = self._blocks(k, v)  # the whole chunk, checked before any of it is written
        try:
            for name, block in blocks.items():
                write_all(self._files[name], memoryview(block).cast("B"))
                self._hashes[name].update(memoryview(block).cast("B"))
                self._sizes[name] += block.nbytes
        except OSError as err:
            raise write_error(self.memory.path, err, "write") from None
        self._token_ids.append(cols[0].astype(np.int64))
        self._doc_ids.append(cols[1].astype(np.int64))
        self._offsets.append(cols[2].astype(np.int64))
        self._texts.extend(str(t) for t in texts)
        self.n_tokens += n

    def _blocks(self, k: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
        """Token-major blocks (n, H, d) in the memory's dtype, by file name; refuses non-finite ones."""
        blocks = {}
        for layer in range(self.layout.n_layers):
            for kv, arr in (("k", k), ("v", v)):
                # (H, n, d) -> token-major (n, H, d), so a token's heads sit together on disk.
                with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
                    block = np.ascontiguousarray(arr[layer].transpose(1, 0, 2), dtype=self.dtype)
                if not np.isfinite(block).all():
                    raise InputError(f"{kv} vectors of layer {layer} are not finite in {self.dtype.name}"
                                     " (NaN, or too large: create the memory with dtype float32)")
                blocks[f"{kv}{layer:02d}.bin"] = block
        return blocks

    def _close(self) -> None:
        for f in self._files.values():
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def discard(self) -> None:
        for f in self._files.values():
            with contextlib.suppress(OSError):
                f.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def commit(self) -> dict | None:
        """Finish the files, build the index, move the folder into place; the manifest record.

        Returns None (and leaves nothing behind) when no token was appended.
        """
        try:
            return self._commit()
        except OSError as err:
            self.discard()
            raise write_error(self.memory.path, err, "write") from None
        except BaseException:
            self.discard()
            raise

    def _commit(self) -> dict | None:
        self._close()
        if self.n_tokens == 0:
            self.discard()
            return None
        folder = self.folder
        files = {name: {"size": self._sizes[name], "sha256": h.hexdigest()} for name, h in self._hashes.items()}
        doc_ids = np.concatenate(self._doc_ids)
        buf = io.BytesIO()
        np.savez(buf, token_ids=np.concatenate(self._token_ids), doc_ids=doc_ids, offsets=np.concatenate(self._offsets))
        write_bytes_atomic(folder / "tokens.npz", buf.getvalue())
        write_bytes_atomic(folder / "texts.json", json.dumps(self._texts, ensure_ascii=False).encode("utf-8"))
        for name in ["tokens.npz", "texts.json", *self._build_indexes()]:
            files[name] = {"size": (folder / name).stat().st_size, "sha256": file_digest(folder / name)[0]}
        mem = self.memory
        meta = {
            "format_version": FORMAT_VERSION, "source": self.source, "n_tokens": self.n_tokens,
            "n_docs": int(len(np.unique(doc_ids))), "layout": self.layout.as_dict(), "dtype": self.dtype.name,
            "store": {"kind": mem.store_kind, "params": mem.store_params}, "files": files,
        }
        meta_bytes = json.dumps(meta, indent=1).encode("utf-8")
        write_bytes_atomic(folder / "meta.json", meta_bytes)
        final = folder.parent / self.name
        os.rename(folder, final)
        self.folder = final
        fsync_dir(final.parent)
        return {"name": self.name, "source": self.source, "n_tokens": self.n_tokens, "n_docs": meta["n_docs"],
                "meta_sha256": hashlib.sha256(meta_bytes).hexdigest()}

    def _build_indexes(self) -> list[str]:
        """Build and save every layer's index (persistent store kinds); the files written, fsynced."""
        mem, names = self.memory, []
        if not STORE_KINDS[mem.store_kind].persistent:
            return names
        shape = (self.n_tokens, self.layout.n_kv_heads, self.layout.head_dim)
        for layer in range(self.layout.n_layers):
            keys = np.memmap(self.folder / f"k{layer:02d}.bin", dtype=self.dtype, mode="r", shape=shape)
            index = make_index(mem.store_kind, **mem.store_params)
            index.build([keys])
            names += index.save(self.folder, layer)
            del index, keys
        for name in names:  # faiss writes without fsync
            with open(self.folder / name, "rb+") as f:
                os.fsync(f.fileno())
        return names
