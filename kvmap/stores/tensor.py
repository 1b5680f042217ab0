"""An in-RAM memory of K/V tensors that stays differentiable: what bridges hand a target model.

A :class:`~kvmap.stores.memory.Memory` folder is for text a model read and keeps; a
``TensorMemory`` is for K/V computed on the fly (a source model's export mapped through an
adapter), where gradients must flow from the target's loss back into the adapter. It speaks the
same interface the ports read (``search``, ``fetch``, ``block_means``, ``offsets``), plus
:meth:`kv` for ports that attend to every entry (the ViT port).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

from kvmap.errors import InputError
from kvmap.ports import KVLayout, MemoryEntry, MemoryPort


class TensorMemory:
    """Per-layer keys and values, each of shape (B, H, M, d), kept as given (gradients included).

    Parameters
    ----------
    layout : the K/V layout of the model that will import these entries
    model_id : identity a port checks on import (a bridge uses the target's id)
    kv : layer -> (keys, values); layers missing from the dict import nothing
    """

    path = "<tensor memory>"

    def __init__(self, layout: KVLayout, model_id: str, kv: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 texts: list[str] | None = None):
        self.layout, self.model_id, self._texts = layout, model_id, texts
        self._kv = {}
        for layer, (k, v) in kv.items():
            want = (layout.n_kv_heads, layout.head_dim)
            if k.dim() != 4 or (k.shape[1], k.shape[3]) != want or k.shape != v.shape:
                raise InputError(f"layer {layer}: keys/values must be (B, {want[0]}, M, {want[1]}), "
                                 f"got {tuple(k.shape)} and {tuple(v.shape)}")
            self._kv[layer] = (k, v)
        sizes = {k.shape[2] for k, _ in self._kv.values()}
        if len(sizes) > 1:
            raise InputError(f"every layer must hold the same number of entries, got {sorted(sizes)}")
        self.n_tokens = sizes.pop() if sizes else 0
        if texts is not None and len(texts) != self.n_tokens:
            raise InputError(f"texts must give one string per entry ({self.n_tokens}), got {len(texts)}")

    @classmethod
    def of_tokens(cls, memory, ids: torch.Tensor) -> "TensorMemory":
        """The K/V and text of some tokens of ``memory`` (a folder or another TensorMemory), ids (M,) in
        reading order, as an in-RAM memory whose entry i is ``ids[i]``: token import restricted to them
        (e.g. to the passages BM25 ranks best for a question) reads them as it reads a whole memory. Their
        offsets are the entry indices, so reading order holds (``ordered`` placement) but ``true`` placement
        would put them at 0..M-1, not at their document positions."""
        layout, n_kv = memory.layout, memory.layout.n_kv_heads
        heads = ids.reshape(1, -1).expand(n_kv, -1)  # (Hkv, M): every KV head reads the same tokens
        kv = {}
        for layer in range(layout.n_layers):
            keys, values = memory.fetch(layer, heads)  # (Hkv, M, d) each
            kv[layer] = (keys[None], values[None])  # (1, Hkv, M, d)
        texts = memory.token_texts()
        return cls(layout, memory.model_id, kv, texts=[texts[i] for i in ids.tolist()])

    @property
    def layers(self) -> list[int]:
        return sorted(self._kv)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys, values), each (B, H, M, d), or ``None`` where this layer imports nothing."""
        return self._kv.get(layer)

    def _first(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._kv:  # a port asks only for layers it imports; empty for the others
            h, d = self.layout.n_kv_heads, self.layout.head_dim
            empty = torch.zeros(h, 0, d)
            return empty, empty
        k, v = self._kv[layer]
        if k.shape[0] != 1:
            raise InputError("search/fetch read one sequence's memory; this TensorMemory holds a batch")
        return k[0], v[0]  # (H, M, d)

    def search(self, layer: int, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k by inner product: queries (H, Q, d) -> scores, ids (H, Q, k'), k' = min(k, M).
        Not differentiable (the choice is discrete; gradients reach queries through the attention over
        what :meth:`fetch` returns), so a training step keeps no (H, Q, M) score graph."""
        keys, _ = self._first(layer)
        scores = torch.einsum("hqd,hmd->hqm", queries.detach().float(), keys.detach().float())
        return scores.topk(min(k, keys.shape[1]), dim=-1)

    def search_streamed(self, layer: int, queries: torch.Tensor, k: int,
                        probe=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The same exact search (the entries are in RAM already; there is no cluster index to ``probe``)."""
        return self.search(layer, queries, k)

    def fetch(self, layer: int, ids: torch.Tensor, release: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (ids.shape + (d,)) of ids (H, ...); differentiable in the stored tensors.
        ``release`` is for file-backed memories; these tensors stay in RAM."""
        keys, values = self._first(layer)
        h, d = keys.shape[0], keys.shape[-1]
        if ids.shape[0] != h:
            raise InputError(f"ids must have the {h} KV heads as first dimension, got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.max()) >= keys.shape[1] or int(ids.min()) < -1):
            raise InputError(f"memory ids must be -1 or in 0..{keys.shape[1] - 1}")
        flat = ids.clamp(min=0).reshape(h, -1, 1).expand(-1, -1, d)  # (H, P, d); -1 reads entry 0, zeroed below
        keep = (ids >= 0).reshape(*ids.shape, 1).to(keys.dtype)
        return (keys.gather(1, flat).reshape(*ids.shape, d) * keep, values.gather(1, flat).reshape(*ids.shape, d) * keep)

    def block_means(self, layer: int, block_size: int) -> torch.Tensor:
        keys, _ = self._first(layer)
        chunks = keys.detach().float().split(block_size, dim=1)
        return torch.stack([c.mean(1) for c in chunks], dim=1)  # (H, n_blocks, d)

    def block_bounds(self, layer: int, block_size: int):
        """Per-channel key min/max of each block, as :meth:`kvmap.stores.Memory.block_bounds` returns them."""
        keys, _ = self._first(layer)
        chunks = keys.detach().float().split(block_size, dim=1)
        lo = torch.stack([c.amin(1) for c in chunks], dim=1)  # (H, n_blocks, d)
        hi = torch.stack([c.amax(1) for c in chunks], dim=1)
        starts = np.arange(0, keys.shape[1], block_size, dtype=np.int64)
        return lo, hi, starts, np.minimum(block_size, keys.shape[1] - starts)

    def offsets(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.clone()

    def token_texts(self) -> list[str]:
        return list(self._texts) if self._texts is not None else [f"<entry {i}>" for i in range(self.n_tokens)]

    def entry(self, id: int, score: float = 0.0) -> MemoryEntry:
        """Provenance of entry ``id``: its index, and its text where the memory was given texts."""
        if not 0 <= int(id) < self.n_tokens:
            raise InputError(f"memory id {id} is out of range 0..{self.n_tokens - 1}")
        text = self._texts[int(id)] if self._texts is not None else f"<entry {int(id)}>"
        return MemoryEntry(source=self.path, doc_id=0, offset=int(id), text=text, score=float(score))


@contextlib.contextmanager
def recording(port: MemoryPort, layers: list[int] | None = None) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Collect what ``port``'s model exports inside the block: layer -> (keys, values), (B, H, T, d).

    Later forwards append along T. Gradients are kept, so a loss can reach a trainable source.
    """
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if layers is not None and layer not in layers:
            return
        if layer in kv:
            k, v = torch.cat([kv[layer][0], k], dim=2), torch.cat([kv[layer][1], v], dim=2)
        kv[layer] = (k, v)

    with port.exporting(record):
        yield kv
