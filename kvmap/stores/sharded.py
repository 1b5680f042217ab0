"""A memory whose search runs in Ray actors, one shard of segments each, searched in parallel.

Each actor opens the same memory folder (a shared filesystem on a cluster) and searches only its
own segments, with the store's index (``search``) or exactly, streamed (``search_streamed``, what
retrieval reuse picks its candidates with); the caller merges the shards' top-k. Everything else
(``fetch``, texts, offsets, block summaries) reads the memory-mapped folder locally, so only queries
and top-k ids cross process boundaries. Every method of :class:`kvmap.ports.MemoryView` is written
out here (no fall-through); ``writer`` and ``forget`` are not offered: a sharded memory is read-only::

    memory = ShardedMemory("mem/", n_shards=4)                 # ray.init() locally
    memory = ShardedMemory("mem/", n_shards=16, address="ray://head:10001")   # a Ray cluster
    with port.importing(memory, ImportConfig()):
        ...

Segments are the unit of sharding (one per remembered file or ingest chunk), dealt round-robin.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from kvmap.errors import InputError
from kvmap.stores.memory import Memory


def _ray():
    try:
        import ray
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError("the sharded store needs Ray: pip install 'kvmap[ray]' (or pip install ray)") from None
    return ray


class _Shard:
    """A Ray actor's state: the memory, opened in the actor's process, and its segments."""

    def __init__(self, path: str, segments: list[int]):
        torch.set_num_threads(1)  # one core per shard: shards run side by side
        self.memory = Memory.open(path, verify=False)  # the driver verified the files once
        self.segments = segments

    def search(self, layer: int, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.memory.search(layer, queries, k, segments=self.segments)

    def search_streamed(self, layer: int, queries: torch.Tensor, k: int,
                        probe=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.memory.search_streamed(layer, queries, k, segments=self.segments, probe=probe)


class ShardedMemory:
    """A :class:`~kvmap.stores.memory.Memory` whose ``search`` is split over Ray actors.

    Parameters
    ----------
    path : the memory folder (every Ray node must see it at this path)
    n_shards : number of actors; at most the number of segments
    address : a Ray cluster's address; ``None`` starts (or joins) a local Ray
    expect_model_id, expect_layout : refuse a memory made by another model, as ``Memory.open``
    cpus_per_shard : Ray CPUs each actor reserves (below 1 packs several shards on one core)
    """

    def __init__(self, path: str | os.PathLike, n_shards: int = 2, address: str | None = None,
                 expect_model_id: str | None = None, expect_layout=None, cpus_per_shard: float = 1.0):
        self.local = Memory.open(path, expect_model_id=expect_model_id, expect_layout=expect_layout)
        n_segments = self.local.n_segments
        if n_shards < 1:
            raise InputError(f"n_shards must be at least 1, got {n_shards}")
        if n_segments == 0:
            raise InputError(f"memory {path} is empty; remember something before sharding it")
        n_shards = min(n_shards, n_segments)
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({} if address else {"num_cpus": max(n_shards, os.cpu_count() or 1)}))
        # Ray waits forever for an actor it has no CPUs for: refuse up front instead.
        cpus = ray.available_resources().get("CPU", 0)  # free now: CPUs other actors hold do not count
        if n_shards * cpus_per_shard > cpus:
            raise InputError(f"{n_shards} shards x {cpus_per_shard} CPUs exceed the {cpus:g} CPUs Ray has free; "
                             "use fewer shards, a smaller cpus_per_shard, or close() other sharded memories")
        actor = ray.remote(num_cpus=cpus_per_shard)(_Shard)
        folder = str(Path(path).resolve())
        self.shards = [actor.remote(folder, list(range(i, n_segments, n_shards))) for i in range(n_shards)]
        self._ray = ray

    @property
    def path(self):
        return self.local.path

    @property
    def model_id(self) -> str:
        return self.local.model_id

    @property
    def layout(self):
        return self.local.layout

    @property
    def n_tokens(self) -> int:
        return self.local.n_tokens

    @property
    def n_segments(self) -> int:
        return self.local.n_segments

    def search(self, layer: int, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k over all shards: each shard's top-k, merged. Same contract as ``Memory.search``."""
        return self._merged("search", layer, queries, k)

    def search_streamed(self, layer: int, queries: torch.Tensor, k: int,
                        probe=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k over all shards, each streaming its own segments' keys (or probing their clusters).
        Same contract as ``Memory.search_streamed``; the candidates retrieval reuse picks are the single process's."""
        return self._merged("search_streamed", layer, queries, k, probe)

    def _merged(self, method: str, layer: int, queries: torch.Tensor, k: int,
                *extra) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.shards:
            raise InputError("this sharded memory was closed; open a new ShardedMemory")
        device = queries.device
        q = queries.detach().to("cpu", torch.float32).contiguous()
        parts = self._ray.get([getattr(shard, method).remote(layer, q, k, *extra) for shard in self.shards])
        scores = torch.cat([s for s, _ in parts], dim=-1)  # (H, M, k' * n_shards)
        ids = torch.cat([i for _, i in parts], dim=-1)
        if len(parts) > 1:
            scores, pick = scores.topk(min(k, scores.shape[-1]), dim=-1)
            ids = ids.gather(-1, pick)
        return scores.to(device), ids.to(device)

    def fetch(self, layer: int, ids: torch.Tensor, release: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.local.fetch(layer, ids, release)

    def offsets(self, ids: torch.Tensor) -> torch.Tensor:
        return self.local.offsets(ids)

    def entry(self, id: int, score: float = 0.0):
        return self.local.entry(id, score)

    def token_texts(self) -> list[str]:
        return self.local.token_texts()

    def token_ids(self):
        return self.local.token_ids()

    def sources(self) -> list[dict]:
        return self.local.sources()

    def block_means(self, layer: int, block_size: int) -> torch.Tensor:
        return self.local.block_means(layer, block_size)

    def block_bounds(self, layer: int, block_size: int):
        return self.local.block_bounds(layer, block_size)

    def writer(self, source: str, replace: bool = False):
        self._read_only("writer")

    def forget(self, source: str) -> int:
        self._read_only("forget")

    @staticmethod
    def _read_only(name: str):
        # the shards would keep the old segments and id numbering
        raise InputError(f"a sharded memory is read-only; {name} through Memory.open(path), then shard it again")

    def close(self) -> None:
        """Stop the shard actors (Ray itself stays up for other work)."""
        for shard in self.shards:
            self._ray.kill(shard)
        self.shards = []
