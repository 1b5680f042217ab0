"""MemoryPort for timm Vision Transformers (``timm.models.vision_transformer.Block`` stacks).

While a context manager is active, each block's ``attn.forward`` is replaced (per instance) by
:func:`_attention_forward`, timm's ``Attention.forward`` plus:

- export: every token's keys (after the q/k norm) and values go to a recorder;
- import: the block attends over [memory K/V, its own K/V] in one softmax.

ViT keys carry learned absolute positions (added to the tokens before the first block), no RoPE,
so memory keys are used as given: there is no placement to choose and no retrieval, every memory
entry is attended to. Everything that depends on timm's attention internals lives in this file.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvmap.errors import KVMapError
from kvmap.ports import ImportConfig, ImportTrace, KVLayout, MemoryPort, PortState, Recorder, attached_forwards


@dataclass
class PatchImportState(PortState):
    """A ViT port's attach state: the shared fields and the layers that import."""

    layers: tuple[int, ...] | None = None
    """Layers that import; ``None`` means every layer the memory holds entries for."""

    def memory_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The memory's (K, V) for ``layer``, each (B or 1, H, M, d), or ``None`` if it imports nothing."""
        if self.memory is None or (self.layers is not None and layer not in self.layers):
            return None
        return self.memory.kv(layer)


def _self_attn_bias(n: int, like: torch.Tensor, attn_mask: torch.Tensor | None,
                    is_causal: bool) -> torch.Tensor | None:
    """Additive bias (..., N, N) with SDPA semantics for the block's own tokens, or ``None``."""
    if is_causal:
        return like.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """timm's own attention arithmetic (fused or not, as the module is set): (B, H, N, d) -> (B, H, N, d)."""
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              dropout_p=attn.attn_drop.p if attn.training else 0.0)
    scores = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    bias = _self_attn_bias(q.shape[2], scores, attn_mask, is_causal)
    if bias is not None:
        scores = scores + bias
    return attn.attn_drop(scores.softmax(dim=-1)) @ v


def _attend_with_memory(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mem_k: torch.Tensor, mem_v: torch.Tensor,
                        attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Attention over [memory, own tokens] in one softmax.

    Parameters
    ----------
    q, k, v : (B, H, N, d) the block's own queries, keys (after q/k norm) and values.
    mem_k, mem_v : (B or 1, H, M, d) memory keys and values, used as given (no positions to apply).
    attn_mask, is_causal : as timm's ``Attention.forward``; they restrict the own tokens only,
        every query sees every memory entry.

    Returns
    -------
    (B, H, N, d) attention output.
    """
    b, _, n, _ = q.shape
    m = mem_k.shape[2]
    if mem_k.shape[0] not in (1, b):
        raise KVMapError(f"the memory holds {mem_k.shape[0]} sequences but the batch has {b}; give one per row or one")
    mem_k = mem_k.to(q.dtype).expand(b, -1, -1, -1)  # (B, H, M, d)
    mem_v = mem_v.to(q.dtype).expand(b, -1, -1, -1)
    keys = torch.cat([mem_k, k], dim=2)  # (B, H, M+N, d)
    values = torch.cat([mem_v, v], dim=2)
    bias = _self_attn_bias(n, q, attn_mask, is_causal)
    if bias is not None:
        bias = F.pad(bias, (m, 0))  # (..., N, M+N): memory columns unmasked
    return _attend(attn, q, keys, values, bias, is_causal=False)


def _attention_forward(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       is_causal: bool = False) -> torch.Tensor:
    """Replacement for timm's ``Attention.forward`` (same signature and output) with export/import.

    Parameters
    ----------
    x : (B, N, C) tokens entering the attention (after the block's ``norm1``).

    Returns
    -------
    (B, N, C) attention output after the projection, as timm returns it.
    """
    state: PatchImportState = self._kvmap_state
    layer: int = self._kvmap_layer
    b, n, _ = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
    q, k, v = qkv.unbind(0)  # each (B, H, N, d)
    q, k = self.q_norm(q), self.k_norm(k)

    if state.recorder is not None:
        state.recorder(layer, k, v)

    memory = state.memory_kv(layer)
    if memory is None:
        out = _attend(self, q, k, v, attn_mask, is_causal)
    else:
        out = _attend_with_memory(self, q, k, v, *memory, attn_mask, is_causal)

    out = out.transpose(1, 2).reshape(b, n, self.attn_dim)  # (B, N, H*d)
    out = self.norm(out)
    if gate is not None:
        out = out * gate
    return self.proj_drop(self.proj(out))


def _blocks_of(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(model, nn.Module) and hasattr(model, "blocks"):
        return list(model.blocks)
    return list(model)


class ViTMemoryPort(MemoryPort):
    """MemoryPort for a stack of timm ViT blocks, each with a timm ``Attention`` at ``block.attn``.

    Parameters
    ----------
    blocks
        The blocks (``vit.blocks``, a list of them), or a ``VisionTransformer`` itself.
    model_id
        Identity written into memories this port exports and checked on import.
    """

    def __init__(self, blocks: nn.Module | Sequence[nn.Module], model_id: str = "unknown"):
        from timm.layers import Attention

        self.blocks = _blocks_of(blocks)
        if not self.blocks:
            raise KVMapError("ViTMemoryPort needs at least one block")
        self.attentions = [block.attn for block in self.blocks]
        for i, attn in enumerate(self.attentions):
            if type(attn) is not Attention:
                raise KVMapError(f"block {i}: ViTMemoryPort supports timm's plain Attention, not {type(attn).__name__}")
        first = self.attentions[0]
        self.layout = KVLayout(len(self.blocks), first.num_heads, first.head_dim)
        self.model_id = model_id

    @contextlib.contextmanager
    def _attached(self, state: PatchImportState) -> Iterator[PatchImportState]:
        with attached_forwards(self.attentions, _attention_forward, lambda layer: state):
            yield state

    @contextlib.contextmanager
    def exporting(self, recorder: Recorder) -> Iterator[None]:
        """Within the block, each layer hands ``recorder(layer, k, v)`` its keys and values, (B, H, N, d)."""
        with self._attached(PatchImportState(recorder=recorder)):
            yield None

    @contextlib.contextmanager
    def importing(self, memory, config: ImportConfig | None = None,
                  recorder: Recorder | None = None) -> Iterator[ImportTrace]:
        """Within the block, every layer ``memory.kv(layer)`` answers for attends to those entries too.

        Parameters
        ----------
        memory
            Anything with ``layout``, ``model_id`` and ``kv(layer) -> (K, V) | None``, K and V of shape
            (B or 1, H, M, d) (one memory per batch row, or one shared by the batch). Gradients flow
            into K and V.
        config
            Only ``config.layers`` is read (which layers import); every entry is attended to, so
            top-k, distance and placement do not apply to a ViT.
        recorder
            Optional: also export each layer's own K/V, as :meth:`exporting` does.
        """
        self.check_memory(memory)
        layers = config.layers if config is not None else None
        state = PatchImportState(recorder=recorder, memory=memory, layers=layers)
        with self._attached(state):
            yield state.trace

