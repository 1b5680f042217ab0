"""Writing one segment of a memory folder (:class:`SegmentWriter`).

Crash safety: a segment is written into ``segments/.tmp-<uuid>/``, renamed into place, and only
then does an atomically replaced manifest name it (:meth:`kvmap.stores.Memory.writer`). A
process killed at any point leaves the previous manifest, which names only complete segments.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import uuid
from typing import Sequence

import numpy as np

from kvmap.errors import InputError
from kvmap.fileio import fsync_dir, write_bytes_atomic
from kvmap.stores.base import STORE_KINDS, make_index
from kvmap.stores.folder import FORMAT_VERSION, SEGMENTS, TMP_PREFIX, file_digest, write_error
from kvmap.stores.segment import MAX_TOKEN_ID, as_numpy


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
        self._query_moments: tuple | None = None
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
        for col, name, hi in zip(cols, ("token_ids", "doc_ids", "offsets"), (MAX_TOKEN_ID, 1 << 62, 1 << 62)):
            if n and (col.dtype.kind not in "iu" or col.min() < 0 or col.max() > hi):  # what a reader refuses
                raise InputError(f"{name} must be integers in 0..{hi}")
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

    def set_query_moments(self, moment: np.ndarray, count: int, omega: np.ndarray) -> None:
        """The model's query statistics for this segment (:func:`kvmap.reader.sample_query_moments`): saved with
        it, and its query-aware cluster index built from them at commit (:mod:`kvmap.stores.clusters`)."""
        L, H, d = self.layout.n_layers, self.layout.n_kv_heads, self.layout.head_dim
        if moment.shape != (L, H, d, d) or omega.shape != (L, d) or not np.isfinite(moment).all():
            raise InputError(f"query moments must be finite, of shape ({L}, {H}, {d}, {d}) with angles ({L}, {d})")
        self._query_moments = (moment, int(count), omega)

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
        self._build_clusters()
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

    def _build_clusters(self) -> None:
        """Save the query moments and build the cluster index and its int8 key copy for the default import
        distance (derived data: other distances are built on first use)."""
        if self._query_moments is None:
            return
        from kvmap.config import ImportConfig
        from kvmap.stores import clusters, sketch

        clusters.save_moments(self.folder, *self._query_moments)
        L, H, d = self.layout.n_layers, self.layout.n_kv_heads, self.layout.head_dim

        def keys(layer: int) -> np.ndarray:
            return np.memmap(self.folder / f"k{layer:02d}.bin", dtype=self.dtype, mode="r", shape=(self.n_tokens, H, d))

        spec = (ImportConfig().distance, clusters.CLUSTER_SIZE)
        layers = clusters.build(self.folder, keys, *spec, self.n_tokens, L, H, d)
        if layers is None:  # the moments just written do not read back: searched without the index
            return
        clusters.save(self.folder, *spec, layers, self.n_tokens)
        sketch.build(self.folder, *spec, layers, keys, self.n_tokens, H, d)

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
