"""Read texts of any length into a memory, chunk by chunk, exporting every token's pre-RoPE K/V.

Each chunk is read with the model in context: the first ``sinks`` tokens of the document and the last
``context`` tokens before the chunk are put into the KV cache, re-rotated to positions 0..P-1, and the
chunk follows at positions P..P+C-1. Their K/V were exported already (pre-RoPE), so nothing is
recomputed: the cost per token is constant and the positions never leave the model's window.
"""
from __future__ import annotations

import hashlib
import numbers
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from kvmap.ports import MemoryPort
from kvmap.rope import cos_sin, rotate


@dataclass
class ReaderConfig:
    """How texts are read into memory."""

    chunk_size: int = 512
    """Tokens run through the model per forward pass."""
    context: int = 512
    """Tokens before the chunk kept in the KV cache while reading it."""
    sinks: int = 4
    """First tokens of each document always kept in the cache (attention sinks)."""
    remember_sinks: bool = False
    """Store the sink tokens in memory too. Off by default: sinks draw large attention whatever the
    query, so in memory they fill the top-k of every search (measured: see README)."""

    def __post_init__(self) -> None:
        from kvmap.errors import InputError

        for name, low in (("chunk_size", 1), ("context", 0), ("sinks", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise InputError(f"{name} must be a whole number, {low} or more, got {value!r}")


@dataclass
class ReadStats:
    """Throughput of one ``read_into`` call."""

    n_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / max(self.seconds, 1e-9)


class _ChunkRecorder:
    """Collects the pre-RoPE K/V of one chunk from every layer."""

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[layer], self.values[layer] = k[0], v[0]  # (H, T, d)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(self.keys), torch.stack(self.values)  # (L, H, T, d)


QUERY_SAMPLE = 1024
"""Tokens of each remembered segment re-read to sample the model's queries (for the query-aware cluster index,
:mod:`kvmap.stores.clusters`): about 3% of reading a 35k-token segment."""


class _QueryMoments:
    """A recorder that keeps, per layer, the second moment of each KV head's group of pre-RoPE queries."""

    def __init__(self, n_layers: int, n_kv_heads: int):
        self.n_kv_heads = n_kv_heads
        self.moments: list[torch.Tensor | None] = [None] * n_layers

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        pass

    def record_queries(self, layer: int, queries: torch.Tensor) -> None:
        from kvmap.stores.clusters import query_moment

        self.moments[layer] = query_moment(queries[0], self.n_kv_heads)  # (Hkv, d, d)


@torch.no_grad()
def sample_query_moments(port: MemoryPort, ids: list[int]) -> tuple[np.ndarray, int, np.ndarray] | None:
    """The model's query moments over the first :data:`QUERY_SAMPLE` of ``ids``: (moment (L, Hkv, d, d),
    tokens, RoPE angle per position of each channel (L, d)); None for a port that gives no queries."""
    from kvmap.ports import CausalLMPort

    if not isinstance(port, CausalLMPort) or not ids:
        return None
    sample = ids[:QUERY_SAMPLE]
    recorder = _QueryMoments(port.layout.n_layers, port.layout.n_kv_heads)
    with port.exporting(recorder):
        port.base(input_ids=torch.tensor(sample)[None], use_cache=False)
    if any(m is None for m in recorder.moments):
        return None
    one = torch.ones(1, dtype=torch.float64)
    omega = []
    for layer in range(port.layout.n_layers):
        cos, sin = cos_sin(port.layer_rotary(layer), torch.tensor([1]), one)  # (1, d) at position 1
        omega.append(torch.atan2(sin[0], cos[0]))
    return torch.stack(recorder.moments).numpy(), len(sample), torch.stack(omega).numpy()


def _prefix_cache(port: MemoryPort, keys: torch.Tensor, values: torch.Tensor):
    """A transformers DynamicCache holding pre-RoPE ``keys`` (L, H, P, d) rotated to positions 0..P-1."""
    from transformers import DynamicCache

    cache = DynamicCache(config=port.base.config)
    positions = torch.arange(keys.shape[2])
    for layer in range(keys.shape[0]):
        # each layer's own rotary: Gemma 3 rotates local and global layers with different bases
        cos, sin = cos_sin(port.layer_rotary(layer), positions, keys)  # (P, d)
        cache.update(rotate(keys[layer], cos, sin)[None], values[layer][None], layer)
    return cache


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token on its own (for provenance)."""
    return tokenizer.batch_decode([[i] for i in ids])


class ChunkCache:
    """Chunk K/V keyed by the model (id and layout), the exact token prefix and the reader settings.

    A chunk's K/V depend only on the tokens before and in it, so a document that repeats another's
    opening (benchmark haystacks built from the same filler) can reuse them: the results are the ones
    a fresh read computes. Bounded by ``max_bytes`` (oldest chunks evicted first); ``reused_tokens``
    counts what was not recomputed.
    """

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes, self.bytes, self.reused_tokens = max_bytes, 0, 0
        self._chunks: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, key: bytes) -> tuple[torch.Tensor, torch.Tensor] | None:
        hit = self._chunks.get(key)
        if hit is not None:
            self.reused_tokens += hit[0].shape[2]
        return hit

    def put(self, key: bytes, keys: torch.Tensor, values: torch.Tensor) -> None:
        size = keys.numel() * keys.element_size() * 2
        while self._chunks and self.bytes + size > self.max_bytes:  # evict the oldest first
            old_keys, _ = self._chunks.pop(next(iter(self._chunks)))
            self.bytes -= old_keys.numel() * old_keys.element_size() * 2
        if size <= self.max_bytes:
            self._chunks[key] = (keys, values)
            self.bytes += size


@torch.no_grad()
def read_tokens(port: MemoryPort, ids: list[int], config: ReaderConfig | None = None,
                chunk_cache: ChunkCache | None = None):
    """Yield ``(start, keys, values)`` per chunk of one document; keys/values (L, H, C, d) pre-RoPE."""
    config = config or ReaderConfig()
    sink_k = sink_v = None
    ctx_k = ctx_v = None
    # the model's identity is part of the key: two models never share chunks (one ChunkCache may serve several)
    identity = (getattr(port, "model_id", None), port.layout.as_dict(), config.chunk_size, config.context, config.sinks)
    prefix_hash = hashlib.sha1(repr(identity).encode())
    for start in range(0, len(ids), config.chunk_size):
        chunk_ids = ids[start:start + config.chunk_size]
        prefix_hash.update(np.asarray(chunk_ids, dtype=np.int64).tobytes())
        key = prefix_hash.digest()
        hit = chunk_cache.get(key) if chunk_cache is not None else None
        if hit is not None:
            keys, values = hit
        else:
            recorder = _ChunkRecorder(port.layout.n_layers)
            prefix = [t for t in ((sink_k, sink_v), (ctx_k, ctx_v)) if t[0] is not None]
            cache = None
            if prefix:
                pk = torch.cat([p[0] for p in prefix], dim=2)
                pv = torch.cat([p[1] for p in prefix], dim=2)
                cache = _prefix_cache(port, pk, pv)
            with port.exporting(recorder):
                port.base(input_ids=torch.tensor(chunk_ids)[None], cache=cache, use_cache=cache is not None)
            keys, values = recorder.stacked()
            if chunk_cache is not None:
                chunk_cache.put(key, keys, values)
        yield start, keys, values
        if sink_k is None:
            sink_k, sink_v = keys[:, :, :config.sinks], values[:, :, :config.sinks]
            keys, values = keys[:, :, config.sinks:], values[:, :, config.sinks:]
        if config.context > 0:
            ctx_k = keys if ctx_k is None else torch.cat([ctx_k, keys], dim=2)
            ctx_v = values if ctx_v is None else torch.cat([ctx_v, values], dim=2)
            ctx_k, ctx_v = ctx_k[:, :, -config.context:], ctx_v[:, :, -config.context:]


def read_into(port: MemoryPort, tokenizer, memory, source: str, documents: Iterable[str],
              config: ReaderConfig | None = None, progress: bool = True,
              chunk_cache: ChunkCache | None = None, replace: bool = False) -> ReadStats:
    """Read ``documents`` (texts) into ``memory`` as one source; atomic: all or nothing.

    ``replace``: the new segment takes the place of whatever ``source`` held, in the one manifest
    replace that commits it; a read that fails or is killed midway leaves the old copy.

    Returns the number of tokens read and the wall time (tokens/s shown on the progress bar).
    """
    config = config or ReaderConfig()
    docs = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in documents]
    total = sum(len(d) for d in docs)
    began = time.perf_counter()
    bar = tqdm(total=total, unit="tok", desc=f"remember {source}", disable=not progress, dynamic_ncols=True)
    with (memory.writer(source, replace=True) if replace else memory.writer(source)) as writer:
        for doc_id, ids in enumerate(docs):
            texts = token_texts(tokenizer, ids)
            for start, keys, values in read_tokens(port, ids, config, chunk_cache):
                n = keys.shape[2]
                skip = 0 if config.remember_sinks or start > 0 else min(config.sinks, n)
                if skip < n:
                    writer.append(keys[:, :, skip:].numpy(), values[:, :, skip:].numpy(),
                                  np.asarray(ids[start + skip:start + n]), np.full(n - skip, doc_id),
                                  np.arange(start + skip, start + n), texts[start + skip:start + n])
                bar.update(n)
        moments = sample_query_moments(port, [t for ids in docs for t in ids])
        if moments is not None:
            writer.set_query_moments(*moments)
    bar.close()
    return ReadStats(total, time.perf_counter() - began)
