"""Where each memory token came from: its text, its document and its offset, looked up by memory id.

A memory's ids run through its segments in order (segment ``s`` holds ids ``bases[s]`` onwards); each
segment keeps its tokens' document ids, offsets and texts beside the keys (:class:`Segment.tokens`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kvmap.errors import InputError
from kvmap.ports import MemoryEntry
from kvmap.stores.segment import Segment


def sources(segments: Sequence[Segment]) -> list[dict]:
    """One dict per source, in the order first remembered: source, n_tokens, n_docs."""
    out: dict[str, dict] = {}
    for seg in segments:
        row = out.setdefault(seg.source, {"source": seg.source, "n_tokens": 0, "n_docs": 0})
        row["n_tokens"] += seg.n_tokens
        row["n_docs"] += seg.n_docs
    return list(out.values())


def token_texts(segments: Sequence[Segment]) -> list[str]:
    """The text of every memory token, in id (reading) order."""
    return [text for seg in segments for text in seg.texts()]


def _token_column(segments: Sequence[Segment], column: str) -> np.ndarray:
    """(n_tokens,) int64: one column of the segments' tokens.npz, in id (reading) order."""
    parts = [seg.tokens()[column] for seg in segments]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def token_ids(segments: Sequence[Segment]) -> np.ndarray:
    """(n_tokens,) int64: every memory token's vocabulary id, in id (reading) order."""
    return _token_column(segments, "token_ids")


def token_offsets(segments: Sequence[Segment]) -> np.ndarray:
    """(n_tokens,) int64: every memory token's offset in its document, in id order."""
    return _token_column(segments, "offsets")


def offsets_of(offsets: np.ndarray, ids: np.ndarray) -> torch.Tensor:
    """Offsets (int64) of ``ids`` (flat, already range-checked), ``-1`` where the id is ``-1``."""
    picked = offsets[np.clip(ids, 0, None)] if len(offsets) else -1
    return torch.from_numpy(np.asarray(np.where(ids >= 0, picked, -1), dtype=np.int64))


def entry(segments: Sequence[Segment], bases: np.ndarray, n_tokens: int, id: int, score: float) -> MemoryEntry:
    """Provenance of memory ``id``: source, document, offset and text; InputError if out of range."""
    id = int(id)
    if not 0 <= id < n_tokens:
        held = f"out of range 0..{n_tokens - 1}" if n_tokens else "not there: the memory is empty"
        raise InputError(f"memory id {id} is {held}")
    s = int(np.searchsorted(bases, id, side="right") - 1)
    seg, local = segments[s], id - int(bases[s])
    tokens = seg.tokens()
    return MemoryEntry(source=seg.source, doc_id=int(tokens["doc_ids"][local]),
                       offset=int(tokens["offsets"][local]), text=seg.texts()[local], score=float(score))
