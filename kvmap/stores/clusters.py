"""A query-aware cluster index over one segment's keys: the prompt's search reads a few clusters, not every key.

Exact search over a million keys x 30 layers is compute-bound on a CPU (RESULTS.md, scale section). Off-the-
shelf ANN indexes lose recall on attention keys because queries are far from the keys' distribution
(RetrievalAttention: Liu et al., 2024). This index fixes the metric instead of the data structure: keys
are clustered with k-means under the *queries'* second moment ``M = E[q^T q]``, so that a cluster's spread
is measured as the error it causes in query-key scores: ``E_q[(q . (k - c))^2] = (k - c) M (k - c)^T``.
A search scores every centroid, scans the keys of each query's ``probe`` best clusters and keeps the
top-k: fewer keys, read from an int8 copy in cluster order (:mod:`kvmap.stores.sketch`) where the segment
has one.

The moments come from the model's own queries while it reads (:func:`kvmap.reader.read_into` samples a
chunk of each segment, pre-RoPE). Searches use queries rotated to the import ``distance``, so the metric
is rotated to it too (``omega``: each channel's RoPE angle per position); an index serves one distance
and is built for others on first use. Files: ``clusters-v1-d<distance>-c<size>.npz`` beside the
segment, holding the moments (to build other distances) and a sha256 of its arrays (checked on load;
a damaged, foreign or stale file is built again).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvmap.fileio import write_bytes_atomic

VERSION = 1
"""Bumped when the file's layout or the build changes: files of other versions are never read."""
CLUSTER_SIZE = 256
"""Mean keys per cluster by default: a 35k-token segment gets 137 clusters per (layer, KV head)."""
MOMENTS_FILE = "query-moments.npz"
"""The per-segment query statistics every distance's index is built from."""


@dataclass(frozen=True)
class Probe:
    """How the prompt's search uses the cluster index: ``clusters`` per query, for queries rotated to ``distance``."""

    clusters: int
    distance: int
    cluster_size: int = CLUSTER_SIZE
    """Mean keys per cluster (segments of n tokens get ceil(n / cluster_size) clusters)."""


@dataclass
class LayerClusters:
    """One layer's clusters: centroids (H, C, d) float32, members (H, n) int32 local ids grouped by cluster,
    starts (H, C + 1) int64: cluster c of head h holds ``members[h, starts[h, c]:starts[h, c + 1]]``."""

    centroids: np.ndarray
    members: np.ndarray
    starts: np.ndarray
    codes: np.ndarray | None = None
    """(H, n, d) int8 and scales (H, n) float16: the keys again in ``members`` order (:mod:`kvmap.stores.sketch`),
    so that a cluster is one contiguous slice; None where the segment has no such copy."""
    scales: np.ndarray | None = None


def query_moment(queries: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Sum of q^T q over the queries of each KV head's group: (Hq, T, d) pre-RoPE -> (Hkv, d, d) float64."""
    hq, t, d = queries.shape
    q = queries.detach().double().reshape(n_kv_heads, (hq // n_kv_heads) * t, d)  # (Hkv, r*T, d)
    return q.transpose(1, 2) @ q


def rotation(omega: np.ndarray, distance: int) -> np.ndarray:
    """(d, d) matrix R with ``x @ R`` = ``x`` rotated by RoPE to ``distance`` (rotate_half convention)."""
    angle = distance * omega.astype(np.float64)  # (d,)
    d = angle.shape[0]
    eye = np.eye(d)
    half = np.concatenate([-eye[:, d // 2:], eye[:, :d // 2]], axis=1)  # rows: rotate_half of the basis
    return eye * np.cos(angle) + half * np.sin(angle)


def build_layer(keys: np.ndarray, metric: np.ndarray, cluster_size: int, seed: int = 0) -> LayerClusters:
    """Cluster each head's keys (n, H, d) under its metric (H, d, d) (k-means in the metric's whitened space)."""
    import faiss

    n, n_heads, d = keys.shape
    n_clusters = max(1, -(-n // cluster_size))
    cents, members, starts = [], [], []
    for h in range(n_heads):
        m = metric[h] + np.eye(d) * (1e-6 * np.trace(metric[h]) / d + 1e-12)  # ridge: a rank-poor sample
        chol = np.linalg.cholesky(m)  # m = chol chol^T
        x = np.ascontiguousarray(np.asarray(keys[:, h], np.float32) @ chol.astype(np.float32))  # whitened (n, d)
        km = faiss.Kmeans(d, n_clusters, niter=10, seed=seed, max_points_per_centroid=64)
        km.train(x)
        assign = km.index.search(x, 1)[1][:, 0]
        cents.append(np.linalg.solve(chol.T, km.centroids.T.astype(np.float64)).T.astype(np.float32))  # back to keys
        order = np.argsort(assign, kind="stable")
        members.append(order.astype(np.int32))  # a segment's local ids: half the RAM of int64
        starts.append(np.searchsorted(assign[order], np.arange(n_clusters + 1)).astype(np.int64))
    return LayerClusters(np.stack(cents), np.stack(members), np.stack(starts))


def file_name(distance: int, cluster_size: int) -> str:
    return f"clusters-v{VERSION}-d{distance}-c{cluster_size}.npz"


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def save_moments(folder: Path, moment: np.ndarray, count: int, omega: np.ndarray) -> None:
    """Write a segment's query moments (L, H, d, d) (sums over ``count`` queries) and RoPE angles (L, d)."""
    arrays = {"moment": moment.astype(np.float64), "count": np.asarray([count], np.int64),
              "omega": omega.astype(np.float64)}
    _write(folder / MOMENTS_FILE, arrays)


def load_moments(folder: Path, n_layers: int, n_heads: int, d: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The segment's (moment (L, H, d, d), omega (L, d)), or None when it has none (or they are damaged)."""
    arrays = _read(folder / MOMENTS_FILE)
    if arrays is None or arrays.get("moment", np.zeros(0)).shape != (n_layers, n_heads, d, d) \
            or arrays.get("omega", np.zeros(0)).shape != (n_layers, d) or not np.isfinite(arrays["moment"]).all():
        return None
    return arrays["moment"], arrays["omega"]


def build(folder: Path, keys_of, distance: int, cluster_size: int, n_tokens: int, n_layers: int, n_heads: int,
          d: int) -> list[LayerClusters] | None:
    """Every layer's clusters for queries rotated to ``distance``; None when the segment has no query moments.

    ``keys_of(layer)`` gives the segment's keys (n, H, d) of a layer."""
    moments = load_moments(folder, n_layers, n_heads, d)
    if moments is None:
        return None
    moment, omega = moments
    layers = []
    for layer in range(n_layers):
        rot = rotation(omega[layer], distance)
        metric = np.einsum("ji,hjk,kl->hil", rot, moment[layer], rot)  # R^T M R: the rotated queries' moment
        layers.append(build_layer(keys_of(layer), metric, cluster_size))
    return layers


def save(folder: Path, distance: int, cluster_size: int, layers: list[LayerClusters], n_tokens: int) -> None:
    """Write ``layers`` to their file (OSError on a read-only folder)."""
    arrays = {"n_tokens": np.asarray([n_tokens], np.int64)}
    for layer, lc in enumerate(layers):
        arrays.update({f"centroids{layer}": lc.centroids, f"members{layer}": lc.members, f"starts{layer}": lc.starts})
    _write(folder / file_name(distance, cluster_size), arrays)


def load(folder: Path, distance: int, cluster_size: int, n_tokens: int, n_layers: int, n_heads: int,
         d: int) -> list[LayerClusters] | None:
    """The saved clusters for ``distance`` and ``cluster_size``, checked (digest, shapes, ids in range); None if absent, damaged or stale."""
    arrays = _read(folder / file_name(distance, cluster_size))
    if arrays is None or arrays.get("n_tokens", np.zeros(0)).tolist() != [n_tokens]:
        return None
    layers = []
    for layer in range(n_layers):
        try:
            lc = LayerClusters(arrays[f"centroids{layer}"], arrays[f"members{layer}"], arrays[f"starts{layer}"])
        except KeyError:
            return None
        n_clusters = lc.centroids.shape[1] if lc.centroids.ndim == 3 else -1
        if lc.centroids.shape != (n_heads, n_clusters, d) or lc.members.shape != (n_heads, n_tokens) \
                or lc.starts.shape != (n_heads, n_clusters + 1) or not np.isfinite(lc.centroids).all() \
                or (n_tokens and (lc.members.min() < 0 or lc.members.max() >= n_tokens)) \
                or (lc.starts[:, 0] != 0).any() or (lc.starts[:, -1] != n_tokens).any() \
                or (np.diff(lc.starts, axis=1) < 0).any():
            return None
        layers.append(dataclasses.replace(lc, members=lc.members.astype(np.int32)))  # files of int64 read too
    return layers


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, digest=np.frombuffer(bytes.fromhex(_digest(arrays)), np.uint8), **arrays)
    write_bytes_atomic(path, buf.getvalue())


def _read(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a file :func:`_write` wrote, or None (missing, not ours, or its digest does not match)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except Exception:  # missing, truncated, not a zip, a member's CRC: all mean "build it again"
        return None
    digest = arrays.pop("digest", np.zeros(0, np.uint8))
    return arrays if digest.tobytes().hex() == _digest(arrays) else None


def span_positions(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The positions ``starts[i] .. ends[i] - 1`` of every span, concatenated in order: (sum of lengths,) int64."""
    lengths = (ends - starts).astype(np.int64)
    out_first = np.cumsum(lengths) - lengths  # where each span starts in the output
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts.astype(np.int64) - out_first, lengths)


def bf16_matmul_is_fast() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX), where a bfloat16 matmul is
    several times faster than float32; elsewhere it is slower. Read from the hardware, so that a machine always
    takes the same path."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def code_scores(queries: torch.Tensor, codes: np.ndarray, scales: np.ndarray) -> torch.Tensor:
    """Scores (M, n) of queries (M, d) float32 against int8 keys ``codes * scales`` (n, d), (n,), for ranking.

    On a CPU with bfloat16 dot products, keys, queries and scores are rounded to bfloat16 (relative error 2**-9
    each; float32 sums, rounded once): several times faster, and the (M, n) result, which dominates the memory
    traffic, is half the bytes. The scores only choose candidates: the top-k among them is taken again from
    their exact keys (:func:`kvmap.models.attend._retrieve`)."""
    if bf16_matmul_is_fast():
        keys = torch.from_numpy(codes).to(torch.bfloat16) * torch.from_numpy(scales).to(torch.bfloat16)[:, None]
        return queries.to(torch.bfloat16) @ keys.T  # (M, n) bfloat16
    return queries @ (torch.from_numpy(codes).float() * torch.from_numpy(scales).float()[:, None]).T


def probe_search(queries: torch.Tensor, centroids: torch.Tensor, clusters: list[tuple[int, LayerClusters]],
                 keys_of, probe: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k among the keys of each query's ``probe`` best clusters, over several segments.

    The keys of the union of a KV head's chosen clusters are scored against all of its queries (more keys per
    query than its own clusters hold: better recall, one large matmul). They are read from the clusters' int8
    copy where a segment has one (contiguous slices; scores within the quantisation error), else exactly from
    ``keys_of`` (a row gather that touches most of the key file's pages).

    Parameters
    ----------
    queries : (H, M, d) float32, rotated to the index's distance
    centroids : (H, C, d) float32, every segment's centroids concatenated in ``clusters`` order
    clusters : (global id base, the segment's layer clusters) per segment
    keys_of : keys_of(i) -> segment i's keys (n, H, d) (a memory-map)
    k : results per query

    Returns
    -------
    scores (H, M, k) float32 best first (``-inf`` padding) and ids (H, M, k) int64 global ids (``-1`` padding)
    """
    n_heads, m, _ = queries.shape
    offsets = np.cumsum([0] + [lc.centroids.shape[1] for _, lc in clusters])  # first global cluster of each segment
    top = (queries @ centroids.transpose(1, 2)).topk(min(probe, centroids.shape[1]), dim=-1).indices  # (H, M, p)
    out_s = torch.full((n_heads, m, k), float("-inf"))
    out_i = torch.full((n_heads, m, k), -1, dtype=torch.int64)
    for h in range(n_heads):
        chosen = np.unique(top[h].numpy())  # the union of the head's queries' clusters, ascending
        seg_of = np.searchsorted(offsets, chosen, side="right") - 1
        coded_ids, codes, scales, exact_ids, keys = [], [], [], [], []
        for s in np.unique(seg_of):
            base, lc = clusters[s]
            local = chosen[seg_of == s] - offsets[s]
            pos = span_positions(lc.starts[h, local], lc.starts[h, local + 1])  # the clusters' rows, contiguous runs
            rows = lc.members[h, pos].astype(np.int64)  # local ids
            if lc.codes is not None:
                codes.append(np.asarray(lc.codes[h])[pos])  # (n_rows, d) int8 (asarray: no memmap per-item cost)
                scales.append(np.asarray(lc.scales[h])[pos])  # (n_rows,) float16
                coded_ids.append(rows + base)
            else:
                rows = np.sort(rows)  # reading order: nearby rows share pages
                keys.append(np.asarray(keys_of(s)[rows, h], np.float32))
                exact_ids.append(rows + base)
        parts = []  # (scores (M, n), ids (n,)): one matmul over all the coded segments, one over the others
        if codes:
            parts.append((code_scores(queries[h], np.concatenate(codes), np.concatenate(scales)), coded_ids))
        if keys:
            parts.append((queries[h] @ torch.from_numpy(np.concatenate(keys)).T, exact_ids))
        if not parts:
            continue
        scores = torch.cat([p[0].float() for p in parts], dim=1) if len(parts) > 1 else parts[0][0]  # (M, n)
        cand_ids = torch.from_numpy(np.concatenate([i for p in parts for i in p[1]]))
        top_s, pick = scores.topk(min(k, scores.shape[1]), dim=-1)
        out_s[h, :, :top_s.shape[1]], out_i[h, :, :top_s.shape[1]] = top_s.float(), cand_ids[pick]
    return out_s, out_i
