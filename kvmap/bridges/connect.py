"""``bridge = connect(llm, vision_model)``: two models that import each other's K/V through adapters.

Inside ``with bridge:`` both models export what they read into the bridge, and each imports
what the other has exported so far, mapped by the adapter for that direction::

    bridge = connect(llm, limb, a_to_b="llm-to-limb.safetensors")
    with bridge:
        llm.model(instruction_ids)        # the LLM reads "touch the red ball"; its K/V are kept
        angles = limb(image, no_target)   # the limb model attends to them through the adapter
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvmap.bridges.adapters import KV, KVAdapter
from kvmap.errors import InputError
from kvmap.ports import ImportConfig, MemoryPort
from kvmap.stores.tensor import TensorMemory

ALL_ENTRIES = 1 << 20
"""top_k that imports every bridged entry (a source exports tens to hundreds of tokens)."""


def as_port(model) -> MemoryPort:
    """The MemoryPort of a port, a loaded LLM (``.port``), a model with ``.port()`` (LimbPolicy) or an HF model."""
    if isinstance(model, MemoryPort):
        return model
    port = getattr(model, "port", None)
    if isinstance(port, MemoryPort):
        return port
    if callable(port):
        return port()
    from kvmap.models import port_for

    return port_for(model, getattr(model, "name_or_path", "unknown"))


@dataclass
class _Exports:
    """What one side exported inside the bridge: layer -> (keys, values), (B, H, T, d), appended per forward."""

    kv: KV = field(default_factory=dict)
    version: int = 0

    def record(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if layer in self.kv:
            keys = torch.cat([self.kv[layer][0], keys], dim=2)
            values = torch.cat([self.kv[layer][1], values], dim=2)
        self.kv[layer] = (keys, values)
        self.version += 1


class BridgedMemory:
    """The memory one side imports: the other side's exports through the adapter, mapped on demand."""

    path = "<bridge>"

    def __init__(self, adapter: KVAdapter, exports: _Exports, port: MemoryPort):
        self.adapter, self.exports = adapter, exports
        self.layout, self.model_id = port.layout, port.model_id
        self._mapped: tuple[int, TensorMemory] | None = None

    def _memory(self) -> TensorMemory:
        if self._mapped is None or self._mapped[0] != self.exports.version:
            source = {s: self.exports.kv[s] for s in self.adapter.source_layers if s in self.exports.kv}
            kv = self.adapter(source) if len(source) == len(self.adapter.source_layers) else {}
            self._mapped = (self.exports.version, TensorMemory(self.layout, self.model_id, kv))
        return self._mapped[1]

    @property
    def n_tokens(self) -> int:
        return self._memory().n_tokens

    # The MemoryView, each method delegated to the mapped TensorMemory (mapped again when the source
    # has exported more).

    def kv(self, layer: int):
        return self._memory().kv(layer)

    def search(self, layer: int, queries: torch.Tensor, k: int):
        return self._memory().search(layer, queries, k)

    def search_streamed(self, layer: int, queries: torch.Tensor, k: int, probe=None):
        return self._memory().search_streamed(layer, queries, k, probe=probe)

    def fetch(self, layer: int, ids: torch.Tensor, release: bool = False):
        return self._memory().fetch(layer, ids, release)

    def offsets(self, ids: torch.Tensor) -> torch.Tensor:
        return self._memory().offsets(ids)

    def entry(self, id: int, score: float = 0.0):
        return self._memory().entry(id, score)

    def token_texts(self) -> list[str]:
        return self._memory().token_texts()

    def block_means(self, layer: int, block_size: int) -> torch.Tensor:
        return self._memory().block_means(layer, block_size)

    def block_bounds(self, layer: int, block_size: int):
        return self._memory().block_bounds(layer, block_size)


def import_config(adapter: KVAdapter, distance: int = 4096) -> ImportConfig:
    """Every bridged entry, in the adapter's target layers, at position 0 with queries ``distance`` ahead."""
    return ImportConfig.from_options(top_k=ALL_ENTRIES, distance=distance, placement="fixed", layers=tuple(adapter.target_layers))


class Bridge:
    """Two ports and the adapters between them; a reusable context manager (see module docstring).

    Parameters
    ----------
    a, b : the two models' ports
    a_to_b : adapter mapping a's exports into b (``None``: b imports nothing)
    b_to_a : adapter mapping b's exports into a (``None``: a imports nothing)
    distance : how far behind a text model's queries bridged entries sit (RoPE models)
    """

    def __init__(self, a: MemoryPort, b: MemoryPort, a_to_b: KVAdapter | None = None,
                 b_to_a: KVAdapter | None = None, distance: int = 4096):
        for adapter, src, dst in ((a_to_b, a, b), (b_to_a, b, a)):
            if adapter is not None and (adapter.source != src.layout or adapter.target != dst.layout):
                raise InputError(f"adapter maps {adapter.source} -> {adapter.target}, but the models are "
                                 f"{src.layout} -> {dst.layout}; train an adapter for these models")
        self.a, self.b, self.a_to_b, self.b_to_a, self.distance = a, b, a_to_b, b_to_a, distance
        self.exports = {"a": _Exports(), "b": _Exports()}
        self._stack: contextlib.ExitStack | None = None

    def clear(self) -> None:
        """Forget what both sides exported (start a new episode)."""
        if self._stack is not None:
            raise InputError("clear() a bridge outside its `with` block")
        self.exports = {"a": _Exports(), "b": _Exports()}

    def __enter__(self) -> "Bridge":
        if self._stack is not None:
            raise InputError("this bridge is already open; nest nothing, use one `with bridge:` block")
        stack = contextlib.ExitStack()
        try:
            for port, own, other, adapter in ((self.a, "a", "b", self.b_to_a), (self.b, "b", "a", self.a_to_b)):
                record = self.exports[own].record
                if adapter is None:
                    stack.enter_context(port.exporting(record))
                else:
                    memory = BridgedMemory(adapter, self.exports[other], port)
                    stack.enter_context(port.importing(memory, import_config(adapter, self.distance), recorder=record))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        stack.close()

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Write the adapters alone (``a_to_b.safetensors``, ``b_to_a.safetensors``) into ``folder``."""
        folder = Path(folder)
        return [adapter.save(folder / f"{name}.safetensors")
                for name, adapter in (("a_to_b", self.a_to_b), ("b_to_a", self.b_to_a)) if adapter is not None]


def _adapter(spec, src: MemoryPort, dst: MemoryPort) -> KVAdapter | None:
    if spec is None or isinstance(spec, KVAdapter):
        return spec
    if spec == "identity":
        if src.layout != dst.layout:
            raise InputError("an identity adapter needs two models with the same K/V layout")
        return KVAdapter.identity(src.layout, dst.model_id)
    if spec == "random":
        return KVAdapter(src.layout, dst.layout, source_id=src.model_id, target_id=dst.model_id)
    return KVAdapter.load(spec, source_id=src.model_id, target_id=dst.model_id)


def connect(a, b, a_to_b=None, b_to_a=None, distance: int = 4096) -> Bridge:
    """Bridge two models (ports, loaded LLMs, LimbPolicy or HF models).

    ``a_to_b`` / ``b_to_a``: a :class:`KVAdapter`, a saved adapter file, ``"identity"``,
    ``"random"`` (untrained, a baseline) or ``None`` (that direction imports nothing).
    """
    pa, pb = as_port(a), as_port(b)
    return Bridge(pa, pb, _adapter(a_to_b, pa, pb), _adapter(b_to_a, pb, pa), distance)
