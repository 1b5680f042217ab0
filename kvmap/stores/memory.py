"""A memory is a folder: a manifest plus one sub-folder per segment of remembered tokens.

::

    memory/
      manifest.json             format_version, model_id, layout, dtype, store, segments, n_tokens
      segments/<name>/
        k00.bin v00.bin ...     per layer, raw token-major (n, H, d) arrays in the memory's dtype
        tokens.npz              token_ids, doc_ids, offsets (n,) int64
        texts.json              each token's text
        <index files>           the store kind's per-layer index (none for "exact")
        meta.json               shapes, dtype, size and sha256 of every file above

Crash safety: a segment is written into ``segments/.tmp-<uuid>/``, renamed into place, and only
then does an atomically replaced manifest name it. A process killed at any point leaves the
previous manifest, which names only complete segments; stray folders are removed on the next
open. ``forget`` replaces the manifest before deleting folders, for the same reason.

Global memory ids number the tokens of all segments in manifest order (0..n_tokens-1); they
stay valid until the next add or forget.
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
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from kvmap.errors import InputError, KVMapError, MemoryFormatError
from kvmap.ports import KVLayout, MemoryEntry
from kvmap.stores.base import STORE_KINDS, KVIndex, canonical_kind, make_index

try:  # advisory lock between writers and cleanup (POSIX); without it cleanup is unguarded
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SEGMENTS = "segments"
TMP_PREFIX = ".tmp-"
LOCK = ".lock"
DTYPES = ("float16", "float32")


# ----------------------------------------------------------------------------------------------
# small file helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to open directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``path`` so that a reader sees either the old or the new file, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _lock(root: Path, blocking: bool) -> Iterator[bool]:
    """Hold the memory's exclusive lock; yields False when ``blocking`` is off and it is taken.

    The kernel drops the lock when its holder dies, even by SIGKILL.
    """
    if fcntl is None:
        yield True
        return
    try:
        f = open(root / LOCK, "a+b")
    except OSError as err:  # a read-only folder: nobody can be writing it
        if blocking:
            raise KVMapError(f"cannot write memory {root}: {err.strerror}") from None
        yield False
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as err:
        raise InputError(f"{name} is not an array: {err}") from None


# ----------------------------------------------------------------------------------------------
# one segment, read side


class _Segment:
    """A committed segment: lazily opened memory-maps, tokens, texts and indexes."""

    def __init__(self, folder: Path, record: dict, meta: dict, layout: KVLayout, dtype: str):
        self.folder = folder
        self.name: str = record["name"]
        self.source: str = record["source"]
        self.n_tokens: int = int(record["n_tokens"])
        self.n_docs: int = int(record["n_docs"])
        self.meta = meta
        self.layout = layout
        self.dtype = np.dtype(dtype)
        self._maps: dict[str, np.ndarray] = {}
        self._tokens: dict[str, np.ndarray] | None = None
        self._texts: list[str] | None = None
        self.indexes: dict[int, KVIndex] = {}

    def array(self, name: str) -> np.ndarray:
        """Read-only memory-map of ``k{l:02d}.bin`` / ``v{l:02d}.bin``: (n, H, d)."""
        if name not in self._maps:
            shape = (self.n_tokens, self.layout.n_kv_heads, self.layout.head_dim)
            try:
                self._maps[name] = np.memmap(self.folder / name, dtype=self.dtype, mode="r", shape=shape)
            except (OSError, ValueError) as err:
                raise MemoryFormatError(f"cannot read {self.folder / name}: {err}") from None
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

    def tokens(self) -> dict[str, np.ndarray]:
        if self._tokens is None:
            try:
                with np.load(self.folder / "tokens.npz", allow_pickle=False) as z:
                    self._tokens = {k: z[k].astype(np.int64) for k in ("token_ids", "doc_ids", "offsets")}
            except Exception as err:
                raise MemoryFormatError(f"cannot read {self.folder / 'tokens.npz'}: {err}") from None
            if any(len(v) != self.n_tokens for v in self._tokens.values()):
                raise MemoryFormatError(f"{self.folder / 'tokens.npz'} does not hold {self.n_tokens} tokens")
        return self._tokens

    def texts(self) -> list[str]:
        if self._texts is None:
            try:
                texts = json.loads((self.folder / "texts.json").read_text(encoding="utf-8"))
            except Exception as err:
                raise MemoryFormatError(f"cannot read {self.folder / 'texts.json'}: {err}") from None
            if not isinstance(texts, list) or len(texts) != self.n_tokens:
                raise MemoryFormatError(f"{self.folder / 'texts.json'} does not hold {self.n_tokens} texts")
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
        with contextlib.suppress(OSError, ValueError):
            both = np.load(file, allow_pickle=False)
            if both.shape == (2, L, n_blocks, H, d) and both.dtype == self.dtype:
                return both[0], both[1]
        both = np.empty((2, L, n_blocks, H, d), self.dtype)
        for layer in range(L):
            keys = np.fromfile(self.folder / f"k{layer:02d}.bin", dtype=self.dtype).reshape(self.n_tokens, H, d)
            both[0, layer], both[1, layer] = key_bounds(keys, block_size)
        tmp = file.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{file.name}")
        try:  # write-then-rename; a read-only memory just keeps them in RAM
            with open(tmp, "wb") as f:
                np.save(f, both)
            os.replace(tmp, file)
        except OSError:
            tmp.unlink(missing_ok=True)
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


# ----------------------------------------------------------------------------------------------
# the memory


class Memory:
    """A folder of remembered tokens' pre-RoPE keys and values, searchable by inner product.

    Use ``Memory.create``, ``Memory.open`` or ``Memory.open_or_create``; add tokens with
    ``writer``; search with ``search``; read vectors back with ``fetch``.
    """

    def __init__(self, path: Path, manifest: dict, segments: list[_Segment]):
        self.path = Path(path)
        self._manifest = manifest
        self._segments = segments
        self.model_id: str = manifest["model_id"]
        self.layout = KVLayout(**manifest["layout"])
        self.dtype: str = manifest["dtype"]
        self.store_kind: str = manifest["store"]["kind"]
        self.store_params: dict = dict(manifest["store"]["params"])
        self._exact: dict[tuple, KVIndex] = {}  # (layer, segments) -> RAM index (non-persistent kinds)
        self._offsets: np.ndarray | None = None
        self._block_means: dict[tuple[int, int], torch.Tensor] = {}
        self._bounds: dict[int, tuple] = {}  # block_size -> lo, hi (L, H, n_blocks, d), starts, lengths
        self._refresh_bases()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        model_id: str,
        layout: KVLayout,
        store: str = "exact",
        store_params: dict | None = None,
        dtype: str = "float16",
    ) -> "Memory":
        """Make an empty memory folder at ``path`` (which must not exist or be empty)."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise MemoryFormatError(f"{path} is already a kvmap memory; open it instead of creating it")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise MemoryFormatError(f"{path} exists and is not an empty folder; choose a new --memory folder")
        if dtype not in DTYPES:
            raise InputError(f"memory dtype must be one of {DTYPES}, not {dtype!r}")
        kind = canonical_kind(store)
        params = dict(store_params or {})
        make_index(kind, **params)  # reject bad parameters now, not at the first commit
        (path / SEGMENTS).mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model_id": model_id,
            "layout": layout.as_dict(),
            "dtype": dtype,
            "store": {"kind": kind, "params": params},
            "segments": [],
            "n_tokens": 0,
        }
        _write_json_atomic(path / MANIFEST, manifest)
        return cls(path, manifest, [])

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expect_model_id: str | None = None,
        expect_layout: KVLayout | None = None,
        verify: bool = True,
    ) -> "Memory":
        """Open an existing memory, checking it is whole and made by the expected model.

        Sizes of all files are always checked; ``verify=True`` also checks their sha256 (reads
        every byte once). Raises ``MemoryFormatError`` with a one-line message on any problem.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        if expect_model_id is not None and manifest["model_id"] != expect_model_id:
            made_by = manifest["model_id"]
            raise MemoryFormatError(
                f"memory {path} was made by model {made_by}, not {expect_model_id}; "
                f"use --model {made_by} or a new --memory folder"
            )
        layout = KVLayout(**manifest["layout"])
        if expect_layout is not None and layout != expect_layout:
            raise MemoryFormatError(
                f"memory {path} holds K/V of layout {layout.as_dict()}, not {expect_layout.as_dict()}; "
                "use the model that made it or a new --memory folder"
            )
        _cleanup(path, manifest)
        segments = [_open_segment(path, rec, layout, manifest["dtype"], verify) for rec in manifest["segments"]]
        return cls(path, manifest, segments)

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        model_id: str,
        layout: KVLayout,
        store: str | None = None,
        store_params: dict | None = None,
    ) -> "Memory":
        """Open the memory at ``path`` if there is one, else create it.

        ``store`` is the kind of a new memory (default ``"exact"``); given for an existing
        memory of another kind it is an error. ``store_params`` only apply to a new memory.
        """
        path = Path(path)
        if (path / MANIFEST).exists():
            mem = cls.open(path, expect_model_id=model_id, expect_layout=layout)
            if store is not None and canonical_kind(store) != mem.store_kind:
                raise MemoryFormatError(
                    f"memory {path} uses store {mem.store_kind}, not {store}; "
                    f"use --store {mem.store_kind} or a new --memory folder"
                )
            return mem
        return cls.create(path, model_id, layout, store=store or "exact", store_params=store_params)

    # -- what it holds -----------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        return int(self._manifest["n_tokens"])

    @property
    def n_segments(self) -> int:
        """Segments in the manifest (one per remembered file or ingest chunk)."""
        return len(self._segments)

    def sources(self) -> list[dict]:
        """One dict per source, in the order first remembered: source, n_tokens, n_docs."""
        out: dict[str, dict] = {}
        for seg in self._segments:
            row = out.setdefault(seg.source, {"source": seg.source, "n_tokens": 0, "n_docs": 0})
            row["n_tokens"] += seg.n_tokens
            row["n_docs"] += seg.n_docs
        return list(out.values())

    def __repr__(self) -> str:
        return (
            f"Memory({str(self.path)!r}, model={self.model_id!r}, store={self.store_kind!r}, "
            f"n_tokens={self.n_tokens}, segments={len(self._segments)})"
        )

    # -- adding and forgetting ---------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, source: str) -> Iterator["SegmentWriter"]:
        """Add one segment of tokens under ``source``: committed on clean exit, discarded on error.

        Only one writer (in any process) may be open on a memory at a time.
        """
        with _lock(self.path, blocking=False) as locked:
            if not locked:
                raise KVMapError(f"memory {self.path} is being written by another writer; wait for it to finish")
            w = SegmentWriter(self, source)
            try:
                yield w
            except BaseException:
                w.discard()
                raise
            record = w.commit()
            if record is not None:
                self._add_segment(record)

    def _sync(self) -> None:
        """Catch up with the manifest on disk (another ``Memory`` object may have changed it).

        Called under the lock before every change, so that a stale object never writes a
        manifest that drops segments it did not know about.
        """
        current = _read_manifest(self.path)
        if current["segments"] == self._manifest["segments"]:
            return
        known = {s.name: s for s in self._segments}
        self._segments = [
            known.get(r["name"]) or _open_segment(self.path, r, self.layout, self.dtype, verify=False)
            for r in current["segments"]
        ]
        self._manifest = current
        self._changed()

    def _add_segment(self, record: dict) -> None:
        self._sync()
        manifest = dict(self._manifest)
        manifest["segments"] = self._manifest["segments"] + [record]
        manifest["n_tokens"] = self.n_tokens + int(record["n_tokens"])
        try:
            _write_json_atomic(self.path / MANIFEST, manifest)
        except BaseException:  # the old manifest still rules: drop the folder it does not name
            shutil.rmtree(self.path / SEGMENTS / record["name"], ignore_errors=True)
            raise
        seg = _open_segment(self.path, record, self.layout, self.dtype, verify=False)
        self._manifest = manifest
        self._segments.append(seg)
        self._changed()

    def forget(self, source: str) -> int:
        """Remove every segment remembered under ``source``; return the number of tokens removed."""
        with _lock(self.path, blocking=False) as locked:
            if not locked:
                raise KVMapError(f"memory {self.path} is being written by another writer; wait for it to finish")
            self._sync()
            gone = [s for s in self._segments if s.source == source]
            if not gone:
                known = ", ".join(repr(s["source"]) for s in self.sources()) or "none"
                raise InputError(f"memory {self.path} holds no source {source!r}; known sources: {known}")
            keep = [s for s in self._segments if s.source != source]
            removed = sum(s.n_tokens for s in gone)
            manifest = dict(self._manifest)
            manifest["segments"] = [r for r in self._manifest["segments"] if r["source"] != source]
            manifest["n_tokens"] = self.n_tokens - removed
            # Manifest first: a crash between the two steps leaves only unreferenced folders.
            _write_json_atomic(self.path / MANIFEST, manifest)
            self._manifest = manifest
            self._segments = keep
            self._changed()
            for seg in gone:
                shutil.rmtree(seg.folder, ignore_errors=True)
        return removed

    def _changed(self) -> None:
        """Drop everything that depends on the set of segments (global ids, the exact cache)."""
        self._exact.clear()
        self._offsets = None
        self._block_means.clear()
        self._bounds.clear()
        self._refresh_bases()

    def _refresh_bases(self) -> None:
        # bases[i] = global id of segment i's first token; bases[-1] = n_tokens
        self._bases = np.cumsum([0] + [s.n_tokens for s in self._segments]).astype(np.int64)

    # -- search ------------------------------------------------------------------------------

    def search(self, layer: int, queries: torch.Tensor, k: int,
               segments: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k memories by inner product for every query.

        Parameters
        ----------
        layer : attention layer
        queries : (H, M, d) float32, H = ``layout.n_kv_heads``
        k : results per query
        segments : search only these segments (positions in the manifest); ``None``: all. A
            sharded store gives each shard its own segments (:mod:`kvmap.stores.sharded`).

        Returns
        -------
        scores : (H, M, k) float32, best first, ``-inf`` where fewer than k memories exist
        ids : (H, M, k) int64 global memory ids, ``-1`` as padding
        """
        self._check_layer(layer)
        H, d = self.layout.n_kv_heads, self.layout.head_dim
        if queries.dim() != 3 or queries.shape[0] != H or queries.shape[2] != d:
            raise InputError(f"queries must have shape ({H}, M, {d}), got {tuple(queries.shape)}")
        device = queries.device
        q = queries.detach().to("cpu", torch.float32).contiguous()
        m = q.shape[1]
        k = int(k)
        chosen = tuple(range(len(self._segments))) if segments is None else tuple(int(s) for s in segments)
        if any(not 0 <= s < len(self._segments) for s in chosen):
            raise InputError(f"segments must be in 0..{len(self._segments) - 1}, got {list(chosen)}")
        if k <= 0 or not chosen:
            k = max(k, 0)
            return (
                torch.full((H, m, k), float("-inf"), device=device),
                torch.full((H, m, k), -1, dtype=torch.int64, device=device),
            )
        if not STORE_KINDS[self.store_kind].persistent:
            scores, ids = self._exact_index(layer, chosen).search(q, k)
            return scores.to(device), self._chosen_to_global(ids, chosen).to(device)
        all_s, all_i = [], []
        for s in chosen:
            seg, base = self._segments[s], int(self._bases[s])
            scores, ids = seg.index(layer, self.store_kind, self.store_params).search(q, k)
            all_s.append(scores)
            all_i.append(torch.where(ids >= 0, ids + base, ids))  # local -> global ids
        scores = torch.cat(all_s, dim=-1)  # (H, M, k * n_segments)
        ids = torch.cat(all_i, dim=-1)
        if len(chosen) > 1:
            scores, pick = scores.topk(k, dim=-1)
            ids = ids.gather(-1, pick)
        return scores.to(device), ids.to(device)

    def search_streamed(self, layer: int, queries: torch.Tensor, k: int,
                        chunk: int = 1 << 15) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k like :meth:`search`, reading every key of ``layer`` once, a chunk at a time.

        Needs no index and only a chunk's keys in RAM, whatever the memory's size (plain reads, not
        the memory-map, so the keys do not stay resident). For a memory larger than RAM.
        """
        self._check_layer(layer)
        H, d = self.layout.n_kv_heads, self.layout.head_dim
        if queries.dim() != 3 or queries.shape[0] != H or queries.shape[2] != d:
            raise InputError(f"queries must have shape ({H}, M, {d}), got {tuple(queries.shape)}")
        q = queries.detach().to("cpu", torch.float32)
        k = max(0, min(int(k), self.n_tokens))
        best_s = torch.full((H, q.shape[1], k), float("-inf"))
        best_i = torch.full((H, q.shape[1], k), -1, dtype=torch.int64)
        row_bytes = H * d * np.dtype(self.dtype).itemsize
        for seg, base in zip(self._segments, self._bases.tolist()):
            with open(seg.folder / f"k{layer:02d}.bin", "rb") as f:
                for start in range(0, seg.n_tokens, chunk):
                    n = min(chunk, seg.n_tokens - start)
                    raw = np.frombuffer(f.read(n * row_bytes), dtype=seg.dtype).reshape(n, H, d)
                    scores = torch.einsum("hmd,nhd->hmn", q, torch.from_numpy(raw.astype(np.float32)))
                    top_s, top_i = scores.topk(min(k, n), dim=-1)
                    best_s, pick = torch.cat([best_s, top_s], dim=-1).topk(k, dim=-1)
                    best_i = torch.cat([best_i, top_i + (base + start)], dim=-1).gather(-1, pick)
        return best_s.to(queries.device), best_i.to(queries.device)

    def _exact_index(self, layer: int, chosen: tuple[int, ...]) -> KVIndex:
        """The RAM index over the chosen segments' keys of ``layer``, built on first use."""
        if (layer, chosen) not in self._exact:
            index = make_index(self.store_kind, **self.store_params)
            index.build([self._segments[s].keys(layer) for s in chosen])
            self._exact[(layer, chosen)] = index
        return self._exact[(layer, chosen)]

    def _chosen_to_global(self, ids: torch.Tensor, chosen: tuple[int, ...]) -> torch.Tensor:
        """Ids into the concatenation of the chosen segments -> global memory ids (-1 stays)."""
        if chosen == tuple(range(len(self._segments))):
            return ids  # all segments in order: the concatenation is the global numbering
        sizes = np.array([self._segments[s].n_tokens for s in chosen], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # where each chosen segment starts locally
        local = ids.numpy()
        pos = np.clip(np.searchsorted(starts, local, side="right") - 1, 0, len(chosen) - 1)
        shift = self._bases[np.asarray(chosen)][pos] - starts[pos]
        return torch.from_numpy(np.where(local >= 0, local + shift, -1))

    # -- reading memories back ---------------------------------------------------------------

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment index of each id (n_segments for -1) and whether the id is valid."""
        valid = ids >= 0
        if np.any(ids >= self.n_tokens) or np.any(ids < -1):
            raise InputError(f"memory ids must be -1 or in 0..{self.n_tokens - 1}")
        seg = np.searchsorted(self._bases, ids, side="right") - 1
        return np.where(valid, seg, len(self._segments)), valid

    def fetch(self, layer: int, ids: torch.Tensor, release: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of memory ids.

        Parameters
        ----------
        layer : attention layer
        ids : (H, ...) int64 global ids, head first; ``-1`` gives zero vectors
        release : afterwards unmap the file pages the gather touched (:meth:`_Segment.release`). For
            one large gather from a memory bigger than RAM (retrieval reuse's candidates): ids spread
            over the whole file would otherwise keep many pages, read ahead around each, resident.

        Returns
        -------
        keys, values : float32 of shape ids.shape + (d,); the vectors of head h for ids[h, ...]
        """
        self._check_layer(layer)
        H, d = self.layout.n_kv_heads, self.layout.head_dim
        if ids.dim() < 1 or ids.shape[0] != H:
            raise InputError(f"ids must have the {H} KV heads as first dimension, got {tuple(ids.shape)}")
        flat = _as_numpy(ids, "ids").astype(np.int64).reshape(H, -1)  # (H, P)
        heads = np.broadcast_to(np.arange(H)[:, None], flat.shape)
        seg_of, valid = self._locate(flat)
        keys = np.zeros(flat.shape + (d,), dtype=np.float32)
        values = np.zeros(flat.shape + (d,), dtype=np.float32)
        for s in np.unique(seg_of[valid]):
            seg = self._segments[s]
            mask = seg_of == s
            rows = flat[mask] - self._bases[s]
            keys[mask] = seg.keys(layer)[rows, heads[mask]]  # (n_sel, d) gathered from the memmap
            values[mask] = seg.values(layer)[rows, heads[mask]]
            if release:
                seg.release(layer)
        shape = tuple(ids.shape) + (d,)
        return (
            torch.from_numpy(keys).reshape(shape).to(ids.device),
            torch.from_numpy(values).reshape(shape).to(ids.device),
        )

    def token_texts(self) -> list[str]:
        """The text of every memory token, in id (reading) order."""
        return [t for seg in self._segments for t in seg.texts()]

    def block_means(self, layer: int, block_size: int) -> torch.Tensor:
        """Mean key of each block of ``block_size`` consecutive memory ids (the last may be shorter).

        Returns (H, n_blocks, d) float32, cached until the memory changes. These are the
        representative keys block retrieval scores (InfLLM-style).
        """
        key = (layer, block_size)
        if key not in self._block_means:
            self._check_layer(layer)
            keys = np.concatenate([seg.keys(layer) for seg in self._segments]).astype(np.float32)  # (N, H, d)
            n, h, d = keys.shape
            n_blocks = -(-n // block_size)
            padded = np.zeros((n_blocks * block_size, h, d), np.float32)
            padded[:n] = keys
            counts = np.minimum(block_size, n - np.arange(n_blocks) * block_size).astype(np.float32)
            sums = padded.reshape(n_blocks, block_size, h, d).sum(1)  # (n_blocks, H, d)
            means = sums / counts[:, None, None]
            self._block_means[key] = torch.from_numpy(means).permute(1, 0, 2).contiguous()  # (H, n_blocks, d)
        return self._block_means[key]

    def block_bounds(self, layer: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """Key bounds of every block of ``block_size`` tokens, for picking reuse candidates by block (:mod:`kvmap.stores.candidates`).

        Blocks never straddle segments (a segment's last block may be shorter). Returns lo, hi:
        (H, n_blocks, d) float32; starts, lengths: (n_blocks,) int64 first global id and size of
        each block. All layers' bounds are loaded on first use and kept (2 / block_size of the keys).
        """
        self._check_layer(layer)
        if block_size <= 0:
            raise InputError(f"block size must be positive, got {block_size}")
        if block_size not in self._bounds:
            parts = [seg.key_bounds(block_size) for seg in self._segments]
            lo = np.concatenate([p[0] for p in parts], axis=1) if parts else np.zeros((self.layout.n_layers, 0, 1, 1))
            hi = np.concatenate([p[1] for p in parts], axis=1) if parts else lo
            starts, lengths = [], []
            for seg, base in zip(self._segments, self._bases):
                first = np.arange(0, seg.n_tokens, block_size)
                starts.append(base + first)
                lengths.append(np.minimum(block_size, seg.n_tokens - first))
            self._bounds[block_size] = (
                torch.from_numpy(lo).permute(0, 2, 1, 3), torch.from_numpy(hi).permute(0, 2, 1, 3),  # (L, H, B, d)
                np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64),
                np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64),
            )
        lo, hi, starts, lengths = self._bounds[block_size]
        return lo[layer].float(), hi[layer].float(), starts, lengths

    def offsets(self, ids: torch.Tensor) -> torch.Tensor:
        """Token offset (int64) of each memory id, same shape; ``-1`` for id ``-1``."""
        if self._offsets is None:
            parts = [seg.tokens()["offsets"] for seg in self._segments]
            self._offsets = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        flat = _as_numpy(ids, "ids").astype(np.int64)
        self._locate(flat)  # range check
        out = np.where(flat >= 0, self._offsets[np.clip(flat, 0, None)] if self.n_tokens else -1, -1)
        return torch.from_numpy(np.asarray(out, dtype=np.int64)).reshape(ids.shape)

    def entry(self, id: int, score: float = 0.0) -> MemoryEntry:
        """Provenance of memory ``id``: source, document, offset and text."""
        id = int(id)
        if not 0 <= id < self.n_tokens:
            raise InputError(f"memory id {id} is out of range 0..{self.n_tokens - 1}")
        s = int(np.searchsorted(self._bases, id, side="right") - 1)
        seg, local = self._segments[s], id - int(self._bases[s])
        tokens = seg.tokens()
        return MemoryEntry(
            source=seg.source,
            doc_id=int(tokens["doc_ids"][local]),
            offset=int(tokens["offsets"][local]),
            text=seg.texts()[local],
            score=float(score),
        )

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.layout.n_layers:
            raise InputError(f"layer {layer} is out of range 0..{self.layout.n_layers - 1}")


# ----------------------------------------------------------------------------------------------
# writing a segment


class SegmentWriter:
    """Streams one segment to ``segments/.tmp-<uuid>/``; ``Memory.writer`` commits or discards it."""

    def __init__(self, memory: Memory, source: str):
        self.memory = memory
        self.source = str(source)
        self.layout = memory.layout
        self.dtype = np.dtype(memory.dtype)
        self.name = uuid.uuid4().hex[:16]
        self.folder = memory.path / SEGMENTS / f"{TMP_PREFIX}{self.name}"
        self.folder.mkdir(parents=True)
        self.n_tokens = 0
        self._files = {}
        self._hashes = {}
        self._sizes: dict[str, int] = {}
        for layer in range(self.layout.n_layers):
            for kv in "kv":
                name = f"{kv}{layer:02d}.bin"
                self._files[name] = open(self.folder / name, "wb")
                self._hashes[name] = hashlib.sha256()
                self._sizes[name] = 0
        self._token_ids: list[np.ndarray] = []
        self._doc_ids: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        self._texts: list[str] = []

    def append(self, keys, values, token_ids, doc_ids, offsets, texts: Sequence[str]) -> None:
        """Append n tokens.

        Parameters
        ----------
        keys, values : (n_layers, n_kv_heads, n, head_dim) float32/float16, numpy or torch
        token_ids, doc_ids, offsets : (n,) ints
        texts : n strings, each token's text
        """
        L, H, d = self.layout.n_layers, self.layout.n_kv_heads, self.layout.head_dim
        k = _as_numpy(keys, "keys")
        v = _as_numpy(values, "values")
        if k.ndim != 4 or k.shape[:2] != (L, H) or k.shape[3] != d or v.shape != k.shape:
            raise InputError(
                f"keys and values must both have shape ({L}, {H}, n, {d}), got {k.shape} and {v.shape}"
            )
        n = k.shape[2]
        cols = [_as_numpy(x, name).reshape(-1) for x, name in
                ((token_ids, "token_ids"), (doc_ids, "doc_ids"), (offsets, "offsets"))]
        if any(len(c) != n for c in cols) or len(texts) != n:
            raise InputError(f"token_ids, doc_ids, offsets and texts must each have {n} entries")
        if n == 0:
            return
        # Convert and check the whole chunk before writing any of it, so that a rejected chunk
        # leaves the files consistent.
        blocks = {}
        for layer in range(L):
            for kv, arr in (("k", k), ("v", v)):
                # (H, n, d) -> token-major (n, H, d), so a token's heads sit together on disk.
                with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
                    block = np.ascontiguousarray(arr[layer].transpose(1, 0, 2), dtype=self.dtype)
                if not np.isfinite(block).all():
                    raise InputError(
                        f"{kv} vectors of layer {layer} are not finite in {self.dtype.name}"
                        " (NaN, or too large: create the memory with dtype float32)"
                    )
                blocks[f"{kv}{layer:02d}.bin"] = block
        for name, block in blocks.items():
            self._files[name].write(memoryview(block).cast("B"))
            self._hashes[name].update(memoryview(block).cast("B"))
            self._sizes[name] += block.nbytes
        self._token_ids.append(cols[0].astype(np.int64))
        self._doc_ids.append(cols[1].astype(np.int64))
        self._offsets.append(cols[2].astype(np.int64))
        self._texts.extend(str(t) for t in texts)
        self.n_tokens += n

    def _close(self) -> None:
        for f in self._files.values():
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def discard(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def commit(self) -> dict | None:
        """Finish the files, build the index, move the folder into place; the manifest record.

        Returns None (and leaves nothing behind) when no token was appended.
        """
        try:
            return self._commit()
        except BaseException:
            self.discard()
            raise

    def _commit(self) -> dict | None:
        self._close()
        if self.n_tokens == 0:
            self.discard()
            return None
        mem, folder = self.memory, self.folder
        files = {name: {"size": self._sizes[name], "sha256": h.hexdigest()} for name, h in self._hashes.items()}

        doc_ids = np.concatenate(self._doc_ids)
        buf = _npz_bytes(token_ids=np.concatenate(self._token_ids), doc_ids=doc_ids,
                         offsets=np.concatenate(self._offsets))
        _write_file(folder / "tokens.npz", buf)
        _write_file(folder / "texts.json", json.dumps(self._texts, ensure_ascii=False).encode("utf-8"))
        index_files = []
        if STORE_KINDS[mem.store_kind].persistent:
            shape = (self.n_tokens, self.layout.n_kv_heads, self.layout.head_dim)
            for layer in range(self.layout.n_layers):
                keys = np.memmap(folder / f"k{layer:02d}.bin", dtype=self.dtype, mode="r", shape=shape)
                index = make_index(mem.store_kind, **mem.store_params)
                index.build([keys])
                index_files += index.save(folder, layer)
                del index, keys
        for name in ["tokens.npz", "texts.json", *index_files]:
            files[name] = {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
            if name in index_files:  # faiss writes without fsync
                with open(folder / name, "rb+") as f:
                    os.fsync(f.fileno())
        meta = {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "n_tokens": self.n_tokens,
            "n_docs": int(len(np.unique(doc_ids))),
            "layout": self.layout.as_dict(),
            "dtype": self.dtype.name,
            "store": {"kind": mem.store_kind, "params": mem.store_params},
            "files": files,
        }
        meta_bytes = json.dumps(meta, indent=1).encode("utf-8")
        _write_file(folder / "meta.json", meta_bytes)
        _fsync_dir(folder)
        final = folder.parent / self.name
        os.rename(folder, final)
        self.folder = final
        _fsync_dir(final.parent)
        return {
            "name": self.name,
            "source": self.source,
            "n_tokens": self.n_tokens,
            "n_docs": meta["n_docs"],
            "meta_sha256": hashlib.sha256(meta_bytes).hexdigest(),
        }


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# opening


def _read_manifest(path: Path) -> dict:
    """Parse and sanity-check ``manifest.json``; one-line ``MemoryFormatError`` otherwise."""
    file = path / MANIFEST
    if not file.is_file():
        raise MemoryFormatError(f"not a kvmap memory: {path} (no manifest.json); create one with `kvmap remember`")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MemoryFormatError(f"memory {path} has a damaged manifest.json ({type(err).__name__}); "
                                "restore it or start a new --memory folder") from None
    damaged = f"memory {path} has a damaged manifest.json"
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise MemoryFormatError(f"{damaged} (no format_version)")
    if manifest["format_version"] != FORMAT_VERSION:
        raise MemoryFormatError(
            f"memory {path} has format version {manifest['format_version']!r}; "
            f"this kvmap reads version {FORMAT_VERSION}: upgrade kvmap or start a new --memory folder"
        )
    try:
        KVLayout(**manifest["layout"])
        assert isinstance(manifest["model_id"], str)
        assert manifest["dtype"] in DTYPES
        kind, params = manifest["store"]["kind"], manifest["store"]["params"]
        assert isinstance(params, dict)
        segs = manifest["segments"]
        for rec in segs:
            assert isinstance(rec["name"], str) and "/" not in rec["name"] and not rec["name"].startswith(".")
            assert isinstance(rec["source"], str) and isinstance(rec["meta_sha256"], str)
            assert int(rec["n_tokens"]) > 0 and int(rec["n_docs"]) >= 0
        assert int(manifest["n_tokens"]) == sum(int(r["n_tokens"]) for r in segs)
    except (KeyError, TypeError, ValueError, AssertionError) as err:
        what = f"missing {err}" if isinstance(err, KeyError) else "inconsistent fields"
        raise MemoryFormatError(f"{damaged} ({what}); restore it or start a new --memory folder") from None
    if kind not in STORE_KINDS:
        raise MemoryFormatError(f"memory {path} uses store kind {kind!r}, unknown to this kvmap; upgrade kvmap")
    return manifest


def _open_segment(path: Path, rec: dict, layout: KVLayout, dtype: str, verify: bool) -> _Segment:
    """Check a segment against its manifest record and meta.json; ``verify`` adds sha256 checks."""
    folder = path / SEGMENTS / rec["name"]
    meta_file = folder / "meta.json"
    fix = "restore the folder or `kvmap forget` its source"
    try:
        meta_bytes = meta_file.read_bytes()
    except OSError:
        raise MemoryFormatError(f"memory {path} is missing segment {rec['name']} ({rec['source']}); {fix}") from None
    if hashlib.sha256(meta_bytes).hexdigest() != rec["meta_sha256"]:
        raise MemoryFormatError(f"segment {folder} has a damaged meta.json (checksum mismatch); {fix}")
    try:
        meta = json.loads(meta_bytes)
        files = {str(name): (int(info["size"]), str(info["sha256"])) for name, info in meta["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MemoryFormatError(f"segment {folder} has a damaged meta.json; {fix}") from None
    itemsize = np.dtype(dtype).itemsize
    expected_bin = int(rec["n_tokens"]) * layout.n_kv_heads * layout.head_dim * itemsize
    for layer in range(layout.n_layers):
        for kv in "kv":
            name = f"{kv}{layer:02d}.bin"
            if files.get(name, (None,))[0] != expected_bin:
                raise MemoryFormatError(f"segment {folder} does not record {name} of {expected_bin} bytes; {fix}")
    for name, (want_size, want_sha) in files.items():
        if "/" in name or name.startswith("."):
            raise MemoryFormatError(f"segment {folder} has a damaged meta.json (file {name!r}); {fix}")
        file = folder / name
        try:
            size = file.stat().st_size
        except OSError:
            raise MemoryFormatError(f"segment {folder} is missing {name}; {fix}") from None
        if size != want_size:
            raise MemoryFormatError(f"segment {folder} has a truncated or altered {name} "
                                    f"({size} bytes, expected {want_size}); {fix}")
        if verify and _sha256(file) != want_sha:
            raise MemoryFormatError(f"segment {folder} has a corrupted {name} (checksum mismatch); {fix}")
    return _Segment(folder, rec, meta, layout, dtype)


def _cleanup(path: Path, manifest: dict) -> None:
    """Delete what a killed writer left: ``.tmp-*`` folders and segments the manifest does not name.

    Skipped while another writer holds the lock (its temporary folder is still in use).
    """
    seg_dir = path / SEGMENTS
    if not seg_dir.is_dir():
        return
    named = {rec["name"] for rec in manifest["segments"]}
    with _lock(path, blocking=False) as locked:
        if not locked:
            return
        for child in seg_dir.iterdir():
            if child.is_dir() and child.name not in named:
                shutil.rmtree(child, ignore_errors=True)
        for stray in (path / (MANIFEST + ".tmp"),):
            stray.unlink(missing_ok=True)
