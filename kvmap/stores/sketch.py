"""An int8 copy of a segment's keys in cluster order: the probed search reads a few contiguous slices.

A cluster's members are spread over the whole segment (k-means does not follow reading order), so reading
the keys of a query's clusters from ``k<layer>.bin`` touches nearly every page of the file: at a million
tokens the probed search was bound by page faults, not arithmetic. This file holds each (layer, KV head)'s
keys again, sorted by cluster (the order of :attr:`~kvmap.stores.clusters.LayerClusters.members`), so a
cluster is one contiguous slice, and at int8 with one float16 scale per key (``key ~ code * scale``, error
at most ``scale / 2`` per channel): half the bytes of the float16 keys.

The copy only *chooses* candidates: the keys and values a layer imports are always read from the segment's
own files (which ``verify`` checksums), so a damaged copy can make a search choose worse, never import
wrong data. A full checksum would cost more at each open than the search saves, so a copy is checked by
size and by spot checks of keys against the segment's own (a copy built for other clusters or another
segment fails them) and built again when it fails.

File ``sketch-v1-d<distance>-c<size>.bin`` beside the segment: int8 codes (L, H, n, d), then float16
scales (L, H, n).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kvmap.fileio import atomic_writer

VERSION = 1
"""Bumped when the layout or the quantisation changes: files of other versions are never read."""
SPOT_CHECKS = 64
"""Keys compared with the segment's own on each open."""


def file_name(distance: int, cluster_size: int) -> str:
    return f"sketch-v{VERSION}-d{distance}-c{cluster_size}.bin"


def quantize(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (n, d) -> int8 codes (n, d) and float16 scales (n,), ``code * scale`` within ``scale / 2``."""
    x = np.asarray(keys, np.float32)
    scale = (np.abs(x).max(axis=-1) / 127).astype(np.float16).astype(np.float32)  # rounded first: codes match it
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return codes, scale.astype(np.float16)


def build(folder: Path, distance: int, cluster_size: int, layers: list, keys_of, n_tokens: int, n_heads: int,
          d: int) -> None:
    """Write the copy of every layer's keys (``keys_of(layer)``: (n, H, d)) in ``layers``' cluster order.

    Written to a temporary file beside its place and renamed over it: a reader sees the old copy or the new one."""
    n_layers = len(layers)
    scales = np.empty((n_layers, n_heads, n_tokens), np.float16)
    with atomic_writer(folder / file_name(distance, cluster_size)) as f:
        for layer, lc in enumerate(layers):
            keys = np.asarray(keys_of(layer))  # (n, H, d)
            for h in range(n_heads):
                codes, scales[layer, h] = quantize(keys[lc.members[h], h])  # (n, d) in cluster order
                f.write(codes.tobytes())
        f.write(scales.tobytes())


def load(folder: Path, distance: int, cluster_size: int, layers: list, keys_of, n_tokens: int, n_heads: int,
         d: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Memory-maps of the copy's codes (L, H, n, d) int8 and scales (L, H, n) float16, or None when the file
    is missing, of the wrong size, or fails a spot check against ``keys_of(layer)`` (n, H, d)."""
    path = folder / file_name(distance, cluster_size)
    n_layers = len(layers)
    shape = (n_layers, n_heads, n_tokens)
    code_bytes = n_layers * n_heads * n_tokens * d
    try:
        if path.stat().st_size != code_bytes + 2 * n_layers * n_heads * n_tokens:
            return None
        codes = np.memmap(path, np.int8, "r", shape=shape + (d,)) if n_tokens else np.zeros(shape + (d,), np.int8)
        scales = np.memmap(path, np.float16, "r", offset=code_bytes, shape=shape) if n_tokens \
            else np.zeros(shape, np.float16)
    except (OSError, ValueError):
        return None
    rng = np.random.default_rng(n_tokens)
    for _ in range(SPOT_CHECKS if n_tokens else 0):
        layer, h, row = int(rng.integers(n_layers)), int(rng.integers(n_heads)), int(rng.integers(n_tokens))
        key = np.asarray(keys_of(layer)[layers[layer].members[h, row], h], np.float32)  # (d,)
        scale = float(scales[layer, h, row])
        if not np.all(np.abs(codes[layer, h, row].astype(np.float32) * scale - key) <= scale * 0.5001 + 1e-6):
            return None
    return codes, scales
