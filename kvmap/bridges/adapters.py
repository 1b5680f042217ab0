"""Learned linear maps from one model's exported K/V to another model's K and V spaces.

For every target layer the adapter reads the K/V of a few chosen source layers (all their KV
heads, keys and values concatenated, token by token) and maps them with two linear layers to
the target's keys and values for all its KV heads. Each source token becomes one target memory
entry, so the target attends to the source's tokens as if it had read them itself.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from einops import rearrange
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from kvmap.errors import InputError, MemoryFormatError
from kvmap.fileio import write_bytes_atomic
from kvmap.ports import KVLayout

KV = dict[int, tuple[torch.Tensor, torch.Tensor]]
"""layer -> (keys, values), each (B, H, M, d)."""


def same_depth_pairs(source: KVLayout, target: KVLayout, target_layers: list[int] | None = None) -> dict[int, tuple[int, ...]]:
    """Each target layer reads the one source layer at the same relative depth."""
    layers = range(target.n_layers) if target_layers is None else target_layers
    scale = (source.n_layers - 1) / max(target.n_layers - 1, 1)
    return {t: (round(t * scale),) for t in layers}


class KVAdapter(nn.Module):
    """Per target layer: source K/V (chosen layers, all heads) -> target keys and values.

    Parameters
    ----------
    source, target : K/V layouts of the exporting and the importing model
    pairs : target layer -> source layers it reads; default :func:`same_depth_pairs`
    source_id, target_id : model identities, checked when the adapter is loaded or used
    """

    def __init__(self, source: KVLayout, target: KVLayout, pairs: dict[int, tuple[int, ...]] | None = None,
                 source_id: str = "source", target_id: str = "target"):
        super().__init__()
        self.source, self.target = source, target
        self.pairs = {int(t): tuple(int(s) for s in ss) for t, ss in (pairs or same_depth_pairs(source, target)).items()}
        self.source_id, self.target_id = source_id, target_id
        for t, ss in self.pairs.items():
            if not 0 <= t < target.n_layers or any(not 0 <= s < source.n_layers for s in ss):
                raise InputError(f"adapter pair {t} <- {ss} is outside the layouts {source} -> {target}")
        per_layer = 2 * source.n_kv_heads * source.head_dim  # keys and values of all source heads
        out = target.n_kv_heads * target.head_dim
        self.key = nn.ModuleDict({str(t): nn.Linear(len(ss) * per_layer, out) for t, ss in self.pairs.items()})
        self.value = nn.ModuleDict({str(t): nn.Linear(len(ss) * per_layer, out) for t, ss in self.pairs.items()})

    @property
    def source_layers(self) -> list[int]:
        """Source layers any target layer reads (what the source must export)."""
        return sorted({s for ss in self.pairs.values() for s in ss})

    @property
    def target_layers(self) -> list[int]:
        return sorted(self.pairs)

    def forward(self, source_kv: KV) -> KV:
        """Map source exports (layer -> (B, Hs, M, ds) pair) to target entries (layer -> (B, Ht, M, dt) pair)."""
        missing = [s for s in self.source_layers if s not in source_kv]
        if missing:
            raise InputError(f"the source exported no K/V for layers {missing}; export them (or change the pairs)")
        features = {s: torch.cat([rearrange(source_kv[s][0], "b h m d -> b m (h d)"),
                                  rearrange(source_kv[s][1], "b h m d -> b m (h d)")], dim=-1)
                    for s in self.source_layers}  # (B, M, 2*Hs*ds) per source layer
        out: KV = {}
        for t, ss in self.pairs.items():
            x = torch.cat([features[s] for s in ss], dim=-1)  # (B, M, in)
            keys = rearrange(self.key[str(t)](x), "b m (h d) -> b h m d", h=self.target.n_kv_heads)
            values = rearrange(self.value[str(t)](x), "b m (h d) -> b h m d", h=self.target.n_kv_heads)
            out[t] = (keys, values)
        return out

    @classmethod
    def identity(cls, layout: KVLayout, model_id: str = "model", layers: list[int] | None = None) -> "KVAdapter":
        """The adapter from a model to itself that hands every layer its own K/V unchanged."""
        layers = list(range(layout.n_layers)) if layers is None else layers
        adapter = cls(layout, layout, {t: (t,) for t in layers}, model_id, model_id)
        n = layout.n_kv_heads * layout.head_dim
        eye = torch.eye(n)
        with torch.no_grad():
            for t in layers:
                # input features are [keys (n), values (n)]: keys read the first half, values the second
                adapter.key[str(t)].weight.copy_(torch.cat([eye, torch.zeros(n, n)], dim=1))
                adapter.value[str(t)].weight.copy_(torch.cat([torch.zeros(n, n), eye], dim=1))
                adapter.key[str(t)].bias.zero_()
                adapter.value[str(t)].bias.zero_()
        return adapter

    # -- persistence: the adapter alone, never the models ------------------------------------

    def config(self) -> dict:
        return {"source": self.source.as_dict(), "target": self.target.as_dict(),
                "pairs": {str(t): list(ss) for t, ss in self.pairs.items()},
                "source_id": self.source_id, "target_id": self.target_id}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (a .safetensors file: weights, with the layouts and pairs in its metadata), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.state_dict().items()}
        write_bytes_atomic(path, safetensors_bytes(tensors, metadata={"kvmap_adapter": json.dumps(self.config())}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, source_id: str | None = None, target_id: str | None = None) -> "KVAdapter":
        """Read an adapter saved by :meth:`save`; refuse one made for other models (one-line error)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no adapter file at {path}; train one with `kvmap bridge train`")
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["kvmap_adapter"])
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
            raise MemoryFormatError(f"{path} is not a kvmap adapter file ({type(err).__name__}); train or copy it again") from None
        for want, key in ((source_id, "source_id"), (target_id, "target_id")):
            if want is not None and meta[key] != want:
                raise MemoryFormatError(f"adapter {path} maps {meta['source_id']} -> {meta['target_id']}, "
                                        f"not the {key.split('_')[0]} '{want}'; train one for these models")
        adapter = cls(KVLayout(**meta["source"]), KVLayout(**meta["target"]),
                      {int(t): tuple(ss) for t, ss in meta["pairs"].items()}, meta["source_id"], meta["target_id"])
        adapter.load_state_dict(load_file(str(path)))
        return adapter
