"""The declared interfaces between models and memories.

- :class:`MemoryPort`: what any transformer exposes (export K/V while it reads, import memories while it
  answers); :class:`CausalLMPort` adds what the text-side code (reader, splice, timing, CLI) uses of a
  causal LM's port. Ports are model-family specific (:mod:`kvmap.models.llama`, :mod:`kvmap.models.gemma`,
  :mod:`kvmap.models.vit`).
- :class:`MemoryView`: what a port reads from a memory (layout, model id, search, fetch, provenance, block
  summaries). Every memory implements all of it (:class:`kvmap.stores.Memory`, the RAM
  :class:`~kvmap.stores.tensor.TensorMemory`, the Ray-sharded one, a bridge's mapped memory, Gemma's
  windowed view); a wrapper that cannot honour a method refuses it with a one-line ``KVMapError``, and
  delegates the rest explicitly, so nothing falls through to the wrong object. One contract test
  (``tests/test_memory_contract.py``) runs over every implementation.
"""
from __future__ import annotations

import contextlib
import types
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, runtime_checkable

import torch

from kvmap.config import (  # noqa: F401  (re-exported: the import settings ports take)
    OPTION_NAMES, BlockRetrieval, ImportConfig, RetrievalReuse, format_layers, parse_layers)

if TYPE_CHECKING:
    from kvmap.stores.clusters import Probe


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


Recorder = Callable[[int, torch.Tensor, torch.Tensor], None]
"""Called as ``recorder(layer, keys, values)`` with pre-RoPE keys and values of the new tokens,
each of shape (B, n_kv_heads, T, head_dim)."""


@runtime_checkable
class QueryRecorder(Protocol):
    """A recorder that also takes each layer's pre-RoPE queries: the sample a memory's query-aware cluster
    index is built from (:mod:`kvmap.stores.clusters`). Causal LM ports call ``record_queries`` after the
    K/V call; ports without queries to give (ViT) never do."""

    def __call__(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None: ...

    def record_queries(self, layer: int, queries: torch.Tensor) -> None:
        """queries: (B, n_query_heads, T, head_dim), pre-RoPE (after a q-norm, where the model has one)."""


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


@runtime_checkable
class MemoryView(Protocol):
    """What ports read from a memory. Shapes: H = ``layout.n_kv_heads``, d = ``layout.head_dim``; memory ids
    are global (0..n_tokens-1) in reading order, ``-1`` is padding."""

    path: object
    """Where the memory lives (a folder, or a placeholder such as ``"<tensor memory>"``), for messages."""
    model_id: str
    """The model whose K/V these are; ports refuse a memory of another model."""
    layout: KVLayout

    @property
    def n_tokens(self) -> int:
        """Memories held."""

    def search(self, layer: int, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k by inner product with the store's own index: queries (H, M, d) -> scores, ids (H, M, k');
        k' = min(k, n_tokens) or k with ``-inf`` / ``-1`` padding."""

    def search_streamed(self, layer: int, queries: torch.Tensor, k: int,
                        probe: Probe | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k, reading every key once (retrieval reuse's candidates); same shapes as :meth:`search`.
        ``probe``: a file-backed memory may read only the best clusters of its query-aware index instead
        (:mod:`kvmap.stores.clusters`); a memory without one searches exactly."""

    def fetch(self, layer: int, ids: torch.Tensor, release: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (ids.shape + (d,)) of ids (H, ...) (``-1``: zeros). ``release``: a file-backed
        memory drops the pages it read from this process's resident memory."""

    def offsets(self, ids: torch.Tensor) -> torch.Tensor:
        """Token offset of each id inside its document (same shape; ``-1`` for ``-1``)."""

    def entry(self, id: int, score: float = 0.0) -> "MemoryEntry":
        """Provenance of one memory: source, document, offset, text."""

    def token_texts(self) -> list[str]:
        """The text of every memory, in id order."""

    def block_means(self, layer: int, block_size: int) -> torch.Tensor:
        """(H, n_blocks, d) mean key of each block of ``block_size`` consecutive ids."""

    def block_bounds(self, layer: int, block_size: int) -> tuple:
        """Per-channel key min and max of each block: lo, hi (H, n_blocks, d); starts, lengths (n_blocks,)."""


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

    def check_memory(self, memory) -> None:
        """Refuse a memory exported by another model or with another K/V layout (one-line error)."""
        from kvmap.errors import MemoryFormatError

        where = getattr(memory, "path", "<memory>")
        if memory.model_id != self.model_id:
            raise MemoryFormatError(f"memory {where} was made by model '{memory.model_id}', not '{self.model_id}'; "
                                    "use that model or a new --memory folder")
        if memory.layout != self.layout:
            raise MemoryFormatError(f"memory {where} has layout {memory.layout.as_dict()}, the model has "
                                    f"{self.layout.as_dict()}; use the model that made it or a new --memory folder")


class CausalLMPort(MemoryPort):
    """A causal language model's port: what the reader, splicing, timing and the CLI use beyond export and
    import (:class:`kvmap.models.interface.InterfaceMemoryPort` implements it for every causal LM family)."""

    model: torch.nn.Module
    """The model with its LM head (``model(input_ids, cache=...)`` gives logits)."""
    base: torch.nn.Module
    """The decoder without the head (``base(input_ids, cache=...)``), what the reader runs while exporting."""

    @abstractmethod
    def layer_rotary(self, layer: int):
        """The rotary module layer ``layer`` rotates with, callable as ``rotary(x, position_ids) -> cos, sin``."""


@dataclass
class ImportTrace:
    """What an import block retrieved: global memory ids with summed scores, for showing provenance."""

    blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    """Block retrieval: layer -> (Hkv, M) memory ids of the tokens chosen for that layer's KV heads."""
    block_mass: dict[int, torch.Tensor] = field(default_factory=dict)
    """Block retrieval: layer -> (Hkv, n_blocks) attention mass the choosing queries gave each block."""
    keep_shares: bool = False
    """Set it to record, at every forward of token-level import, each query head's share of attention
    that went to memories and the memory it attended most (:attr:`shares`; for diagnosis, it costs a little)."""
    shares: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    """With ``keep_shares``: layer -> one (share (Hq, T) float32, most-attended memory id (Hq, T) int64) per forward."""
    _pending: list = field(default_factory=list, repr=False)
    _pending_size: int = field(default=0, repr=False)
    _hits: dict[int, float] = field(default_factory=dict, repr=False)

    PENDING_LIMIT = 1 << 20
    """Ids held uncounted before they are folded into the counts (bounds memory over long generations)."""

    def record(self, ids: torch.Tensor) -> None:
        """Note retrieved ids; counted lazily (this runs on every decode step), at the latest when
        :data:`PENDING_LIMIT` ids are waiting."""
        self._pending.append(ids)
        self._pending_size += ids.numel()
        if self._pending_size >= self.PENDING_LIMIT:
            self._count()

    def _count(self) -> None:
        if self._pending:
            flat = torch.cat([ids.reshape(-1) for ids in self._pending])
            self._pending.clear()
            self._pending_size = 0
            uniq, counts = torch.unique(flat[flat >= 0], return_counts=True)
            for i, c in zip(uniq.tolist(), counts.tolist()):
                self._hits[i] = self._hits.get(i, 0.0) + c

    @property
    def hits(self) -> dict[int, float]:
        """Memory id -> number of times it was among the top-k (over layers, heads and tokens)."""
        self._count()
        return self._hits

    def top(self, n: int) -> list[tuple[int, float]]:
        return sorted(self.hits.items(), key=lambda kv: -kv[1])[:n]


@dataclass
class PortState:
    """What every port's attention code reads while the port is attached.

    Ports extend it with what their attention needs (:class:`kvmap.models.attend.RetrievalState` for
    causal LMs, which search the memory; :class:`kvmap.models.vit.PatchImportState` for ViTs, which
    import a whole memory), so that these three fields mean the same thing everywhere.
    """

    recorder: Recorder | None = None
    """Receives each layer's exported K/V while exporting; ``None`` otherwise."""
    memory: object | None = None
    """The memory imported from (a :class:`MemoryView`, or a ViT's tensor memory); ``None`` while exporting."""
    trace: ImportTrace = field(default_factory=ImportTrace)
    """What the import block retrieved, for provenance."""


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield
