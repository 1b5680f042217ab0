"""Locality-sensitive hashing for maximum inner product search (Simple-LSH).

Sign-random-projection (SimHash) estimates angles, not inner products. Simple-LSH
(B. Neyshabur and N. Srebro, "On Symmetric and Asymmetric LSHs for Inner Product Search",
ICML 2015) reduces MIPS to angular search with an augmentation:

- keys are scaled by the largest key norm U and lifted onto the unit sphere:
  x -> [x/U, sqrt(1 - |x/U|^2)]
- queries are normalised and padded with a zero: q -> [q/|q|, 0]

so that the cosine between the lifted vectors is q.x / (|q| U), monotone in q.x for a fixed
query. Each of T tables hashes a vector to b sign bits of random projections; a key is a
candidate when its code equals the query's code in some table (or, with ``probe_radius=1``,
differs from it in one bit: multi-probe), and candidates are re-scored exactly.

Buckets are found without scanning: each table keeps the codes sorted (with the permutation to
token ids), and a query's bucket is the ``searchsorted`` range of its code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch

from kvmap.stores.base import head_keys, n_heads_of, register

PAIR_BUDGET = 1 << 20
"""Largest number of (query, candidate) pairs re-scored at once, bounding RAM."""


def _file(layer: int) -> str:
    return f"lsh{layer:02d}.npz"


def _code_dtype(bits: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if bits <= np.dtype(dt).itemsize * 8:
            return np.dtype(dt)
    raise ValueError(f"n_bits must be <= 64, got {bits}")


@register
@dataclass
class LSHIndex:
    """Multi-table SimHash over the Simple-LSH augmentation, with exact re-ranking.

    Deterministic: the projections come from ``seed`` alone (and are saved with the index).
    """

    kind: ClassVar[str] = "lsh"
    persistent: ClassVar[bool] = True

    n_tables: int = 16
    """Hash tables T; more tables find more of the true top-k and cost more candidates.
    Measured (random keys, top-10): 8 tables 0.58-0.77 recall, 16 tables 0.83-0.95."""
    n_bits: int = 8
    """Sign bits b per table (<= 64); more bits mean smaller buckets."""
    probe_radius: int = 1
    """0: probe only the query's bucket; 1: also the b buckets one bit away (multi-probe)."""
    seed: int = 0
    """Seed of the random projections."""

    planes: np.ndarray | None = field(default=None, init=False, repr=False)
    """(T * b, d + 1) float32 random projections."""
    scale: np.ndarray | None = field(default=None, init=False, repr=False)
    """(H,) largest key norm U per head."""
    codes: np.ndarray | None = field(default=None, init=False, repr=False)
    """(H, T, n) each table's codes, sorted ascending."""
    order: np.ndarray | None = field(default=None, init=False, repr=False)
    """(H, T, n) int32 token id of each sorted code."""
    keys: np.ndarray | None = field(default=None, init=False, repr=False)
    """(n, H, d) stored keys, for re-ranking."""

    def __post_init__(self) -> None:
        if not 1 <= self.n_bits <= 64 or self.n_tables < 1 or self.probe_radius not in (0, 1):
            raise TypeError("need n_tables >= 1, 1 <= n_bits <= 64 and probe_radius 0 or 1")

    # -- hashing -----------------------------------------------------------------------------

    def _hash(self, aug: np.ndarray) -> np.ndarray:
        """Codes (N, T) of lifted vectors aug (N, d + 1)."""
        bits = (aug @ self.planes.T) > 0  # (N, T * b)
        bits = bits.reshape(len(aug), self.n_tables, self.n_bits)
        weights = np.left_shift(np.uint64(1), np.arange(self.n_bits, dtype=np.uint64))
        codes = (bits.astype(np.uint64) * weights).sum(-1, dtype=np.uint64)
        return codes.astype(_code_dtype(self.n_bits))

    def build(self, parts: Sequence[np.ndarray]) -> None:
        n_heads = n_heads_of(parts)
        d = parts[0].shape[2]
        rng = np.random.default_rng(self.seed)
        self.planes = rng.standard_normal((self.n_tables * self.n_bits, d + 1)).astype(np.float32)
        codes, order, scale = [], [], []
        for h in range(n_heads):
            x = head_keys(parts, h)  # (n, d)
            norms = np.linalg.norm(x, axis=1)
            u = float(norms.max()) or 1.0
            lift = np.sqrt(np.clip(1.0 - (norms / u) ** 2, 0.0, None))[:, None]
            c = self._hash(np.concatenate([x / u, lift], axis=1))  # (n, T)
            o = np.argsort(c, axis=0, kind="stable").T  # (T, n)
            codes.append(np.take_along_axis(c.T, o, axis=1))
            order.append(o)
            scale.append(u)
        self.codes = np.stack(codes)
        # int32 token ids halve the tables' size on disk (a segment stays far below 2**31 tokens)
        self.order = np.stack(order).astype(np.int32 if self.codes.shape[2] < 2**31 else np.int64)
        self.scale = np.asarray(scale, dtype=np.float32)
        self.keys = parts[0] if len(parts) == 1 else np.concatenate(parts)

    # -- persistence -------------------------------------------------------------------------

    @classmethod
    def file_names(cls, layer: int, n_kv_heads: int) -> list[str]:
        return [_file(layer)]

    def save(self, folder: Path, layer: int) -> list[str]:
        # np.savez adds ".npz" only when missing: pass an open file so the name is exact.
        with open(Path(folder) / _file(layer), "wb") as f:
            np.savez(f, planes=self.planes, scale=self.scale, codes=self.codes, order=self.order)
        return [_file(layer)]

    def load(self, folder: Path, layer: int, keys: np.ndarray) -> None:
        """Read and check the tables: shapes, dtypes, and every ``order`` entry a token of this
        segment (a damaged one would index outside the keys)."""
        from kvmap.stores.npyfile import read_npz  # checked header, bounded reads, no pickles

        n, h, d = keys.shape
        tables = (h, self.n_tables, n)
        z = read_npz(Path(folder) / _file(layer), {
            "planes": ((self.n_tables * self.n_bits, d + 1), "f"), "scale": ((h,), "f"),
            "codes": (tables, "u"), "order": (tables, "iu"),
        })
        if z["codes"].dtype != _code_dtype(self.n_bits):
            raise ValueError(f"{_file(layer)} has {z['codes'].dtype} codes, expected {_code_dtype(self.n_bits)}")
        if n and (z["order"].min() < 0 or z["order"].max() >= n):
            raise ValueError(f"{_file(layer)} has token ids outside 0..{n - 1}")
        if not (np.isfinite(z["planes"]).all() and np.isfinite(z["scale"]).all()):
            raise ValueError(f"{_file(layer)} has non-finite projections")
        self.planes, self.scale = z["planes"].astype(np.float32), z["scale"].astype(np.float32)
        self.codes, self.order = z["codes"], z["order"].astype(np.int64 if n >= 2**31 else np.int32)
        self.keys = keys

    # -- search ------------------------------------------------------------------------------

    def _probes(self, q: np.ndarray) -> np.ndarray:
        """Codes to look up, (M, T, P): the query's own code, then its one-bit neighbours."""
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
        codes = self._hash(np.concatenate([qn, np.zeros((len(q), 1), np.float32)], axis=1))
        if self.probe_radius == 0:
            return codes[:, :, None]
        flips = np.left_shift(np.uint64(1), np.arange(self.n_bits, dtype=np.uint64)).astype(codes.dtype)
        return np.concatenate([codes[:, :, None], codes[:, :, None] ^ flips], axis=2)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (H, M, d) float32 -> scores, local ids (H, M, k); -inf / -1 as padding."""
        n_heads, m, _ = queries.shape
        scores = np.full((n_heads, m, k), -np.inf, dtype=np.float32)
        ids = np.full((n_heads, m, k), -1, dtype=np.int64)
        for h in range(n_heads):
            q = np.ascontiguousarray(queries[h].detach().cpu().numpy(), dtype=np.float32)
            self._search_head(h, q, k, scores[h], ids[h])
        return torch.from_numpy(scores), torch.from_numpy(ids)

    def _search_head(self, h: int, q: np.ndarray, k: int, out_s: np.ndarray, out_i: np.ndarray) -> None:
        """Fill out_s, out_i (M, k) with the re-ranked top-k candidates of each query q (M, d)."""
        m = len(q)
        probes = self._probes(q)  # (M, T, P)
        # Bucket ranges [lo, hi) of every probe in every table's sorted codes.
        lo = np.empty(probes.shape, dtype=np.int64)
        hi = np.empty(probes.shape, dtype=np.int64)
        for t in range(self.n_tables):
            lo[:, t] = np.searchsorted(self.codes[h, t], probes[:, t], side="left")
            hi[:, t] = np.searchsorted(self.codes[h, t], probes[:, t], side="right")
        per_query = (hi - lo).reshape(m, -1).sum(1)
        # Re-score queries in chunks whose (query, candidate) pairs fit the budget.
        start = 0
        while start < m:
            stop = start + 1
            total = per_query[start]
            while stop < m and total + per_query[stop] <= PAIR_BUDGET:
                total += per_query[stop]
                stop += 1
            self._rescore(h, q, lo, hi, start, stop, k, out_s, out_i)
            start = stop

    def _rescore(self, h, q, lo, hi, start, stop, k, out_s, out_i) -> None:
        n = self.codes.shape[2]
        # Expand every bucket range into (query, token id) pairs.
        qidx_parts, cand_parts = [], []
        for t in range(self.n_tables):
            a, b = lo[start:stop, t].ravel(), hi[start:stop, t].ravel()  # (chunk * P,)
            counts = b - a
            total = int(counts.sum())
            if total == 0:
                continue
            owner = np.repeat(np.arange(len(a)), counts)  # which probe each pair comes from
            first = np.cumsum(counts) - counts
            rows = a[owner] + (np.arange(total) - first[owner])  # positions in the sorted table
            qidx_parts.append(owner // lo.shape[2] + start)
            cand_parts.append(self.order[h, t, rows].astype(np.int64))
        if not cand_parts:
            return
        # A key found by several tables or probes is scored once.
        # (sort + neighbour compare: several times faster than np.unique's hashing here)
        pair = np.sort(np.concatenate(qidx_parts) * n + np.concatenate(cand_parts))
        pair = pair[np.concatenate([[True], pair[1:] != pair[:-1]])]
        qidx, cand = pair // n, pair % n
        vecs = np.asarray(self.keys[cand, h], dtype=np.float32)  # (pairs, d)
        s = np.einsum("pd,pd->p", q[qidx], vecs)
        # Pairs are sorted by query: lay each query's candidates out in one row of a padded
        # (chunk, most candidates) matrix, then take a row-wise top-k.
        row = qidx - start
        counts = np.bincount(row, minlength=stop - start)
        col = np.arange(len(row)) - (np.cumsum(counts) - counts)[row]
        width = int(counts.max())
        mat = torch.full((stop - start, width), float("-inf"))
        mat[row, col] = torch.from_numpy(s.astype(np.float32))
        idm = torch.full((stop - start, width), -1, dtype=torch.int64)
        idm[row, col] = torch.from_numpy(cand)
        top_s, pick = mat.topk(min(k, width), dim=1)
        top_i = idm.gather(1, pick).masked_fill(top_s == float("-inf"), -1)
        out_s[start:stop, : pick.shape[1]] = top_s.numpy()
        out_i[start:stop, : pick.shape[1]] = top_i.numpy()
