"""MemoryPort for Gemma 3 text models (``Gemma3ForCausalLM``, e.g. the built-in Gemma 3 270M).

Gemma 3's attention is Llama's plus things :mod:`kvmap.models.llama` already handles (q/k RMS norms
before RoPE, ``scaling = query_pre_attn_scalar ** -0.5`` read from ``attn.scaling``, the decoder
layer calling ``self_attn(..., position_ids=..., cache=...)``), and two things it does not:

- **Two RoPEs.** Local (``sliding_attention``) layers use ``rope_theta`` 10k, global
  (``full_attention``) layers 1M; ``model.model.rotary_emb(x, position_ids, layer_type)`` takes the
  layer type. Each layer here gets its own rotary (:class:`LayerRotary`), so the query rotation to
  ``distance`` (fixed and ordered placement) and the memory rotation to its offset (true placement) use the
  frequencies the layer's local keys were rotated with.
- **Sliding windows.** A local layer sees only the keys less than ``sliding_window`` tokens behind a
  query. Memories obey the same rule: with fixed placement every memory sits ``distance`` tokens (ordered: up to ``distance + top_k - 1``)
  behind, so a local layer imports nothing when ``distance >= sliding_window`` (Gemma 3 270M: window
  512, default distance 4096, so only its 3 global layers import); with true placement each memory is
  dropped from the top-k of a query it is too far behind (after the search, so a local layer may get
  fewer than ``top_k``; true placement is for parity tests).

``attn_logit_softcapping``: transformers' ``Gemma3Attention`` does not pass it to the attention
function, so Gemma 3 never soft-caps attention logits; neither does this port (exact parity).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kvmap.errors import KVMapError
from kvmap.models.llama import LlamaMemoryPort, _attention_forward, RetrievalState
from kvmap.rope import cos_sin


class LayerRotary:
    """Gemma 3's rotary module bound to one layer type, callable as ``rotary(x, position_ids)`` like Llama's
    (so :func:`kvmap.rope.cos_sin` works on it)."""

    def __init__(self, rotary_emb: nn.Module, layer_type: str):
        self.rotary_emb, self.layer_type = rotary_emb, layer_type

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary_emb(x, position_ids, self.layer_type)

    @property
    def rope_type(self) -> str:
        """This layer type's rope type (transformers keeps one per layer type)."""
        types = getattr(self.rotary_emb, "rope_type", "default")
        return types.get(self.layer_type, "default") if isinstance(types, dict) else types

    def __repr__(self) -> str:
        return f"LayerRotary({self.layer_type})"


class _WindowedMemory:
    """A memory as a sliding-window layer sees it with true placement: after the search, a memory that
    sits ``window`` or more tokens behind the query (``offset <= position - window``) gets id ``-1``,
    which :func:`kvmap.models.attend._attend_with_memory` masks out.

    Only token retrieval honours the window; block retrieval and retrieval reuse pick their memories
    once for many positions, so this view refuses ``search_streamed``, ``block_means`` and
    ``block_bounds`` (true placement is for parity tests). The rest is delegated explicitly.
    """

    def __init__(self, memory, window: int):
        self.memory, self.window = memory, window
        self.path, self.model_id, self.layout = memory.path, memory.model_id, memory.layout
        self.positions: torch.Tensor | None = None  # (T,) positions of the current queries, set per forward

    @property
    def n_tokens(self) -> int:
        return self.memory.n_tokens

    def search(self, layer: int, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, ids = self.memory.search(layer, queries, k)  # (Hkv, r*T, k)
        if self.positions is None:
            raise KVMapError("a sliding-window layer imported memories without position_ids")
        t = self.positions.numel()
        pos = self.positions.to(ids.device).repeat(queries.shape[1] // t)  # (r*T,): query rows are (r, T), T fastest
        offsets = self.memory.offsets(ids).to(ids.device)
        visible = (ids >= 0) & (offsets > pos[None, :, None] - self.window)
        return scores.masked_fill(~visible, float("-inf")), ids.masked_fill(~visible, -1)

    def _refuse(self, what: str):
        raise KVMapError(f"{what} on a sliding-window layer with true placement cannot honour the window; "
                         "use placement ordered or fixed, or token retrieval")

    def search_streamed(self, layer: int, queries: torch.Tensor, k: int, probe=None):
        self._refuse("retrieval reuse")

    def block_means(self, layer: int, block_size: int):
        self._refuse("block retrieval")

    def block_bounds(self, layer: int, block_size: int):
        self._refuse("block retrieval")

    def fetch(self, layer: int, ids: torch.Tensor, release: bool = False):
        return self.memory.fetch(layer, ids, release)

    def offsets(self, ids: torch.Tensor) -> torch.Tensor:
        return self.memory.offsets(ids)

    def entry(self, id: int, score: float = 0.0):
        return self.memory.entry(id, score)

    def token_texts(self) -> list[str]:
        return self.memory.token_texts()


def _gemma_attention_forward(self: nn.Module, hidden_states: torch.Tensor, position_embeddings=None,
                             attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None, **kwargs):
    """:func:`kvmap.models.llama._attention_forward`, telling a windowed memory where the queries are."""
    memory = self._kvmap_state.memory
    if isinstance(memory, _WindowedMemory):
        position_ids = kwargs.get("position_ids")
        memory.positions = None if position_ids is None else position_ids.reshape(-1)
    return _attention_forward(self, hidden_states, position_embeddings, attention_mask, cache, past_key_values,
                              **kwargs)


class Gemma3MemoryPort(LlamaMemoryPort):
    """MemoryPort for a ``Gemma3ForCausalLM`` (or its ``Gemma3TextModel``).

    Same contract as :class:`LlamaMemoryPort`; ``rotary`` is the global (``full_attention``) rotary, and
    :meth:`layer_rotary` gives the one a given layer uses (callers that rotate stored keys into a layer's
    cache, like the reader's prefix cache, need the per-layer one).
    """

    def __init__(self, model: nn.Module, model_id: str = "unknown"):
        super().__init__(model, model_id)
        cfg = self.base.config
        if getattr(cfg, "use_bidirectional_attention", False):
            raise KVMapError("Gemma 3 with use_bidirectional_attention is not causal; kvmap needs a causal LM")
        self.layer_types = [attn.layer_type for attn in self.attentions]
        self.rotaries = {t: LayerRotary(self.base.rotary_emb, t) for t in sorted(set(self.layer_types))}
        global_type = "full_attention" if "full_attention" in self.rotaries else self.layer_types[-1]
        self.rotary = self.rotaries[global_type]

    _forward = staticmethod(_gemma_attention_forward)

    def layer_rotary(self, layer: int) -> LayerRotary:
        """The rotary that layer ``layer`` rotates its queries and keys with."""
        return self.rotaries[self.layer_types[layer]]

    def _layer_state(self, state: RetrievalState, layer: int) -> RetrievalState:
        """A view of ``state`` for one layer: its own rotary and query rotation, and its memory as its
        window lets it see. Recorder, config, trace and memory are shared, not copied."""
        rotary = self.layer_rotary(layer)
        device = next(self.model.parameters()).device
        distance = torch.tensor(state.config.distance)
        query_cos_sin = {dtype: cos_sin(rotary, distance, torch.zeros((), dtype=dtype, device=device))
                         for dtype in state.query_cos_sin}
        memory = state.memory
        window = self.attentions[layer].sliding_window
        if memory is not None and window is not None:
            if state.config.placement in ("fixed", "ordered"):
                # fixed: every memory sits `distance` behind; ordered: up to distance + top_k - 1
                reach = state.config.distance + (state.config.top_k - 1 if state.config.placement == "ordered" else 0)
                memory = memory if reach < window else None  # out of the window: nothing to import
            else:
                memory = _WindowedMemory(memory, window)
        # Rotation caches are the layer type's own (its rotary differs); the rest is shared.
        return dataclasses.replace(state, rotary=rotary, query_cos_sin=query_cos_sin, memory=memory,
                                   age_cos_sin={}, rotations={})
