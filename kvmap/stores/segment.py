"""One committed segment of a memory folder, read side: checked on open (:func:`open_segment`),
then lazily memory-mapped (:class:`Segment`). Writing one: :mod:`kvmap.stores.writer`."""
from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from kvmap.errors import InputError, KVMapError, MemoryFormatError
from kvmap.fileio import write_bytes_atomic
from kvmap.ports import KVLayout
from kvmap.stores.base import KVIndex, make_index
from kvmap.stores.folder import FIX_SEGMENT, SEGMENTS, file_digest, read_manifest, read_meta, real_entry, show
from kvmap.stores.npyfile import read_npy, read_npz

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


def drop_pages(mapped: np.ndarray | None) -> None:
    """Unmap the pages a read of memory-map ``mapped`` touched: they stop counting as this process's resident
    memory and stay in the OS page cache. A contiguous slice of a map releases only its own pages (the kernel
    walks the page table of the range it is given: a whole large map costs more than the slice read)."""
    handle = getattr(mapped, "_mmap", None)  # np.memmap's mmap object, shared by its slices
    if handle is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = mapped.ctypes.data - np.frombuffer(handle, np.uint8).ctypes.data  # the slice's offset in the map
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    length = start + mapped.nbytes - first if mapped.flags.c_contiguous else len(handle) - first
    if length > 0:
        handle.madvise(mmap.MADV_DONTNEED, first, length)


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
        self._clusters: dict = {}  # (distance, cluster size) -> per-layer clusters, or None (no query moments)

    def _damaged(self, name: str, err: object) -> MemoryFormatError:
        msg = " ".join(str(err).split())[:200]
        return MemoryFormatError(f"cannot read {self.folder / name}: {msg}; {FIX_SEGMENT}")

    def array(self, name: str, scattered: bool = False) -> np.ndarray:
        """Read-only memory-map of ``k{l:02d}.bin`` / ``v{l:02d}.bin``: (n, H, d).

        ``scattered``: a second map of the file for gathers of rows spread over it, advised as random
        access, so that each page fault reads its page and not the 128 KiB of read-ahead around it (which
        for a gather of 1% of the rows reads most of the file, and evicts the rest of the memory from the
        page cache)."""
        if (name, scattered) not in self._maps:
            shape = (self.n_tokens, self.layout.n_kv_heads, self.layout.head_dim)
            try:
                mapped = np.memmap(self.folder / name, dtype=self.dtype, mode="r", shape=shape)
            except (OSError, ValueError) as err:
                raise self._damaged(name, err) from None
            if scattered and hasattr(mmap, "MADV_RANDOM"):
                mapped._mmap.madvise(mmap.MADV_RANDOM)
            self._maps[(name, scattered)] = mapped
        return self._maps[(name, scattered)]

    def keys(self, layer: int, scattered: bool = False) -> np.ndarray:
        return self.array(f"k{layer:02d}.bin", scattered)

    def values(self, layer: int, scattered: bool = False) -> np.ndarray:
        return self.array(f"v{layer:02d}.bin", scattered)

    def release(self, layer: int) -> None:
        """Unmap the pages of this layer's K/V that reads touched, so they stop counting as this
        process's resident memory (they stay in the OS page cache; the next read maps them again)."""
        for name in (f"k{layer:02d}.bin", f"v{layer:02d}.bin"):
            for scattered in (False, True):
                drop_pages(self._maps.get((name, scattered)))

    def release_sketch(self, layer: int) -> None:
        """:meth:`release` for the part of the clusters' int8 key copies (:mod:`kvmap.stores.sketch`) that a
        search of ``layer`` read."""
        for layers in self._clusters.values():
            if layers:  # each layer's codes and scales: slices of the copy's two maps
                drop_pages(layers[layer].codes)
                drop_pages(layers[layer].scales)

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

    def read_keys(self, layer: int) -> np.ndarray:
        """All keys (n, H, d) of ``layer`` in RAM, by plain reads: building derived data of a memory larger than
        RAM does not leave it resident, as a memory-map's pages would stay."""
        return np.concatenate([k for _, k in self.key_chunks(layer, max(1, self.n_tokens))])

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
            both[0, layer], both[1, layer] = key_bounds(self.read_keys(layer), block_size)
        buf = io.BytesIO()
        np.save(buf, both)
        with contextlib.suppress(OSError):  # a read-only memory just keeps them in RAM
            write_bytes_atomic(file, buf.getvalue())  # replaces a symlink itself, never its target
        return both[0], both[1]

    def clusters(self, probe) -> list | None:
        """This segment's query-aware clusters for ``probe`` (:mod:`kvmap.stores.clusters`), one per layer:
        loaded, or built and saved on first use (when the segment has query moments); None without moments.

        Derived data beside the segment, like the block bounds: a missing, damaged or stale file is built again;
        a read-only memory keeps what it built in RAM."""
        from kvmap.stores import clusters

        spec = (probe.distance, probe.cluster_size)
        if spec not in self._clusters:
            shape = (self.n_tokens, self.layout.n_layers, self.layout.n_kv_heads, self.layout.head_dim)
            found = clusters.load(self.folder, *spec, *shape)
            built = found is None
            if built:
                found = clusters.build(self.folder, self.read_keys, *spec, *shape)
                if found is not None:
                    with contextlib.suppress(OSError):  # a read-only memory keeps them in RAM
                        clusters.save(self.folder, *spec, found, self.n_tokens)
            if found is not None:
                self._attach_sketch(spec, found, built)
            self._clusters[spec] = found
        return self._clusters[spec]

    def _attach_sketch(self, spec: tuple[int, int], layers: list, built: bool) -> None:
        """Give ``layers`` their int8 key copy (:mod:`kvmap.stores.sketch`): loaded, or written first when
        missing, stale or the clusters were just built. A read-only memory without one searches without it."""
        from kvmap.stores import sketch

        shape = (self.n_tokens, self.layout.n_kv_heads, self.layout.head_dim)
        spot_keys = lambda layer: self.keys(layer, scattered=True)  # noqa: E731  64 single rows: no read-ahead
        found = None if built else sketch.load(self.folder, *spec, layers, spot_keys, *shape)
        if found is None:
            with contextlib.suppress(OSError):
                sketch.build(self.folder, *spec, layers, self.read_keys, *shape)
                found = sketch.load(self.folder, *spec, layers, spot_keys, *shape)
        if found is not None:
            codes, scales = found  # (L, H, n, d), (L, H, n)
            for layer, lc in enumerate(layers):
                lc.codes, lc.scales = codes[layer], scales[layer]

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


def open_segments(root: Path, manifest: dict, verify: bool, check) -> tuple[dict, list[Segment]]:
    """Open every segment the manifest names; the manifest they were opened from, and them.

    A writer or ``forget`` in another process may change the memory between our manifest read
    and the segments (a named folder is gone): then the new manifest is read, passed to
    ``check`` (model and layout), and tried again.
    """
    for attempt in range(3):
        try:
            return manifest, [open_segment(root, rec, manifest, verify) for rec in manifest["segments"]]
        except MemoryFormatError:
            current = read_manifest(root)
            if current == manifest or attempt == 2:
                raise
            manifest = current
            check(manifest)
    raise RuntimeError("unreachable")  # pragma: no cover
