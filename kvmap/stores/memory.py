"""A memory is a folder: a manifest plus one sub-folder per segment of remembered tokens.

The folder's format and its strict validation live in :mod:`kvmap.stores.folder` (checked
``.npy``/``.npz`` reads in :mod:`kvmap.stores.npyfile`), the writers' lock and cleanup
in :mod:`kvmap.stores.lock`, one segment in :mod:`kvmap.stores.segment` (read) and
:mod:`kvmap.stores.writer` (write), passes over all keys in :mod:`kvmap.stores.scan`. This
module is the :class:`Memory` itself.

Crash safety: a segment is written into ``segments/.tmp-<uuid>/``, renamed into place, and only
then does an atomically replaced manifest name it. A process killed at any point leaves the
previous manifest, which names only complete segments; stray folders are removed on the next
open (under the lock, against the manifest read under it). ``forget`` and ``writer(replace=True)``
replace the manifest before deleting folders, for the same reason.

Global memory ids number the tokens of all segments in manifest order (0..n_tokens-1); they
stay valid until the next add or forget.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from kvmap.errors import InputError, MemoryFormatError
from kvmap.fileio import write_json_atomic
from kvmap.ports import KVLayout, MemoryEntry
from kvmap.stores import clusters, provenance, scan
from kvmap.stores.base import STORE_KINDS, KVIndex, canonical_kind, make_index
from kvmap.stores.folder import (  # noqa: F401  (re-exported: the format's names)
    DTYPES, FORMAT_VERSION, LOCK, MANIFEST, SEGMENTS, TMP_PREFIX, check_expected, check_folder, create_folder,
    read_manifest, write_error,
)
from kvmap.stores.lock import cleanup, write_lock
from kvmap.stores.segment import Segment, as_numpy, open_segment, open_segments
from kvmap.stores.writer import SegmentWriter


class Memory:
    """A folder of remembered tokens' pre-RoPE keys and values, searchable by inner product.

    Use ``Memory.create``, ``Memory.open`` or ``Memory.open_or_create``; add tokens with
    ``writer``; search with ``search``; read vectors back with ``fetch``.
    """

    def __init__(self, path: Path, manifest: dict, segments: list[Segment]):
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
    def create(cls, path: str | os.PathLike, model_id: str, layout: KVLayout, store: str = "exact",
               store_params: dict | None = None, dtype: str = "float16") -> "Memory":
        """Make an empty memory folder at ``path`` (which must not exist or be empty)."""
        path = Path(path)
        if os.path.lexists(path / MANIFEST):
            raise MemoryFormatError(f"{path} is already a kvmap memory; open it instead of creating it")
        if dtype not in DTYPES:
            raise InputError(f"memory dtype must be one of {DTYPES}, not {dtype!r}")
        kind = canonical_kind(store)
        params = dict(store_params or {})
        make_index(kind, **params)  # reject bad parameters now, not at the first commit
        manifest = {"format_version": FORMAT_VERSION, "model_id": model_id, "layout": layout.as_dict(),
                    "dtype": dtype, "store": {"kind": kind, "params": params}, "segments": [], "n_tokens": 0}
        create_folder(path, manifest)
        return cls(path, manifest, [])

    @classmethod
    def open(cls, path: str | os.PathLike, expect_model_id: str | None = None,
             expect_layout: KVLayout | None = None, verify: bool = True) -> "Memory":
        """Open an existing memory, checking it is whole and made by the expected model.

        Sizes of all files are always checked; ``verify=True`` also checks their sha256 and that
        every stored K/V value is finite (reads every byte once). Raises ``MemoryFormatError``
        with a one-line message on any problem.
        """
        path = Path(path)
        manifest = read_manifest(path)
        check_expected(path, manifest, expect_model_id, expect_layout)
        check_folder(path)
        cleanup(path)
        manifest, segments = open_segments(path, manifest, verify, lambda m: check_expected(
            path, m, expect_model_id, expect_layout))
        return cls(path, manifest, segments)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, model_id: str, layout: KVLayout, store: str | None = None,
                       store_params: dict | None = None) -> "Memory":
        """Open the memory at ``path`` if there is one, else create it.

        ``store`` is the kind of a new memory (default ``"exact"``); given for an existing
        memory of another kind it is an error. ``store_params`` only apply to a new memory.
        """
        path = Path(path)
        if os.path.lexists(path / MANIFEST):
            mem = cls.open(path, expect_model_id=model_id, expect_layout=layout)
            if store is not None and canonical_kind(store) != mem.store_kind:
                raise MemoryFormatError(f"memory {path} uses store {mem.store_kind}, not {store}; "
                                        f"use --store {mem.store_kind} or a new --memory folder")
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

    def segment_sizes(self) -> list[int]:
        """Tokens of each segment, in manifest (global id) order."""
        return [seg.n_tokens for seg in self._segments]

    def segment_kv(self, position: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Read-only memory-maps of one segment's keys and values of ``layer``: (n, H, d) each, in
        the stored dtype (for benchmarks that study the stored vectors themselves)."""
        self._check_layer(layer)
        if not 0 <= position < len(self._segments):
            raise InputError(f"segment {position} is out of range 0..{len(self._segments) - 1}")
        seg = self._segments[position]
        return seg.keys(layer), seg.values(layer)

    def sources(self) -> list[dict]:
        """One dict per source, in the order first remembered: source, n_tokens, n_docs."""
        return provenance.sources(self._segments)

    def __repr__(self) -> str:
        return (f"Memory({str(self.path)!r}, model={self.model_id!r}, store={self.store_kind!r}, "
                f"n_tokens={self.n_tokens}, segments={len(self._segments)})")

    # -- adding and forgetting ---------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, source: str, replace: bool = False) -> Iterator[SegmentWriter]:
        """Add one segment of tokens under ``source``: committed on clean exit, discarded on error.

        With ``replace=True`` the new segment replaces every earlier segment of ``source``: it
        is written first, then one atomic manifest replace drops the old segments and adds the
        new one, and only then are the old folders deleted. A writer killed or failing at any
        point leaves the old segments in place. A writer that appends nothing commits nothing
        (with or without ``replace``: the old segments stay).
        """
        with write_lock(self.path):
            w = SegmentWriter(self, source)
            try:
                yield w
            except BaseException:
                w.discard()
                raise
            record = w.commit()
            if record is not None:
                self._add_segment(record, drop_source=w.source if replace else None)

    def refresh(self) -> None:
        """See what another process (``kvmap remember``, ``forget``) changed in the folder since it was opened."""
        self._sync()

    def _sync(self) -> None:
        """Catch up with the manifest on disk (another ``Memory`` object may have changed it).

        Called under the lock before every change, so that a stale object never writes a
        manifest that drops segments it did not know about.
        """
        current = read_manifest(self.path)
        if current["segments"] == self._manifest["segments"]:
            return
        known = {s.name: s for s in self._segments}
        self._segments = [known.get(r["name"]) or open_segment(self.path, r, current, verify=False)
                          for r in current["segments"]]
        self._manifest = current
        self._changed()

    def _replace_manifest(self, records: list[dict], doing: str) -> None:
        """Atomically write a manifest naming ``records``; adopt it once it is on disk."""
        manifest = {**self._manifest, "segments": records, "n_tokens": sum(r["n_tokens"] for r in records)}
        try:
            write_json_atomic(self.path / MANIFEST, manifest)
        except OSError as err:
            raise write_error(self.path, err, doing) from None
        self._manifest = manifest

    def _add_segment(self, record: dict, drop_source: str | None = None) -> None:
        """Name a committed segment folder in the manifest (dropping ``drop_source``'s segments)."""
        new_folder = self.path / SEGMENTS / record["name"]
        try:
            self._sync()
            seg = open_segment(self.path, record, self._manifest, verify=False)
            gone = [s for s in self._segments if s.source == drop_source]
            keep = [r for r in self._manifest["segments"] if r["source"] != drop_source]
            self._replace_manifest(keep + [record], "write")
        except BaseException:  # the old manifest still rules: drop the folder it does not name
            shutil.rmtree(new_folder, ignore_errors=True)
            raise
        self._segments = [s for s in self._segments if s.source != drop_source] + [seg]
        self._changed()
        for old in gone:  # no longer named: a crash here leaves only stray folders
            shutil.rmtree(old.folder, ignore_errors=True)

    def forget(self, source: str) -> int:
        """Remove every segment remembered under ``source``; return the number of tokens removed."""
        with write_lock(self.path):
            self._sync()
            gone = [s for s in self._segments if s.source == source]
            if not gone:
                known = ", ".join(repr(s["source"]) for s in self.sources()) or "none"
                raise InputError(f"memory {self.path} holds no source {source!r}; known sources: {known}")
            # Manifest first: a crash between the two steps leaves only unreferenced folders.
            self._replace_manifest([r for r in self._manifest["segments"] if r["source"] != source], "forget in")
            self._segments = [s for s in self._segments if s.source != source]
            self._changed()
            for seg in gone:
                shutil.rmtree(seg.folder, ignore_errors=True)
        return sum(s.n_tokens for s in gone)

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

    def _queries(self, layer: int, queries: torch.Tensor) -> torch.Tensor:
        """Checked queries (H, M, d) as contiguous float32 on the CPU."""
        self._check_layer(layer)
        H, d = self.layout.n_kv_heads, self.layout.head_dim
        if queries.dim() != 3 or queries.shape[0] != H or queries.shape[2] != d:
            raise InputError(f"queries must have shape ({H}, M, {d}), got {tuple(queries.shape)}")
        return queries.detach().to("cpu", torch.float32).contiguous()

    def _chosen(self, segments: Sequence[int] | None) -> tuple[int, ...]:
        """Segment positions to search: all, or the given ones (checked)."""
        if segments is None:
            return tuple(range(len(self._segments)))
        chosen = tuple(int(s) for s in segments)
        if any(not 0 <= s < len(self._segments) for s in chosen):
            raise InputError(f"segments must be in 0..{len(self._segments) - 1}, got {list(chosen)}")
        return chosen

    def search(self, layer: int, queries: torch.Tensor, k: int,
               segments: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k memories by inner product for every query of ``layer``: queries (H, M, d) float32,
        H = ``layout.n_kv_heads`` -> scores (H, M, k) float32, best first, ``-inf`` where fewer than k
        memories exist, and ids (H, M, k) int64 global memory ids, ``-1`` as padding. ``segments``:
        search only these (positions in the manifest; ``None``: all), as a sharded store gives each
        shard its own (:mod:`kvmap.stores.sharded`)."""
        q, device = self._queries(layer, queries), queries.device
        H, m, k = q.shape[0], q.shape[1], max(int(k), 0)
        chosen = self._chosen(segments)
        if k == 0 or not chosen:
            return (torch.full((H, m, k), float("-inf"), device=device),
                    torch.full((H, m, k), -1, dtype=torch.int64, device=device))
        if not STORE_KINDS[self.store_kind].persistent:
            scores, ids = self._exact_index(layer, chosen).search(q, k)
            if chosen != tuple(range(len(self._segments))):  # the concatenation is not the global numbering
                ids = scan.chosen_to_global(ids, [self._segments[s].n_tokens for s in chosen], self._bases[list(chosen)])
            return scores.to(device), ids.to(device)
        segs = [self._segments[s] for s in chosen]
        scores, ids = scan.search_indexes(segs, self._bases[list(chosen)], layer, self.store_kind, self.store_params, q, k)
        return scores.to(device), ids.to(device)

    def search_streamed(self, layer: int, queries: torch.Tensor, k: int, chunk: int = 1 << 15,
                        segments: Sequence[int] | None = None,
                        probe: clusters.Probe | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k like :meth:`search`, reading every key of ``layer`` once, a chunk at a time.

        Needs no index and only a chunk's keys in RAM, whatever the memory's size (plain reads, not
        the memory-map, so the keys do not stay resident). For a memory larger than RAM.
        ``segments`` as in :meth:`search` (a sharded memory streams each shard's own). ``probe``: in the
        segments that have query moments, read only the keys of each query's ``probe.clusters`` best
        clusters (:mod:`kvmap.stores.clusters`; scored from their int8 key copy, an approximate top-k); the
        others, and every segment of at most ``probe.clusters * probe.cluster_size`` tokens (a new small
        document), are streamed.
        Returns (H, M, k') scores and global ids, k' = min(k, tokens in the searched segments).
        """
        q, device = self._queries(layer, queries), queries.device
        chosen = self._chosen(segments)
        if chunk < 1:
            raise InputError(f"chunk must be at least 1, got {chunk}")
        k = max(0, min(int(k), sum(self._segments[s].n_tokens for s in chosen)))
        # a segment no larger than one query's probe budget is cheaper to scan exactly than to probe
        budget = probe.clusters * probe.cluster_size if probe is not None and k else None
        large = [s for s in chosen if budget is not None and self._segments[s].n_tokens > budget]
        indexed = [(s, found[layer]) for s in large if (found := self._segments[s].clusters(probe)) is not None]
        probed = {s for s, _ in indexed}
        streamed = [s for s in chosen if s not in probed]
        scores, ids = scan.stream_topk([self._segments[s] for s in streamed], [int(self._bases[s]) for s in streamed],
                                       layer, q, k, chunk)
        if indexed:
            centroids = torch.from_numpy(np.concatenate([lc.centroids for _, lc in indexed], axis=1))  # (H, C, d)
            found_s, found_i = clusters.probe_search(
                q, centroids, [(int(self._bases[s]), lc) for s, lc in indexed],
                lambda i: self._segments[indexed[i][0]].keys(layer, scattered=True), probe.clusters, k)
            for s, _ in indexed:  # a large memory's key copies would otherwise stay resident, question after question
                self._segments[s].release_sketch(layer)
            scores, pick = torch.cat([scores, found_s], dim=-1).topk(k, dim=-1)
            ids = torch.cat([ids, found_i], dim=-1).gather(-1, pick)
        return scores.to(device), ids.to(device)

    def _exact_index(self, layer: int, chosen: tuple[int, ...]) -> KVIndex:
        """The RAM index over the chosen segments' keys of ``layer``, built on first use."""
        if (layer, chosen) not in self._exact:
            index = make_index(self.store_kind, **self.store_params)
            index.build([self._segments[s].keys(layer) for s in chosen])
            self._exact[(layer, chosen)] = index
        return self._exact[(layer, chosen)]

    # -- reading memories back ---------------------------------------------------------------

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment index of each id (n_segments for -1) and whether the id is valid."""
        valid = ids >= 0
        if np.any(ids >= self.n_tokens) or np.any(ids < -1):
            held = f"in 0..{self.n_tokens - 1}" if self.n_tokens else "-1: the memory is empty"
            raise InputError(f"memory ids must be -1 or {held}")
        seg = np.searchsorted(self._bases, ids, side="right") - 1
        return np.where(valid, seg, len(self._segments)), valid

    def fetch(self, layer: int, ids: torch.Tensor, release: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of memory ids.

        Parameters
        ----------
        layer : attention layer
        ids : (H, ...) int64 global ids, head first; ``-1`` gives zero vectors
        release : afterwards unmap the file pages the gather touched (:meth:`Segment.release`). For
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
        flat = as_numpy(ids, "ids").astype(np.int64).reshape(H, -1)  # (H, P)
        seg_of, _ = self._locate(flat)
        keys, values = scan.gather(self._segments, self._bases, layer, flat, seg_of, d, release)  # (H, P, d)
        shape = tuple(ids.shape) + (d,)
        return (torch.from_numpy(keys).reshape(shape).to(ids.device),
                torch.from_numpy(values).reshape(shape).to(ids.device))

    def token_texts(self) -> list[str]:
        """The text of every memory token, in id (reading) order."""
        return provenance.token_texts(self._segments)

    def token_ids(self) -> np.ndarray:
        """(n_tokens,) int64: the vocabulary id of every memory token, in id order (what re-reading a block
        feeds the model: the tokens themselves, not their stored K/V)."""
        return provenance.token_ids(self._segments)

    def query_index(self, probe: clusters.Probe, moments=None) -> int:
        """Build (or load) every segment's query-aware cluster index for ``probe`` now, not at the first search;
        the number of segments that have one.

        ``moments(token_ids) -> (moment, count, omega) | None`` samples the model's queries
        (:func:`kvmap.reader.sample_query_moments`) for segments remembered without them,
        from their own stored tokens."""
        indexed = 0
        shape = (self.layout.n_layers, self.layout.n_kv_heads, self.layout.head_dim)
        for seg in self._segments:
            if moments is not None and clusters.load_moments(seg.folder, *shape) is None:
                sampled = moments(seg.tokens()["token_ids"].tolist())
                if sampled is not None:
                    try:
                        clusters.save_moments(seg.folder, *sampled)
                    except OSError as err:
                        raise write_error(self.path, err, "index") from None
            indexed += seg.clusters(probe) is not None
        return indexed

    def block_means(self, layer: int, block_size: int) -> torch.Tensor:
        """Mean key of each block of ``block_size`` consecutive memory ids (the last may be shorter).

        Returns (H, n_blocks, d) float32 ((H, 0, d) for an empty memory), cached until the memory
        changes. These are the representative keys block retrieval scores (InfLLM-style).
        """
        self._check_block(layer, block_size)
        key = (layer, block_size)
        if key not in self._block_means:
            self._block_means[key] = scan.block_means(self._segments, self.layout, layer, block_size)
        return self._block_means[key]

    def block_bounds(self, layer: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """Key bounds of every block of ``block_size`` tokens, for picking reuse candidates by block
        (:mod:`kvmap.stores.candidates`).

        Blocks never straddle segments (a segment's last block may be shorter). Returns lo, hi:
        (H, n_blocks, d) float32; starts, lengths: (n_blocks,) int64 first global id and size of
        each block (n_blocks = 0 for an empty memory). All layers' bounds are loaded on first use
        and kept (2 / block_size of the keys).
        """
        self._check_block(layer, block_size)
        if block_size not in self._bounds:
            self._bounds[block_size] = scan.block_bounds(self._segments, self._bases, self.layout, self.dtype,
                                                         block_size)
        lo, hi, starts, lengths = self._bounds[block_size]
        return lo[layer].float(), hi[layer].float(), starts, lengths

    def offsets(self, ids: torch.Tensor) -> torch.Tensor:
        """Token offset (int64) of each memory id, same shape; ``-1`` for id ``-1``."""
        if self._offsets is None:
            self._offsets = provenance.token_offsets(self._segments)
        flat = as_numpy(ids, "ids").astype(np.int64)
        self._locate(flat)  # range check
        return provenance.offsets_of(self._offsets, flat).reshape(ids.shape)

    def entry(self, id: int, score: float = 0.0) -> MemoryEntry:
        """Provenance of memory ``id``: source, document, offset and text."""
        return provenance.entry(self._segments, self._bases, self.n_tokens, id, score)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.layout.n_layers:
            raise InputError(f"layer {layer} is out of range 0..{self.layout.n_layers - 1}")

    def _check_block(self, layer: int, block_size: int) -> None:
        self._check_layer(layer)
        if block_size <= 0:
            raise InputError(f"block size must be positive, got {block_size}")

