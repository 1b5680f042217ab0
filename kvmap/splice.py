"""Splice remembered blocks into a prompt: stored K/V placed where a text context would go.

Token-level import (the seed's method) adds the top-k memories of every query to attention, at a
fixed distance behind it. For questions about a story that loses: measured on FairytaleQA, the
retrieved tokens come from everywhere and the answer takes on the tales' voice, not their facts.
Splicing is the block-level alternative that worked best there:

1. choose: BM25 between the question and each block's remembered text (:func:`bm25_blocks`, the
   default: it found the answer's passage far more often), or attention (:func:`choose_blocks`):
   one forward of the prompt (without context) scores blocks by the softmax mass the question
   tokens' queries give each block's mean key, summed over every layer and KV head; either way
   the same blocks go to every layer, as text would;
2. splice: the prompt up to its context slot is prefilled, the chosen blocks' stored pre-RoPE K/V
   are rotated to the next positions and appended to the cache, and the rest of the prompt (the
   question) is read after them, like a cached document reused in a new prompt.
"""
from __future__ import annotations

import numpy as np
import torch

from kvmap.ports import ImportConfig, MemoryPort


def block_mass(port: MemoryPort, memory, prompt_ids: list[int], config: ImportConfig, select_last: int = 0) -> torch.Tensor:
    """(n_blocks,) softmax mass the prompt's (last ``select_last``) queries give each memory block,
    summed over every layer, KV head and query."""
    block_size = config.blocks.size if config.blocks else 64
    cfg = config.with_options(block_size=block_size, select_last=select_last, fixed_blocks=None, reuse=0)
    with torch.no_grad(), port.importing(memory, cfg) as trace:
        port.model(torch.tensor(prompt_ids)[None], use_cache=False)
    return torch.stack([m.sum(0) for m in trace.block_mass.values()]).sum(0)


def choose_blocks(port: MemoryPort, memory, prompt_ids: list[int], config: ImportConfig,
                  select_last: int = 0, contrast: tuple[list[int], int] | None = None) -> torch.Tensor:
    """Memory ids (M,) of the ``config.n_blocks`` blocks the prompt's queries weight most, in reading order.

    ``select_last``: only the last this many prompt tokens' queries vote (e.g. the question's).
    ``contrast``: (prompt ids, select_last) of a neutral question; the mass it gives each block is
    subtracted, so blocks every question attends to (sink-like, generic) stop winning.
    """
    block_size = config.blocks.size if config.blocks else 64
    n_blocks_wanted = config.blocks.n_blocks if config.blocks else 8
    mass = block_mass(port, memory, prompt_ids, config, select_last)
    if contrast is not None:
        mass = mass - block_mass(port, memory, contrast[0], config, contrast[1])
    return block_tokens(top_blocks(mass, n_blocks_wanted, block_size, memory.n_tokens), block_size, memory.n_tokens)


def top_blocks(mass: torch.Tensor, n_blocks_wanted: int, block_size: int, n_tokens: int) -> list[int]:
    """Indices of the ``n_blocks_wanted`` blocks with the most mass (n_blocks,), in reading order."""
    mass = mass.clone()
    n_blocks = mass.shape[0]
    if n_tokens % block_size and n_blocks > n_blocks_wanted:
        mass[-1] = float("-inf")  # a short last block would make the count uneven between choices
    return sorted(mass.topk(min(n_blocks_wanted, n_blocks)).indices.tolist())


def bm25_blocks(memory, question: str, block_size: int = 64, n_blocks: int = 8, neighbours: int = 0,
                in_view: list[str] = (), stride: int = 0, following: int = 0) -> torch.Tensor:
    """Memory ids (M,) of the blocks :func:`bm25_block_ids` chooses, in reading order (empty if none)."""
    ids = bm25_block_ids(memory, question, block_size, n_blocks, neighbours, in_view, stride, following)
    return block_tokens(ids, block_size, memory.n_tokens, stride) if ids else torch.zeros(0, dtype=torch.long)


def bm25_block_ids(memory, question: str, block_size: int = 64, n_blocks: int = 8, neighbours: int = 0,
                   in_view: list[str] = (), stride: int = 0, following: int = 0) -> list[int]:
    """Indices of the ``n_blocks`` blocks whose text BM25 ranks best for ``question``, in reading order.

    ``stride``: blocks start every ``stride`` tokens (0: every ``block_size``, blocks that do not overlap).
    With half-overlapping blocks a sentence that one block edge cuts lies whole in the next block, where
    non-overlapping blocks split its words between two that each rank low: this is how the NIAH needle
    dropped out of BM25's choice (``docs/checks/bm25_window_coverage.py`` counts it).
    Block ``b`` is then the tokens from ``b * stride``; :func:`block_tokens` merges the overlaps.

    ``neighbours``: also take that many blocks either side of each chosen one (EM-LLM's contiguity
    buffer), so a fact cut at a block edge comes with its sentence. Overlapping neighbourhoods
    merge, so this gives at most ``n_blocks * (1 + 2 * neighbours)`` blocks, fewer when chosen
    blocks sit close together (unlike the import path, which fills that budget).

    ``following``: also take that many blocks after each chosen one (and its neighbours): text read on from
    where the best match starts, e.g. a tale from the block that holds its title.

    ``in_view``: blocks of text the model reads anyway (the recent context kept in the prompt, cut into
    blocks of ``block_size`` tokens), ranked with the memory's; only memory blocks that rank above the
    best of them are chosen, so where the answer is in view nothing from memory competes with it."""
    stride = stride or block_size
    scores = bm25_block_scores(memory, question, block_size, in_view, stride)
    n_all = -(-memory.n_tokens // stride)  # the memory's blocks; the rest of ``scores`` is in view
    bar = scores[n_all:].max() if len(scores) > n_all else -np.inf
    ranked = [int(b) for b in np.argsort(-scores[:n_all], kind="stable")]  # best first; ties to the earlier block
    if n_all > n_blocks:
        # keep every choice the same length: a short block at the end never counts among the chosen
        ranked = [b for b in ranked if b * stride + block_size <= memory.n_tokens]
    ranked = [b for b in ranked[:n_blocks] if scores[b] > bar]
    return sorted({n for b in ranked for n in range(b - neighbours, b + neighbours + following + 1) if 0 <= n < n_all})


def bm25_memory(memory, question: str, n_blocks: int, block_size: int = 64, stride: int = 0,
                in_view: list[str] = ()) -> tuple[object | None, torch.Tensor]:
    """(an in-RAM memory of just the tokens of the blocks :func:`bm25_block_ids` chooses, their memory
    ids (M,) in reading order): token import from it searches only the passages BM25 ranks best for
    the question. ``(None, empty)`` where none is chosen (a block ``in_view`` ranks first)."""
    from kvmap.stores.tensor import TensorMemory

    chosen = bm25_block_ids(memory, question, block_size, n_blocks, in_view=in_view, stride=stride)
    if not chosen:
        return None, torch.zeros(0, dtype=torch.long)
    ids = block_tokens(chosen, block_size, memory.n_tokens, stride)
    return TensorMemory.of_tokens(memory, ids), ids


def bm25_block_scores(memory, question: str, block_size: int = 64, in_view: list[str] = (),
                      stride: int = 0) -> np.ndarray:
    """BM25 score for ``question`` of every block of ``block_size`` memory tokens' text, one starting every
    ``stride`` tokens (n_blocks,), then of every block of text in ``in_view``, one index for both."""
    from kvmap.retrieval import BM25Retriever

    texts = memory.token_texts()
    blocks = ["".join(texts[i:i + block_size]) for i in range(0, len(texts), stride or block_size)]
    return BM25Retriever().scores(blocks + list(in_view), question)


def block_tokens(blocks: list[int], block_size: int, n_tokens: int, stride: int = 0) -> torch.Tensor:
    """Memory ids (M,) of the given blocks' tokens, blocks in the given order; blocks that start every
    ``stride`` tokens (overlapping) give each token once, in reading order."""
    stride = stride or block_size
    ids = torch.cat([torch.arange(b * stride, min(b * stride + block_size, n_tokens)) for b in blocks])
    return ids.unique() if stride < block_size else ids  # unique() sorts


@torch.no_grad()
def spliced_cache(port: MemoryPort, memory, before_ids: list[int], ids_per_layer: dict[int, torch.Tensor] | torch.Tensor,
                  cache=None):
    """A DynamicCache holding ``before_ids`` then the memory tokens' K/V at the positions that follow.

    ``ids_per_layer``: memory ids (M,) for every layer, or layer -> (Hkv, M) ids per KV head
    (layers left out take the first entry's ids). ``cache``: a cache that already holds the prompt's
    first tokens (a shared prefix, extended in place); ``before_ids`` are read after them.
    Returns (cache, n_positions).
    """
    from transformers import DynamicCache

    from kvmap.rope import cos_sin, rotate

    model = port.model
    cache = DynamicCache(config=model.config) if cache is None else cache
    if before_ids:
        model(torch.tensor(before_ids)[None], cache=cache, use_cache=True)
    start = cache.get_seq_length()
    n_kv = port.layout.n_kv_heads
    if isinstance(ids_per_layer, torch.Tensor):
        ids_per_layer = {0: ids_per_layer[None].expand(n_kv, -1)}
    m = min(ids.shape[1] for ids in ids_per_layer.values())  # a short last block can make layers differ
    if m == 0:  # nothing chosen: the prompt goes on as it is
        return cache, start
    first = next(iter(ids_per_layer.values()))
    like = next(model.parameters())
    positions = torch.arange(start, start + m)
    for layer in range(port.layout.n_layers):
        ids = ids_per_layer.get(layer, first)[:, :m]
        keys, values = memory.fetch(layer, ids)  # (Hkv, M, d) pre-RoPE
        cos, sin = cos_sin(port.layer_rotary(layer), positions, keys)
        cache.update(rotate(keys, cos, sin)[None].to(like.dtype), values[None].to(like.dtype), layer)
    return cache, start + m
