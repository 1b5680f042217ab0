"""Training-free levers on how much, and where, token-level import's memories weigh in attention, and the
record that measures it (issue 16): a cap on the memories' share of a query's attention
(:attr:`ImportConfig.memory_cap`), the query heads that may read memories at all (:attr:`ImportConfig.heads`),
and each head's share and most-attended memory (:attr:`ImportTrace.keep_shares`).

Shapes follow :func:`kvmap.models.attend._attend_with_memory`: a layer's query heads grouped by KV head,
(Hkv, r, T, ...), so query head i is (i // r, i % r).
"""
from __future__ import annotations

import torch


def mask_heads(mem_logits: torch.Tensor, head_mask: torch.Tensor | None) -> torch.Tensor:
    """Memory logits (Hkv, r, T, k) with the heads ``head_mask`` (Hq,) leaves out set to -inf (they read no memory)."""
    if head_mask is None:
        return mem_logits
    n_kv, r = mem_logits.shape[:2]
    return mem_logits.masked_fill(~head_mask.to(mem_logits.device).view(n_kv, r, 1, 1), float("-inf"))


def cap_memory_share(probs: torch.Tensor, k: int, cap_percent: int) -> torch.Tensor:
    """Attention weights (..., k + S) whose first k (the memories) sum to at most ``cap_percent`` %: where they
    sum to more, they are scaled down to the cap and the local weights up by the same mass, so every row still
    sums to 1 and keeps its order within each part. 100: unchanged."""
    if cap_percent >= 100:
        return probs
    cap = cap_percent / 100
    mem = probs[..., :k].sum(-1, keepdim=True)  # (..., 1)
    over = mem > cap
    mem_scale = torch.where(over, cap / mem.clamp_min(1e-12), torch.ones_like(mem))
    local_scale = torch.where(over, (1 - cap) / (1 - mem).clamp_min(1e-12), torch.ones_like(mem))
    return torch.cat([probs[..., :k] * mem_scale, probs[..., k:] * local_scale], dim=-1)


def record_shares(trace, layer: int, mem_probs: torch.Tensor, ids: torch.Tensor) -> None:
    """Per query head: the attention share of the memories and the most-attended one. mem_probs, ids: (Hkv, r, T, k)."""
    n_kv, r, t, _ = mem_probs.shape
    top = ids.gather(-1, mem_probs.argmax(-1, keepdim=True))[..., 0]  # (Hkv, r, T)
    trace.shares.setdefault(layer, []).append((mem_probs.sum(-1).reshape(n_kv * r, t).detach().cpu(),
                                               top.reshape(n_kv * r, t).cpu()))
