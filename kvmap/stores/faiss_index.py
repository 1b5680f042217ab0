"""faiss-backed stores: flat (exact), HNSW and IVF-PQ, all with the inner-product metric.

One faiss index per (segment, layer, KV head), built in float32 from the stored keys when the
segment is committed and written as ``l{layer:02d}h{head:02d}.faiss``. Keys are NOT normalised:
the score is the attention logit, so the metric must be the raw inner product.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch

from kvmap.stores.base import head_keys, n_heads_of, rerank, register


FAISS_THREADS_ENV = "KVMAP_FAISS_THREADS"
_threads_set = False


def _faiss():
    """The faiss module, imported lazily (commands without a faiss store need not pay for it).

    On first use faiss is limited to ``$KVMAP_FAISS_THREADS`` OpenMP threads (default 1):
    measured on the 2-core dev machine, building an IVF-PQ over 2000 16-d keys took 1.4 s with
    one thread and 6.8 s with two (OpenMP threads spin against torch and other processes).
    """
    global _threads_set
    import faiss

    if not _threads_set:
        faiss.omp_set_num_threads(max(1, int(os.environ.get(FAISS_THREADS_ENV, "1"))))
        _threads_set = True
    return faiss


def _file(layer: int, head: int) -> str:
    return f"l{layer:02d}h{head:02d}.faiss"


FLAT_IP = b"IxFI"
"""faiss's tag of an ``IndexFlatIP`` file."""


def check_flat_file(path: Path, n: int, d: int) -> None:
    """Refuse an ``IndexFlatIP`` file unless every header field is what faiss writes for n keys of d dims.

    faiss parses index files natively and trusts them: a damaged header (a size field, say)
    can crash the process. A flat index's layout is fixed, so it is checked byte for byte first:
    tag, d (int32), ntotal (int64), two dummies 2**20 (int64), is_trained (1 byte), metric 0
    (int32), the code count n * d (uint64), then n * d float32 (faiss 1.7-1.15 ``write_index``).
    HNSW and IVF-PQ files are not checked this way: a memory is trusted data for those kinds.
    """
    with open(path, "rb") as f:
        head = f.read(45)
        size = os.fstat(f.fileno()).st_size
    expected = FLAT_IP + struct.pack("<iqqq?iQ", d, n, 1 << 20, 1 << 20, True, 0, n * d)
    if head != expected or size != 45 + 4 * n * d:
        raise ValueError(f"{path.name} is not a flat inner-product index of {n} keys of {d} dims")


@dataclass
class _FaissIndex:
    """Shared code: one faiss index per head, saved one file per (layer, head)."""

    kind: ClassVar[str] = ""
    persistent: ClassVar[bool] = True
    mmap: ClassVar[bool] = True
    """Read the files with ``IO_FLAG_MMAP_IFC`` (memory-maps flat and HNSW storage)."""

    heads: list = field(default_factory=list, init=False, repr=False)
    """One faiss index per KV head, set by ``build`` or ``load``."""

    def _new(self, x: np.ndarray):
        """A trained, filled faiss index over x (n, d) float32."""
        raise NotImplementedError

    def _configure(self, index) -> None:
        """Set search-time parameters (faiss does not persist all of them, e.g. nprobe)."""

    def build(self, parts: Sequence[np.ndarray]) -> None:
        self.heads = []
        for h in range(n_heads_of(parts)):
            index = self._new(head_keys(parts, h))
            self._configure(index)
            self.heads.append(index)

    @classmethod
    def file_names(cls, layer: int, n_kv_heads: int) -> list[str]:
        return [_file(layer, h) for h in range(n_kv_heads)]

    def save(self, folder: Path, layer: int) -> list[str]:
        faiss = _faiss()
        names = []
        for h, index in enumerate(self.heads):
            faiss.write_index(index, str(Path(folder) / _file(layer, h)))
            names.append(_file(layer, h))
        return names

    def load(self, folder: Path, layer: int, keys: np.ndarray) -> None:
        faiss = _faiss()
        flags = faiss.IO_FLAG_MMAP_IFC if self.mmap else 0
        self.heads = []
        for h in range(keys.shape[1]):
            file = Path(folder) / _file(layer, h)
            with open(file, "rb") as f:
                is_flat = f.read(4) == FLAT_IP
            if is_flat or self.kind == "flat":  # a flat kind's file must be flat
                check_flat_file(file, keys.shape[0], keys.shape[2])
            index = faiss.read_index(str(file), flags)
            if index.ntotal != keys.shape[0] or index.d != keys.shape[2]:
                raise ValueError(f"{_file(layer, h)} holds {index.ntotal}x{index.d}, expected {keys.shape}")
            self._configure(index)
            self.heads.append(index)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (H, M, d) float32 -> scores, local ids (H, M, k); -inf / -1 as padding."""
        out_s, out_i = [], []
        for h, index in enumerate(self.heads):
            q = np.ascontiguousarray(queries[h].detach().cpu().numpy(), dtype=np.float32)
            s, i = self._search_head(h, index, q, k)
            out_s.append(s)
            out_i.append(i)
        scores = torch.from_numpy(np.stack(out_s))
        ids = torch.from_numpy(np.stack(out_i).astype(np.int64))
        return scores.masked_fill(ids < 0, float("-inf")), ids  # faiss pads with -FLT_MAX

    def _search_head(self, h: int, index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search(q, k)


@register
@dataclass
class FlatIndex(_FaissIndex):
    """faiss ``IndexFlatIP``: exact, scanned from a memory-mapped file instead of RAM."""

    kind: ClassVar[str] = "flat"

    def _new(self, x: np.ndarray):
        index = _faiss().IndexFlatIP(x.shape[1])
        index.add(x)
        return index


@register
@dataclass
class HNSWIndex(_FaissIndex):
    """faiss ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT``: fast queries, slow builds."""

    kind: ClassVar[str] = "hnsw"
    M: int = 32
    """Graph neighbours per node."""
    ef_construction: int = 40
    """Candidate list length while building (the faiss default; 64 built 35% slower here)."""
    ef_search: int = 64
    """Candidate list length while searching (raised to k when k is larger)."""

    def _new(self, x: np.ndarray):
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(x.shape[1], self.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.add(x)
        return index

    def _configure(self, index) -> None:
        index.hnsw.efSearch = self.ef_search


@register
@dataclass
class IVFPQIndex(_FaissIndex):
    """faiss ``IndexIVFPQ`` with the inner-product metric, plus optional exact re-ranking.

    A segment with fewer than ``min_points`` tokens gets an ``IndexFlatIP`` instead: too few
    points to train the coarse quantizer and the 2**nbits centroids of each sub-quantizer.
    """

    kind: ClassVar[str] = "ivfpq"
    mmap: ClassVar[bool] = False  # IVF lists are read into RAM (IO_FLAG_MMAP_IFC does not apply)
    nlist: int | None = None
    """Coarse clusters; ``None``: about sqrt(n), at most n // 39 and 65536."""
    m: int = 16
    """PQ sub-quantizers (lowered to the largest divisor of d that is <= m)."""
    nbits: int = 8
    """Bits per sub-quantizer code."""
    nprobe: int = 16
    """Clusters visited per query."""
    refine: int = 4
    """Fetch ``refine * k`` PQ candidates and re-score them exactly with the stored keys
    (PQ scores alone find few of the true top-k); 0 or 1: return PQ scores as they are."""
    min_points: int = 8192
    """Below this many tokens a segment gets an exact flat index: scanning so few keys costs
    about as much as probing IVF lists, and training PQ on them costs seconds per head."""
    train_iters: int = 10
    """k-means iterations when training (faiss default 25: training is most of the build time,
    e.g. 2.4 s instead of 0.9 s per 5000 16-d keys, for little recall)."""
    max_train: int = 16384
    """Keys sampled to train the quantizers (bounds the build time of large segments: PQ
    training took about 4 s per 8192 64-d keys on one core here)."""

    keys: np.ndarray | None = field(default=None, init=False, repr=False)
    """(n, H, d) stored keys of the segment, for re-ranking (set by ``load``/``build``)."""

    def _new(self, x: np.ndarray):
        faiss = _faiss()
        n, d = x.shape
        if n < max(self.min_points, 2**self.nbits):
            index = faiss.IndexFlatIP(d)
            index.add(x)
            return index
        nlist = self.nlist or int(round(math.sqrt(n)))
        nlist = max(1, min(nlist, n // 39, 65536))
        m = max(div for div in range(1, min(self.m, d) + 1) if d % div == 0)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, self.nbits, faiss.METRIC_INNER_PRODUCT)
        # Small segments train on fewer points than faiss likes; the warning would only be noise.
        index.cp.min_points_per_centroid = 1
        index.pq.cp.min_points_per_centroid = 1
        index.cp.niter = index.pq.cp.niter = self.train_iters
        # faiss subsamples to max_points_per_centroid * centroids training points
        index.cp.max_points_per_centroid = max(1, self.max_train // nlist)
        index.pq.cp.max_points_per_centroid = max(1, self.max_train // 2**self.nbits)
        index.train(x)
        index.add(x)
        return index

    def _configure(self, index) -> None:
        if hasattr(index, "nprobe"):
            index.nprobe = min(self.nprobe, index.nlist)

    def build(self, parts: Sequence[np.ndarray]) -> None:
        super().build(parts)
        self.keys = parts[0] if len(parts) == 1 else np.concatenate(parts)

    def load(self, folder: Path, layer: int, keys: np.ndarray) -> None:
        super().load(folder, layer, keys)
        self.keys = keys

    def _search_head(self, h: int, index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.refine <= 1 or not hasattr(index, "nprobe") or self.keys is None:
            return index.search(q, k)
        _, cand = index.search(q, k * self.refine)
        return rerank(q, self.keys, h, cand.astype(np.int64), k)
