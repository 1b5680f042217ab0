"""One MemoryPort for any transformers causal LM whose attention goes through ``AttentionInterface``.

transformers' attention modules (Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma 3, ...) project, normalise and
rotate the queries and keys themselves, update the cache, then call the function that
``config._attn_implementation`` names in ``ALL_ATTENTION_FUNCTIONS`` with the module, the rotated queries
(B, Hq, T, d), the rotated keys and values of the whole cache (B, Hkv, S, d), the mask and keyword
arguments (``scaling``, ``sliding_window``, ``position_ids``, ...). This port registers one such function,
:func:`kvmap_attention`, under ``kvmap_eager`` and ``kvmap_sdpa`` (with the masks of ``eager`` and
``sdpa``) and switches the model's config to it while attached. There it

- recovers the pre-RoPE queries and new keys by rotating back by their positions (``position_ids``):
  RoPE is a rotation, so this is exact up to float rounding, for any family, with no copied forward;
- exports the new tokens' pre-RoPE keys and values;
- imports: memories and local K/V in one softmax (:mod:`kvmap.models.attend`), or, on layers that do not
  import, calls the model's own attention function unchanged.

What differs between families is read off the model, not coded per family: the rotary of each layer
(Gemma 3's takes a layer type: :class:`LayerRotary`), each layer's sliding window (the ``sliding_window``
the module passes), the scaling the module passes. Refused with one line: partial rotary (only some
dimensions rotated), rope types whose frequencies change with the sequence length, attention
implementations other than eager and sdpa, soft-capped attention logits while importing.

The cache must keep the new tokens' keys last (transformers' dynamic caches do; a static cache does not).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
from typing import Iterator

import torch
from torch import nn

from kvmap.errors import KVMapError
from kvmap.models import attend as memory_attention
from kvmap.models.adapter import adapter_active
from kvmap.models.attend import RetrievalState
from kvmap.ports import CausalLMPort, ImportConfig, ImportTrace, KVLayout, QueryRecorder, Recorder
from kvmap.rope import cos_sin, unrotate

IMPLEMENTATIONS = ("eager", "sdpa")
"""The model attention implementations the port wraps (``kvmap_<name>`` while attached)."""
SEQUENCE_DEPENDENT_ROPE = ("dynamic", "longrope")
"""Rope types whose frequencies change with the sequence length: a query rotated to ``distance`` in a
one-position call would use other frequencies than the local keys, so importing refuses them."""


class LayerRotary:
    """A rotary module that takes a layer type (Gemma 3: ``rotary_emb(x, position_ids, layer_type)``) bound to
    one type, callable as ``rotary(x, position_ids)`` like Llama's (so :func:`kvmap.rope.cos_sin` works on it)."""

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
        self.positions: torch.Tensor | None = None  # (T,) positions of the current queries, set per call

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


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """What :func:`kvmap.models.attend._attend_with_memory` reads of the attention it runs in, as this call of
    the attention interface gives it (the module's own attributes differ between families)."""

    layer_idx: int
    scaling: float
    sliding_window: int | None


@dataclasses.dataclass
class _Attached:
    """One attention module's view while attached: its layer's retrieval state (shared fields, its own rotary
    and window), how to run the model's own attention, and what the last call's positions rotated by."""

    state: RetrievalState
    root: RetrievalState
    """The attach's state this layer's view was made from (a view is remade from it, never from a view)."""
    layer: int
    window: int | None
    original: object
    """The model's attention function this call stands in for (the family's eager, or sdpa)."""
    port: "InterfaceMemoryPort"
    site: AttentionSite | None = None
    """Made at the layer's first import call (its scaling is the one the module passes)."""


def _inverse_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotation that undoes RoPE exactly, also when cos/sin carry an ``attention_scaling`` m
    (cos**2 + sin**2 = m**2): ``cos / m**2``, ``sin / m**2``, to use as ``x cos' - rotate_half(x) sin'``."""
    norm = cos * cos + sin * sin
    return cos / norm, sin / norm


def kvmap_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    sliding_window: int | None = None, **kwargs):
    """The attention function registered as ``kvmap_eager`` / ``kvmap_sdpa``: export and import around the
    model's own attention.

    query: (B, Hq, T, d) rotated; key, value: (B, Hkv, S, d), the cache included, the T new keys last.
    Returns what transformers' attention functions return: ((B, T, Hq, d), weights or None).
    """
    view: _Attached | None = vars(module).get("_kvmap_view")
    if view is None:  # a module of this config not attached (another copy of the model): plain attention
        return _plain(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              sliding_window=sliding_window, **kwargs)
    if sliding_window != view.window:  # the module passes another window than its attribute said
        view = view.port._view(view.root, view.layer, sliding_window)
        module._kvmap_view = view
    state = view.state
    b, _, t, _ = query.shape
    imports = state.imports(view.layer)
    if state.recorder is None and not imports:
        return view.original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             sliding_window=sliding_window, **kwargs)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise KVMapError(f"{type(module).__name__} did not pass position_ids to its attention function; kvmap needs "
                         "them to undo RoPE (pass position_ids, or use a model whose decoder layers pass them)")
    if position_ids.shape[0] > 1 and not bool((position_ids == position_ids[:1]).all()):
        raise KVMapError("kvmap reads a batch only when its rows share positions (no left padding); pass the "
                         "sequences one at a time")
    cos, sin = _position_cos_sin(state, position_ids, query)  # (T, d): undoes what the module rotated by
    q = unrotate(query, cos, sin)  # (B, Hq, T, d) pre-RoPE
    if state.recorder is not None:
        new_keys = unrotate(key[:, :, -t:], cos, sin)  # (B, Hkv, T, d)
        state.recorder(view.layer, new_keys, value[:, :, -t:])
        if isinstance(state.recorder, QueryRecorder):
            state.recorder.record_queries(view.layer, q)
    if not imports:
        return view.original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             sliding_window=sliding_window, **kwargs)
    if b != 1:
        raise KVMapError("memory import runs one sequence at a time (batch size 1); loop over the batch")
    if kwargs.get("softcap") is not None:
        raise KVMapError(f"{type(module).__name__} soft-caps its attention logits; memory import does not")
    if attention_mask is not None and sliding_window is None and _padded(state, attention_mask):
        raise KVMapError("memory import does not take padded input (the attention mask hides some tokens); "
                         "pass the sequence without padding")
    if isinstance(state.memory, _WindowedMemory):
        state.memory.positions = position_ids.reshape(-1)
    scaling = scaling if scaling is not None else module.scaling
    if view.site is None or view.site.scaling != scaling:
        view.site = AttentionSite(view.layer, scaling, sliding_window)
    return memory_attention._attend_with_memory(view.site, state, q, query, key, value), None


def _plain(module: nn.Module):
    """The attention function a module's config named before it was switched to ``kvmap_<name>``."""
    name = module.config._attn_implementation.removeprefix("kvmap_")
    return _original(module, name)


def _original(module: nn.Module, name: str):
    """The family's own attention function ``name`` (eager lives in each model's modeling file)."""
    if name == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise KVMapError(f"{type(module).__name__}'s modeling file has no eager_attention_forward; load the model "
                             "with attn_implementation='sdpa'")
        return eager
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def _position_cos_sin(state: RetrievalState, position_ids: torch.Tensor, like: torch.Tensor):
    """The inverse rotation's cos, sin (T, d) of ``state.rotary`` at ``positions`` in ``like``'s dtype
    (:func:`_inverse_tables`); computed once per forward and rotary (every layer of a forward gets the same
    position_ids tensor (B, T); its identity is the cache key, and the cache holds it, so the id is not reused)."""
    cache = state.position_tables
    if not cache or cache[0] is not position_ids:
        cache[:] = [position_ids, {}]
    key = (id(state.rotary), like.dtype)
    if key not in cache[1]:
        cache[1][key] = _inverse_tables(*cos_sin(state.rotary, position_ids[0], like))
    return cache[1][key]


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


def register() -> None:
    """Register :func:`kvmap_attention` (and the matching masks) as ``kvmap_eager`` and ``kvmap_sdpa``; idempotent."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for name in IMPLEMENTATIONS:
        AttentionInterface.register(f"kvmap_{name}", kvmap_attention)
        AttentionMaskInterface.register(f"kvmap_{name}", ALL_MASK_ATTENTION_FUNCTIONS[name])


class InterfaceMemoryPort(CausalLMPort):
    """MemoryPort for a transformers causal LM whose layers are ``model.model.layers[i].self_attn`` and whose
    attention goes through ``AttentionInterface``.

    Parameters
    ----------
    model
        A ``...ForCausalLM`` (or its base model), with eager or sdpa attention.
    model_id
        Identity written into memories this port exports and checked on import.
    """

    def __init__(self, model: nn.Module, model_id: str = "unknown"):
        self.model = model
        self.base = model.model if hasattr(model, "model") else model
        cfg = self.base.config
        if getattr(cfg, "use_bidirectional_attention", False):
            raise KVMapError(f"{cfg.model_type} with use_bidirectional_attention is not causal; kvmap needs a causal LM")
        self.implementation = cfg._attn_implementation or "eager"
        if self.implementation not in IMPLEMENTATIONS:
            raise KVMapError(f"kvmap works with eager or sdpa attention, not '{self.implementation}'; load the model "
                             "with attn_implementation='sdpa'")
        self.attentions = [layer.self_attn for layer in self.base.layers]
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layout = KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)
        self.model_id = model_id
        rotary_emb = self.base.rotary_emb
        types = getattr(cfg, "layer_types", None)
        if "layer_type" in inspect.signature(rotary_emb.forward).parameters and types:
            self.layer_types = list(types)
            self.rotaries = {t: LayerRotary(rotary_emb, t) for t in sorted(set(types))}
            global_type = "full_attention" if "full_attention" in self.rotaries else types[-1]
            self.rotary = self.rotaries[global_type]
        else:
            self.layer_types, self.rotaries, self.rotary = None, None, rotary_emb
        like = torch.zeros((), device=next(self.model.parameters()).device)
        for layer in range(self.layout.n_layers):
            dim = cos_sin(self.layer_rotary(layer), torch.tensor(0), like)[0].shape[-1]
            if dim != head_dim:
                raise KVMapError(f"{cfg.model_type} rotates {dim} of its {head_dim} head dimensions (partial rotary); "
                                 "kvmap's import needs RoPE on every dimension")
        register()

    def layer_rotary(self, layer: int):
        """The rotary module layer ``layer`` rotates its queries and keys with."""
        return self.rotary if self.rotaries is None else self.rotaries[self.layer_types[layer]]

    def _window(self, layer: int) -> int | None:
        """The sliding window layer ``layer`` is expected to pass (checked against each call's)."""
        attn = self.attentions[layer]
        if "sliding_window" in vars(attn) or hasattr(type(attn), "sliding_window"):
            return attn.sliding_window
        return getattr(attn.config, "sliding_window", None)

    def _view(self, state: RetrievalState, layer: int, window: int | None) -> _Attached:
        """Layer ``layer``'s view of ``state``: its own rotary and query rotation, and its memory as its window
        lets it see. Recorder, config, trace and memory are shared, not copied."""
        original = _original(self.attentions[layer], self.implementation)
        rotary = self.layer_rotary(layer)
        if rotary is state.rotary and window is None:
            return _Attached(state, state, layer, window, original, self)
        device = next(self.model.parameters()).device
        distance = torch.tensor(state.config.distance)
        query_cos_sin = {dtype: cos_sin(rotary, distance, torch.zeros((), dtype=dtype, device=device))
                         for dtype in state.query_cos_sin}
        memory = state.memory
        if memory is not None and window is not None:
            if state.config.placement in ("fixed", "ordered"):
                # fixed: every memory sits `distance` behind; ordered: up to distance + top_k - 1
                reach = state.config.distance + (state.config.top_k - 1 if state.config.placement == "ordered" else 0)
                memory = memory if reach < window else None  # out of the window: nothing to import
            else:
                memory = _WindowedMemory(memory, window)
        if rotary is state.rotary:
            layer_state = dataclasses.replace(state, memory=memory)
        else:  # rotation caches are the rotary's own; the rest is shared
            layer_state = dataclasses.replace(state, rotary=rotary, query_cos_sin=query_cos_sin, memory=memory,
                                              age_cos_sin={}, rotations={})
        return _Attached(layer_state, state, layer, window, original, self)

    def _configs(self) -> list:
        """Every config object the attention modules read ``_attn_implementation`` from (usually one)."""
        found = {id(c): c for c in [self.model.config, self.base.config] + [a.config for a in self.attentions]}
        return list(found.values())

    @contextlib.contextmanager
    def _attached(self, state: RetrievalState) -> Iterator[RetrievalState]:
        if any("_kvmap_view" in vars(a) for a in self.attentions):
            raise KVMapError("a kvmap port is already attached to this model; nest nothing, use one block")
        configs = self._configs()
        before = [c._attn_implementation for c in configs]
        try:
            for layer, attn in enumerate(self.attentions):
                attn._kvmap_view = self._view(state, layer, self._window(layer))
                attn._kvmap_state = attn._kvmap_view.state
            for c in configs:
                c._attn_implementation = f"kvmap_{self.implementation}"
            yield state
        finally:
            for c, name in zip(configs, before):
                c._attn_implementation = name
            for attn in self.attentions:
                for name in ("_kvmap_view", "_kvmap_state"):
                    vars(attn).pop(name, None)

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
