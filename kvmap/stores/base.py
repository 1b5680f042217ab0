"""The `KVIndex` protocol every store kind implements, and the registry that names them.

An index answers maximum-inner-product search (MIPS) over the keys of one KV head layer:
given keys of shape (n, H, d) it searches, for each head h, the n keys of that head.

Two flavours:

- **persistent** indexes (faiss, LSH) are built once per memory segment when the segment is
  committed, saved next to the segment's arrays, and loaded lazily on first search;
- **non-persistent** indexes (exact) keep no files: the memory builds one over the keys of all
  segments, in RAM, when a layer is first searched.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from kvmap.errors import InputError


@runtime_checkable
class KVIndex(Protocol):
    """MIPS over the keys of one (segment, layer), one sub-index per KV head.

    Keys always arrive token-major, as the memory stores them on disk: a sequence of parts of
    shape (n_i, H, d), concatenated along tokens (a single segment passes one part; the exact
    store passes every segment's part). Parts may be read-only ``np.memmap`` s in float16.
    """

    kind: ClassVar[str]
    """Registry name of the store kind (``"exact"``, ``"hnsw"``...)."""
    persistent: ClassVar[bool]
    """True when the index is saved per segment; False when it is rebuilt in RAM on demand."""

    def build(self, parts: Sequence[np.ndarray]) -> None:
        """Index keys given as parts of shape (n_i, H, d), concatenated along tokens."""

    @classmethod
    def file_names(cls, layer: int, n_kv_heads: int) -> list[str]:
        """The names ``save`` gives this layer's files; a segment's meta.json must list exactly
        these (a memory is untrusted input: no other name is ever opened)."""

    def save(self, folder: Path, layer: int) -> list[str]:
        """Write this layer's index files into ``folder``; return their file names."""

    def load(self, folder: Path, layer: int, keys: np.ndarray) -> None:
        """Read the files ``save`` wrote. ``keys`` (n, H, d) are the segment's stored keys, for
        indexes that re-rank candidates exactly. Raise any exception on damaged files: the
        memory turns it into a ``MemoryFormatError``."""

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k keys by inner product.

        Parameters
        ----------
        queries : (H, M, d) float32
        k : number of results per query

        Returns
        -------
        scores : (H, M, k) float32, best first; ``-inf`` where fewer than k keys exist
        ids : (H, M, k) int64 local token ids (row in the concatenated parts); ``-1`` as padding
        """


STORE_KINDS: dict[str, type] = {}
"""Store kind name -> index class. Filled by ``register`` as the store modules are imported."""

ALIASES: dict[str, str] = {"faiss-flat": "flat", "faiss-hnsw": "hnsw", "faiss-ivfpq": "ivfpq"}
"""Other spellings accepted for a kind; the canonical name is what a manifest records."""


def register(cls: type) -> type:
    """Class decorator: add an index class to ``STORE_KINDS`` under its ``kind``."""
    STORE_KINDS[cls.kind] = cls
    return cls


def canonical_kind(kind: str) -> str:
    """The registry name for ``kind`` (resolving aliases); ``InputError`` if unknown."""
    name = ALIASES.get(kind, kind)
    if name not in STORE_KINDS:
        raise InputError(f"unknown store kind {kind!r}; choose one of: {', '.join(STORE_KINDS)}")
    return name


def make_index(kind: str, **params) -> KVIndex:
    """A fresh, empty index of store kind ``kind`` with parameters ``params``.

    Raises ``InputError`` for an unknown kind or parameter.
    """
    cls = STORE_KINDS[canonical_kind(kind)]
    try:
        return cls(**params)
    except TypeError as err:  # unknown keyword: a dataclass reports it as TypeError
        raise InputError(f"bad parameters for store {kind!r}: {params} ({err})") from None


# ----------------------------------------------------------------------------------------------
# helpers shared by the index implementations


def head_keys(parts: Sequence[np.ndarray], head: int) -> np.ndarray:
    """Keys of one head as a contiguous float32 array (n, d), from token-major parts (n_i, H, d)."""
    return np.ascontiguousarray(np.concatenate([p[:, head, :] for p in parts], axis=0), dtype=np.float32)


def n_heads_of(parts: Sequence[np.ndarray]) -> int:
    return int(parts[0].shape[1])


def pad_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (..., k') results to (..., k) with score ``-inf`` and id ``-1`` (when k' < k)."""
    missing = k - scores.shape[-1]
    if missing <= 0:
        return scores, ids
    shape = scores.shape[:-1] + (missing,)
    scores = torch.cat([scores, torch.full(shape, float("-inf"), dtype=scores.dtype)], dim=-1)
    ids = torch.cat([ids, torch.full(shape, -1, dtype=ids.dtype)], dim=-1)
    return scores, ids


def rerank(
    queries: np.ndarray, keys: np.ndarray, head: int, cand: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-scoring of candidate ids for one head.

    Parameters
    ----------
    queries : (M, d) float32
    keys : (n, H, d) stored keys (any float dtype, memmap ok)
    cand : (M, c) int64 candidate ids, ``-1`` for none
    k : results to keep

    Returns
    -------
    scores (M, k) float32 (``-inf`` padding) and ids (M, k) int64 (``-1`` padding), best first.
    """
    valid = cand >= 0
    cand_vecs = np.asarray(keys[np.where(valid, cand, 0), head], dtype=np.float32)  # (M, c, d)
    scores = np.einsum("md,mcd->mc", queries, cand_vecs)
    scores = np.where(valid, scores, -np.inf).astype(np.float32)
    take = min(k, cand.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :take]
    top_s = np.take_along_axis(scores, order, 1)
    top_i = np.where(np.isfinite(top_s), np.take_along_axis(cand, order, 1), -1)
    s, i = pad_topk(torch.from_numpy(top_s), torch.from_numpy(top_i.astype(np.int64)), k)
    return s.numpy(), i.numpy()

