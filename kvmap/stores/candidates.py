"""Candidates for retrieval reuse: what the first forward keeps for every later forward to search.

With ``ImportConfig.reuse`` the prompt's forward finds each query's best memories once, by exact
search streamed over the whole memory (:meth:`kvmap.stores.Memory.search_streamed`); the union per
(layer, KV head) (:func:`union_ids`) is kept in RAM, and every decode step takes its exact top-k
among it. Decode then costs the same whatever the memory's size.

The cheaper, approximate way to pick candidates (``ImportConfig.reuse_blocks``) reads only some
blocks. A block is ``block_size`` consecutive memory tokens. For each (layer, KV head) it is
summarised by the per-channel minimum and maximum of its keys, which bound any query's score:
``q . k <= sum_c max(q_c * lo_c, q_c * hi_c)`` for every key ``k`` of the block (Quest: Tang et al.,
"Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024). The bounds take
2 / block_size of the keys' size and stay in RAM; the keys stay on disk. A search scores every
block's bound, keeps a budget of the best blocks and reads only their tokens. Recall of both ways
against exact search is measured on real K/V by ``benchmarks/recall_reuse.py``: on SmolLM2's keys the
bounds are loose, and block candidates miss most of the true top-k (RESULTS.md, scale section).
"""
from __future__ import annotations

import numpy as np
import torch


def key_bounds(keys: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel min and max of each block of ``keys`` (n, H, d): two (n_blocks, H, d) arrays.

    The last block may be shorter; min and max are exact in the keys' own dtype.
    """
    n, h, d = keys.shape
    n_blocks = -(-n // block_size)
    full = (n // block_size) * block_size
    lo = np.empty((n_blocks, h, d), keys.dtype)
    hi = np.empty((n_blocks, h, d), keys.dtype)
    if full:
        blocks = keys[:full].reshape(-1, block_size, h, d)
        lo[:full // block_size], hi[:full // block_size] = blocks.min(1), blocks.max(1)
    if full < n:
        lo[-1], hi[-1] = keys[full:].min(0), keys[full:].max(0)
    return lo, hi


def upper_bounds(queries: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Bound of each query's best score in each block: (H, M, d) x (H, B, d) -> (H, M, B)."""
    return (torch.einsum("hmd,hbd->hmb", queries.clamp(min=0), hi)
            + torch.einsum("hmd,hbd->hmb", queries.clamp(max=0), lo))


def candidate_blocks(queries: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, budget: int,
                     chunk: int = 256) -> list[torch.Tensor]:
    """Up to ``budget`` blocks per KV head, shared fairly by the head's queries.

    Blocks are taken by their rank in any one query's ordering (every query's best block first,
    then every query's second best, ...), ties broken by the bound. Returns one sorted (n_h,) int64
    tensor of block indices per head.
    """
    n_heads, m, _ = queries.shape
    n_blocks = lo.shape[1]
    depth = min(budget, n_blocks)  # no query needs more than `budget` of its own blocks
    ranks, bounds = [], []
    for start in range(0, m, chunk):
        b = upper_bounds(queries[:, start:start + chunk], lo, hi)  # (H, m', B)
        top = b.topk(depth, dim=-1)
        ranks.append(top.indices)
        bounds.append(top.values)
    order = torch.cat(ranks, dim=1)  # (H, M, depth) block ids, best first for each query
    value = torch.cat(bounds, dim=1)
    out = []
    for h in range(n_heads):
        # Rank-major order: all queries' rank-0 blocks, then rank 1, ...; best bound first within a rank.
        within = value[h].T.argsort(dim=1, descending=True)  # (depth, M)
        ids = order[h].T.gather(1, within).reshape(-1).numpy()
        uniq, first = np.unique(ids, return_index=True)
        picked = uniq[np.argsort(first, kind="stable")][:budget]
        out.append(torch.from_numpy(np.sort(picked)).to(torch.int64))
    return out


def block_token_ids(blocks: list[torch.Tensor], starts: np.ndarray, lengths: np.ndarray,
                    block_size: int) -> torch.Tensor:
    """Memory ids of the chosen blocks' tokens, one row per head, padded with -1: (H, C)."""
    rows = []
    for chosen in blocks:
        c = chosen.numpy()
        ids = starts[c][:, None] + np.arange(block_size)[None, :]
        rows.append(ids[np.arange(block_size)[None, :] < lengths[c][:, None]])
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), -1, np.int64)
    for h, r in enumerate(rows):
        out[h, :len(r)] = r
    return torch.from_numpy(out)


def union_ids(ids: torch.Tensor, following: int = 0, n_tokens: int | None = None, followed: int = 0) -> torch.Tensor:
    """Per head, the distinct ids of (H, ..., K) in ascending order, padded with -1 at the end: (H, C).

    ``following``: also the next ``following`` ids (below ``n_tokens``) of each id, or, with
    ``followed`` > 0, only of the first ``followed`` ids along the last axis (each query's best when
    ``ids`` come from a search, best first).
    """
    rows = [torch.unique(row[row >= 0]) for row in ids.reshape(ids.shape[0], -1)]
    if following > 0:
        leads = ids[..., :followed] if followed > 0 else ids
        steps = torch.arange(1, following + 1)
        rows = [torch.unique(torch.cat([r, (lead[lead >= 0][:, None] + steps).reshape(-1)]))
                for r, lead in zip(rows, leads.reshape(ids.shape[0], -1))]
        rows = [r[r < n_tokens] if n_tokens is not None else r for r in rows]
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), -1, dtype=torch.int64)
    for h, r in enumerate(rows):
        out[h, :len(r)] = r
    return out
