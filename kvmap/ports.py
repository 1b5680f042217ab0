"""What any transformer exposes to kvmap: a `MemoryPort` that exports K/V and imports memories.

A port is model-family specific (``kvmap.models.llama.LlamaMemoryPort``, later a timm ViT port);
everything else (stores, reader, CLI, bridges) only talks to this interface.
"""
from __future__ import annotations

import contextlib
import types
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch


@dataclass(frozen=True)
class KVLayout:
    """Shape of what a model exports: one key and one value vector per (layer, KV head, token)."""

    n_layers: int
    """Number of attention layers that export/import."""
    n_kv_heads: int
    """Key/value heads per layer (GQA: each serves ``n_heads // n_kv_heads`` query heads)."""
    head_dim: int
    """Dimension of one key (and one value) vector."""

    def as_dict(self) -> dict:
        return {"n_layers": self.n_layers, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim}


@dataclass
class MemoryEntry:
    """One retrieved memory token with its provenance."""

    source: str
    """Name the text was remembered under (usually the file path)."""
    doc_id: int
    """Index of the document inside its source."""
    offset: int
    """Token offset inside the document."""
    text: str
    """The token's text."""
    score: float = 0.0
    """Retrieval score (inner product of the rotated query with the stored key), or a hit count."""


@dataclass
class ImportConfig:
    """How memories are imported into attention. Defaults were chosen by measurement (see README)."""

    top_k: int = 16
    """Memory tokens retrieved per (layer, query head, query token)."""
    distance: int = 4096
    """Queries are rotated to this position; memories sit at position 0, so every memory looks
    ``distance`` tokens behind the current token."""
    layers: tuple[int, ...] | None = None
    """Layers that import memories; ``None`` means all."""
    placement: Literal["fixed", "ordered", "true", "contiguous"] = "ordered"
    """``fixed``: every memory at position 0, queries at ``distance`` (the seed's memory map).
    ``ordered``: as fixed, but one query's k memories keep their reading order: the newest sits
    ``distance`` behind the query, each older one a position further (contiguous, Landmark-style).
    ``true``: memories at the token offset they were read at (only meaningful for parity tests).
    ``contiguous`` (block retrieval only): the selected blocks, in reading order, fill the positions
    just before the prompt's first token (Landmark-Attention style); queries keep their positions."""
    block_size: int = 0
    """0: token-level retrieval, top-k per query at every forward (the seed's method). > 0: InfLLM-style
    blocks of this many consecutive memory tokens, represented by their mean key, chosen once per
    (layer, KV head) by the first forward's queries (the question) and kept while the answer is
    decoded; every query then attends to all tokens of the chosen blocks."""
    n_blocks: int = 8
    """Blocks chosen per (layer, KV head) in block retrieval."""
    neighbours: int = 0
    """Block retrieval: also import this many blocks either side of each chosen one (EM-LLM's
    contiguity buffer); the total stays ``n_blocks * (1 + 2 * neighbours)`` blocks."""
    select_last: int = 0
    """Block retrieval and ``reuse``: only the queries of the first forward's last ``select_last`` tokens
    choose the blocks or candidates (e.g. the question's tokens, not the instruction's); 0: all of them."""
    fixed_blocks: tuple[int, ...] | None = None
    """Block retrieval with the blocks chosen outside attention (e.g. by BM25 on the blocks' text):
    these block indices, for every layer and KV head, instead of the attention-score choice."""
    reuse: int = 0
    """0: token-level retrieval searches the memory's store at every forward (the seed's method).
    > 0: retrieval is reused across decode steps, for large memories: the first forward's queries
    each find their ``reuse`` best memories by exact search streamed over the whole memory
    (:mod:`kvmap.stores.candidates`); the union per (layer, KV head) is kept, and every forward (the
    prompt's and each decoded token's) takes its exact top-k among it. Decode cost then no longer
    grows with the memory; the first forward reads every key once."""
    reuse_next: int = 0
    """With ``reuse``: also keep the ``reuse_next`` memories that follow each candidate in reading order
    (what came right after a match, e.g. the digits after "the pass key is")."""
    reuse_next_best: int = 0
    """With ``reuse_next``: only each query's ``reuse_next_best`` best candidates bring their followers
    (0: all ``reuse`` of them). Lets ``reuse`` grow (decode-step recall) without the followers
    multiplying the candidates."""
    reuse_blocks: int = 0
    """With ``reuse``: 0 finds the candidates by exact search. > 0 instead takes the tokens of this
    many blocks per (layer, KV head), ranked by block key bounds (Quest-style): reads far less, but
    measured recall is much lower (RESULTS.md, scale section)."""
    reuse_block_size: int = 32
    """Tokens per block for ``reuse_blocks``."""
    search_chunk: int = 256
    """Query vectors searched per call, bounding the (queries x memory) score matrix."""

    def __post_init__(self) -> None:
        from kvmap.errors import InputError

        for name in ("select_last", "reuse", "reuse_next", "reuse_next_best", "reuse_blocks"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be 0 or more, got {getattr(self, name)}")


def parse_layers(text: str) -> tuple[int, ...]:
    """``"0-14"``, ``"0-28/2"`` (every second), ``"3+7+20-29"`` -> the sorted layer indices (InputError if malformed)."""
    from kvmap.errors import InputError

    layers: set[int] = set()
    try:
        for part in text.split("+"):
            span, _, step = part.partition("/")
            a, dash, b = span.partition("-")
            layers.update(range(int(a), int(b) + 1, int(step or 1)) if dash else [int(a)])
    except ValueError:
        raise InputError(f"layers '{text}' is not a layer list; write e.g. 0-14, 0-28/2 or 3+7+20-29") from None
    if not layers:
        raise InputError(f"layers '{text}' names no layer; write e.g. 0-14, 0-28/2 or 3+7+20-29")
    return tuple(sorted(layers))


def format_layers(layers: tuple[int, ...] | None) -> str:
    """Inverse of :func:`parse_layers` for display: ``(0, 2, ..., 28)`` -> ``"0-28/2"``; ``None`` -> ``"all"``."""
    if layers is None:
        return "all"
    steps = {b - a for a, b in zip(layers, layers[1:])}
    if len(layers) > 2 and len(steps) == 1:
        step = steps.pop()
        return f"{layers[0]}-{layers[-1]}" + (f"/{step}" if step > 1 else "")
    return "+".join(str(x) for x in layers)


Recorder = Callable[[int, torch.Tensor, torch.Tensor], None]
"""Called as ``recorder(layer, keys, values)`` with pre-RoPE keys and values of the new tokens,
each of shape (B, n_kv_heads, T, head_dim)."""


@contextlib.contextmanager
def attached_forwards(modules, forward: Callable, state_of: Callable[[int], object]) -> Iterator[None]:
    """Swap each attention module's ``forward`` for ``forward`` (bound to it), with its state.

    Module ``i`` gets ``_kvmap_state = state_of(i)`` and ``_kvmap_layer = i``. Everything is
    removed again in ``finally``, so an exception inside the block leaves the model as it was.
    Refuses to attach twice (a second port on the same model would silently shadow the first).
    """
    from kvmap.errors import KVMapError

    if any("forward" in vars(m) for m in modules):
        raise KVMapError("a kvmap port is already attached to this model; nest nothing, use one block")
    try:
        for layer, module in enumerate(modules):
            module._kvmap_state, module._kvmap_layer = state_of(layer), layer
            module.forward = types.MethodType(forward, module)
        yield
    finally:
        for module in modules:
            for name in ("forward", "_kvmap_state", "_kvmap_layer"):
                vars(module).pop(name, None)


class MemoryPort(ABC):
    """A model's door to memory: export K/V while it reads, import memories while it answers.

    Use as context managers that leave nothing behind::

        with port.exporting(recorder):
            model(input_ids)
        with port.importing(memory, ImportConfig(top_k=16)):
            model.generate(...)
    """

    layout: KVLayout
    model_id: str

    @abstractmethod
    def exporting(self, recorder: Recorder) -> contextlib.AbstractContextManager[None]:
        """Within the block, every forward pass hands each layer's new pre-RoPE K/V to ``recorder``."""

    @abstractmethod
    def importing(self, memory, config: ImportConfig | None = None) -> contextlib.AbstractContextManager["ImportTrace"]:
        """Within the block, attention also attends to the top-k memories retrieved from ``memory``."""


@dataclass
class ImportTrace:
    """What an import block retrieved: global memory ids with summed scores, for showing provenance."""

    blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    """Block retrieval: layer -> (Hkv, M) memory ids of the tokens chosen for that layer's KV heads."""
    block_mass: dict[int, torch.Tensor] = field(default_factory=dict)
    """Block retrieval: layer -> (Hkv, n_blocks) attention mass the choosing queries gave each block."""
    _pending: list = field(default_factory=list, repr=False)
    _hits: dict[int, float] = field(default_factory=dict, repr=False)

    def record(self, ids: torch.Tensor) -> None:
        """Note retrieved ids; counted only when ``hits`` is read (this runs on every decode step)."""
        self._pending.append(ids)

    @property
    def hits(self) -> dict[int, float]:
        """Memory id -> number of times it was among the top-k (over layers, heads and tokens)."""
        if self._pending:
            flat = torch.cat([ids.reshape(-1) for ids in self._pending])
            self._pending.clear()
            uniq, counts = torch.unique(flat[flat >= 0], return_counts=True)
            for i, c in zip(uniq.tolist(), counts.tolist()):
                self._hits[i] = self._hits.get(i, 0.0) + c
        return self._hits

    def top(self, n: int) -> list[tuple[int, float]]:
        return sorted(self.hits.items(), key=lambda kv: -kv[1])[:n]


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield
