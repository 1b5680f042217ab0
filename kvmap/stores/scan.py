"""Whole-memory passes over segments' keys: streamed exact top-k, block means, block bounds.

Functions of a list of :class:`~kvmap.stores.segment.Segment` and their global id bases
(``bases[i]`` = global id of segment i's first token), so that :class:`kvmap.stores.Memory`
stays a thin, readable layer over them. Every function accepts an empty list of segments and
returns empty results of the documented shapes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kvmap.ports import KVLayout
from kvmap.stores.segment import Segment


def stream_topk(segments: Sequence[Segment], bases: Sequence[int], layer: int, queries: torch.Tensor,
                k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over every key of ``layer`` of ``segments``, read once, a chunk at a time.

    Parameters
    ----------
    queries : (H, M, d) float32 on the CPU
    k : results per query, at most the segments' token count

    Returns
    -------
    scores (H, M, k) float32 best first, ids (H, M, k) int64 global ids
    """
    H, m = queries.shape[0], queries.shape[1]
    best_s = torch.full((H, m, k), float("-inf"))
    best_i = torch.full((H, m, k), -1, dtype=torch.int64)
    for seg, base in zip(segments, bases):
        for start, raw in seg.key_chunks(layer, chunk):  # raw: (n, H, d)
            keys = torch.from_numpy(raw.astype(np.float32))
            scores = torch.einsum("hmd,nhd->hmn", queries, keys)  # (H, M, n)
            top_s, top_i = scores.topk(min(k, raw.shape[0]), dim=-1)
            best_s, pick = torch.cat([best_s, top_s], dim=-1).topk(k, dim=-1)
            best_i = torch.cat([best_i, top_i + (int(base) + start)], dim=-1).gather(-1, pick)
    return best_s, best_i


def search_indexes(segments: Sequence[Segment], bases: Sequence[int], layer: int, kind: str, params: dict,
                   queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the segments' own (persistent) indexes, merged: scores, global ids (H, M, k)."""
    all_s, all_i = [], []
    for seg, base in zip(segments, bases):
        scores, ids = seg.search(layer, kind, params, queries, k)  # (H, M, k) local ids
        all_s.append(scores)
        all_i.append(torch.where(ids >= 0, ids + int(base), ids))  # local -> global ids
    scores, ids = torch.cat(all_s, dim=-1), torch.cat(all_i, dim=-1)  # (H, M, k * n_segments)
    if len(segments) > 1:
        scores, pick = scores.topk(k, dim=-1)
        ids = ids.gather(-1, pick)
    return scores, ids


def gather(segments: Sequence[Segment], bases: np.ndarray, layer: int, ids: np.ndarray, seg_of: np.ndarray,
           head_dim: int, release: bool) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values (H, P, d) float32 of global ids (H, P) from the segments' memory-maps.

    ``seg_of`` (H, P) is each id's segment (``len(segments)`` for -1, which gives zeros);
    ``release`` unmaps the touched pages afterwards (:meth:`Segment.release`).
    """
    heads = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
    keys = np.zeros(ids.shape + (head_dim,), dtype=np.float32)
    values = np.zeros(ids.shape + (head_dim,), dtype=np.float32)
    for s in np.unique(seg_of[seg_of < len(segments)]):
        seg, mask = segments[s], seg_of == s
        rows = ids[mask] - bases[s]
        keys[mask] = seg.keys(layer, scattered=True)[rows, heads[mask]]  # (n_sel, d) gathered from the memmap
        values[mask] = seg.values(layer, scattered=True)[rows, heads[mask]]
        if release:
            seg.release(layer)
    return keys, values


def chosen_to_global(ids: torch.Tensor, sizes: Sequence[int], bases: np.ndarray) -> torch.Tensor:
    """Ids into the concatenation of some segments -> global memory ids (-1 stays).

    ``sizes`` are the chosen segments' token counts, ``bases`` their global first ids.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # where each chosen segment starts locally
    local = ids.numpy()
    pos = np.clip(np.searchsorted(starts, local, side="right") - 1, 0, len(sizes) - 1)
    shift = np.asarray(bases, dtype=np.int64)[pos] - starts[pos]
    return torch.from_numpy(np.where(local >= 0, local + shift, -1))


def block_means(segments: Sequence[Segment], layout: KVLayout, layer: int, block_size: int) -> torch.Tensor:
    """Mean key of each block of ``block_size`` consecutive memory ids (the last may be shorter).

    Returns (H, n_blocks, d) float32; (H, 0, d) for an empty memory.
    """
    H, d = layout.n_kv_heads, layout.head_dim
    if not segments:
        return torch.zeros(H, 0, d)
    # plain reads, not the memory-maps: at a million tokens the maps' pages would stay resident (11 GB)
    keys = np.concatenate([seg.read_keys(layer).astype(np.float32) for seg in segments])  # (N, H, d)
    n = keys.shape[0]
    n_blocks = -(-n // block_size)
    padded = np.zeros((n_blocks * block_size, H, d), np.float32)
    padded[:n] = keys
    counts = np.minimum(block_size, n - np.arange(n_blocks) * block_size).astype(np.float32)
    sums = padded.reshape(n_blocks, block_size, H, d).sum(1)  # (n_blocks, H, d)
    means = sums / counts[:, None, None]
    return torch.from_numpy(means).permute(1, 0, 2).contiguous()  # (H, n_blocks, d)


def block_bounds(segments: Sequence[Segment], bases: Sequence[int], layout: KVLayout, dtype: str,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Key bounds of every block of every layer; blocks never straddle segments.

    Returns lo, hi: (L, H, n_blocks, d) in the memory's dtype; starts, lengths: (n_blocks,) int64
    first global id and size of each block.
    """
    L, H, d = layout.n_layers, layout.n_kv_heads, layout.head_dim
    parts = [seg.key_bounds(block_size) for seg in segments]  # each (L, n_blocks_i, H, d) twice
    empty = np.zeros((L, 0, H, d), dtype)
    lo = np.concatenate([p[0] for p in parts], axis=1) if parts else empty
    hi = np.concatenate([p[1] for p in parts], axis=1) if parts else empty
    starts, lengths = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for seg, base in zip(segments, bases):
        first = np.arange(0, seg.n_tokens, block_size)
        starts.append(int(base) + first)
        lengths.append(np.minimum(block_size, seg.n_tokens - first))
    return (
        torch.from_numpy(lo).permute(0, 2, 1, 3), torch.from_numpy(hi).permute(0, 2, 1, 3),  # (L, H, B, d)
        np.concatenate(starts).astype(np.int64), np.concatenate(lengths).astype(np.int64),
    )
