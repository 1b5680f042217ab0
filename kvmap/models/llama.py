"""MemoryPort for Hugging Face Llama-family models (Llama, SmolLM2, Qwen2-like; Gemma 3 subclasses it in
:mod:`kvmap.models.gemma`).

The port swaps each attention module's ``forward`` for :func:`_attention_forward` while a context
manager is active (and restores it in ``finally``). That forward is the transformers one, plus:

- export: the pre-RoPE keys and the values of the new tokens go to a recorder;
- import: the queries search the memory, and the memory K/V join the local K/V in one softmax
  (:mod:`kvmap.models.attend`).

Everything that depends on transformers' attention internals lives in this file.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from kvmap.errors import KVMapError
from kvmap.models import attend as memory_attention
from kvmap.models.adapter import adapter_active
from kvmap.models.attend import RetrievalState
from kvmap.ports import (CausalLMPort, ImportConfig, ImportTrace, KVLayout, QueryRecorder, Recorder,
                         attached_forwards)
from kvmap.rope import cos_sin, rotate

SEQUENCE_DEPENDENT_ROPE = ("dynamic", "longrope")
"""Rope types whose frequencies change with the sequence length: a query rotated to ``distance`` in a
one-position call would use other frequencies than the local keys, so importing refuses them."""


def _attention_forward(self: nn.Module, hidden_states: torch.Tensor, position_embeddings=None,
                       attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None, **kwargs):
    """Replacement for ``LlamaAttention.forward`` (same signature and outputs) with export/import."""
    from transformers.models.llama.modeling_llama import eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    state: RetrievalState = self._kvmap_state
    cache = cache if cache is not None else past_key_values
    b, t, _ = hidden_states.shape
    d = self.head_dim
    q = self.q_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)  # (B, Hq, T, d)
    k = self.k_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)  # (B, Hkv, T, d)
    v = self.v_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)  # (B, Hkv, T, d)
    if getattr(self, "q_norm", None) is not None:  # Gemma 3 / Qwen 3 normalise q and k before RoPE
        q, k = self.q_norm(q), self.k_norm(k)

    if state.recorder is not None:
        state.recorder(self.layer_idx, k, v)
        if isinstance(state.recorder, QueryRecorder):
            state.recorder.record_queries(self.layer_idx, q)

    cos, sin = position_embeddings  # (B, T, d)
    q_rot, k_rot = rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None])
    if cache is not None:
        k_all, v_all = cache.update(k_rot, v, self.layer_idx, kwargs=kwargs)
    else:
        k_all, v_all = k_rot, v

    if state.imports(self.layer_idx):
        if b != 1:
            raise KVMapError("memory import runs one sequence at a time (batch size 1); loop over the batch")
        if attention_mask is not None and getattr(self, "sliding_window", None) is None and _padded(state, attention_mask):
            raise KVMapError("memory import does not take padded input (the attention mask hides some tokens); "
                             "pass the sequence without padding")
        out = memory_attention._attend_with_memory(self, state, q, q_rot, k_all, v_all)
    else:
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) else {}
        out, _ = attend(self, q_rot, k_all, v_all, attention_mask, dropout=0.0, scaling=self.scaling, **extra, **kwargs)
    out = out.reshape(b, t, -1).contiguous()
    return self.o_proj(out), None


def _padded(state: RetrievalState, mask: torch.Tensor) -> bool:
    """:func:`_has_padding`, computed once per mask object (every layer of a forward gets the same one)."""
    if not state.checked_mask or state.checked_mask[0] is not mask:
        state.checked_mask[:] = [mask, _has_padding(mask)]
    return state.checked_mask[1]


def _has_padding(mask: torch.Tensor) -> bool:
    """Whether a (B, 1, T, S) attention mask hides some key from every query (padding; a causal mask
    shows each key to at least the query at its own position). Bool masks: True = visible; float
    masks: very negative = hidden."""
    if mask.dim() != 4:
        return False
    hidden = ~mask if mask.dtype == torch.bool else mask <= torch.finfo(mask.dtype).min / 2
    return bool(hidden.all(dim=-2).any())


class LlamaMemoryPort(CausalLMPort):
    """MemoryPort for a transformers causal LM whose layers are ``model.model.layers[i].self_attn``.

    Parameters
    ----------
    model
        A ``LlamaForCausalLM``-like model (or its base ``LlamaModel``).
    model_id
        Identity written into memories this port exports and checked on import.
    """

    def __init__(self, model: nn.Module, model_id: str = "unknown"):
        self.model = model
        self.base = model.model if hasattr(model, "model") else model
        self.attentions = [layer.self_attn for layer in self.base.layers]
        cfg = self.base.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layout = KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)
        self.model_id = model_id
        self.rotary = self.base.rotary_emb

    _forward = staticmethod(_attention_forward)
    """The attention forward swapped in while attached (families with extra needs override it)."""

    def layer_rotary(self, layer: int) -> nn.Module:
        """The rotary module layer ``layer`` rotates with (the same for every layer in Llama-like models)."""
        return self.rotary

    def _layer_state(self, state: RetrievalState, layer: int) -> RetrievalState:
        """The state one layer's forward reads (shared by all layers here; Gemma 3 specialises it)."""
        return state

    @contextlib.contextmanager
    def _attached(self, state: RetrievalState) -> Iterator[RetrievalState]:
        with attached_forwards(self.attentions, self._forward, lambda layer: self._layer_state(state, layer)):
            yield state

    def exporting(self, recorder: Recorder) -> contextlib.AbstractContextManager[RetrievalState]:
        return self._attached(RetrievalState(recorder=recorder, rotary=self.rotary))

    def importing(self, memory, config: ImportConfig | None = None,
                  recorder: Recorder | None = None) -> contextlib.AbstractContextManager[ImportTrace]:
        config = config or ImportConfig()
        self.check_memory(memory)
        like = torch.zeros((), device=next(self.model.parameters()).device)  # float32: see attend._query_cos_sin
        state = RetrievalState(recorder=recorder, memory=memory, config=config, rotary=self.rotary,
                           unrotated_scale=self._attention_scaling(like))
        state.query_cos_sin[torch.float32] = cos_sin(self.rotary, torch.tensor(config.distance), like)  # (d,)
        return _TraceContext(self._importing(state), state.trace)

    @contextlib.contextmanager
    def _importing(self, state: RetrievalState) -> Iterator[RetrievalState]:
        """Attached, with the model's memory adapter (if it has one, and unless ``config.adapter`` is off)
        switched on: it acts only while memories are imported (:mod:`kvmap.models.adapter`)."""
        adapter = adapter_active(self.model) if state.config.adapter else contextlib.nullcontext()
        with adapter, self._attached(state):
            yield state

    def _attention_scaling(self, like: torch.Tensor) -> float:
        """The rotary's ``attention_scaling`` (1 for plain RoPE), read off cos at position 0; refuses rope
        types whose frequencies depend on the sequence length."""
        scales = set()
        for layer in range(self.layout.n_layers):
            rotary = self.layer_rotary(layer)
            rope_type = getattr(rotary, "rope_type", "default")
            if rope_type in SEQUENCE_DEPENDENT_ROPE:
                raise KVMapError(f"memory import does not support rope type '{rope_type}' (its frequencies change "
                                 "with the sequence length); use the model's default or a yarn/linear rope")
            cos, _ = cos_sin(rotary, torch.tensor(0), like)
            scales.add(round(float(cos[0]), 6))
        if len(scales) > 1:
            raise KVMapError(f"memory import needs one rotary attention_scaling for all layers, got {sorted(scales)}")
        return scales.pop()


class _TraceContext(contextlib.AbstractContextManager):
    """Enter an attach context and hand out the import trace instead of the internal state."""

    def __init__(self, inner: contextlib.AbstractContextManager, trace: ImportTrace):
        self.inner, self.trace = inner, trace

    def __enter__(self) -> ImportTrace:
        self.inner.__enter__()
        return self.trace

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)
