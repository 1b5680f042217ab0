"""Exact maximum-inner-product search with torch: one batched matmul and a top-k per head."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch

from kvmap.stores.base import pad_topk, register

SCORE_BUDGET_BYTES = 256 * 2**20
"""Largest (H, m, N) float32 score matrix one search step may allocate."""


@register
@dataclass
class ExactIndex:
    """Brute-force MIPS over keys held in RAM as one float32 tensor (H, N, d).

    Not persistent: the memory builds it over all segments' keys when a layer is first
    searched, and drops it when segments are added or forgotten.
    """

    kind: ClassVar[str] = "exact"
    persistent: ClassVar[bool] = False

    keys: torch.Tensor | None = field(default=None, init=False, repr=False)
    """(H, N, d) float32 keys, set by ``build``."""

    def build(self, parts: Sequence[np.ndarray]) -> None:
        """Copy token-major parts (n_i, H, d) into one head-major float32 tensor (H, N, d)."""
        n = sum(int(p.shape[0]) for p in parts)
        _, h, d = parts[0].shape
        keys = torch.empty(h, n, d, dtype=torch.float32)
        view = keys.numpy()  # shares memory: numpy casts and transposes straight into the tensor
        start = 0
        for p in parts:  # part by part, without a temporary copy of all keys
            stop = start + p.shape[0]
            view[:, start:stop] = np.asarray(p).transpose(1, 0, 2)  # (n_i, H, d) -> (H, n_i, d)
            start = stop
        self.keys = keys

    @classmethod
    def file_names(cls, layer: int, n_kv_heads: int) -> list[str]:
        return []

    def save(self, folder: Path, layer: int) -> list[str]:
        return []  # nothing to save: the keys themselves are the index

    def load(self, folder: Path, layer: int, keys: np.ndarray) -> None:
        self.build([keys])

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k by inner product. queries (H, M, d) -> scores, ids (H, M, k), best first."""
        if self.keys is None:  # a programming error, not bad input: no assert (python -O strips it)
            raise RuntimeError("ExactIndex.search before build() or load()")
        h, n, _ = self.keys.shape
        m = queries.shape[1]
        take = min(k, n)
        scores = torch.empty(h, m, take, dtype=torch.float32)
        ids = torch.empty(h, m, take, dtype=torch.int64)
        # Chunk the queries so the (H, chunk, N) score matrix stays under the budget.
        chunk = max(1, SCORE_BUDGET_BYTES // max(1, h * n * 4))
        keys_t = self.keys.transpose(1, 2)  # (H, d, N)
        for start in range(0, m, chunk):
            stop = min(m, start + chunk)
            sim = torch.bmm(queries[:, start:stop].float(), keys_t)  # (H, chunk, N)
            s, i = sim.topk(take, dim=-1)
            scores[:, start:stop], ids[:, start:stop] = s, i
        return pad_topk(scores, ids, k)
