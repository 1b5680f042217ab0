"""Rotary position embedding helpers (the "rotate_half" convention used by Llama/Gemma in transformers).

RoPE rotates each pair of dimensions by an angle proportional to the position. The dot product of a
query rotated to position m with a key rotated to position n depends only on m - n, which is what lets
kvmap store keys un-rotated (as if at position 0) and later score them as if they sat at any distance.
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: ``x * cos + rotate_half(x) * sin`` (cos/sin broadcast against x)."""
    return x * cos + rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo :func:`rotate` (rotation by the opposite angle): ``x * cos - rotate_half(x) * sin``."""
    return x * cos - rotate_half(x) * sin


def cos_sin(rotary_emb: torch.nn.Module, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of a model's rotary embedding at arbitrary (even negative) positions.

    Parameters
    ----------
    rotary_emb
        The model's rotary module (``model.model.rotary_emb``), called as ``rotary_emb(x, position_ids)``.
    positions
        Integer positions of any shape ``P``.
    like
        A tensor giving the dtype/device of the result.

    Returns
    -------
    cos, sin : tensors of shape ``P + (head_dim,)``.
    """
    flat = positions.reshape(1, -1).to(like.device)
    cos, sin = rotary_emb(like, flat)  # (1, numel, head_dim)
    shape = tuple(positions.shape) + (cos.shape[-1],)
    return cos.reshape(shape).to(like.dtype), sin.reshape(shape).to(like.dtype)
