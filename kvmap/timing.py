"""Greedy decoding through a port, with or without memory, timing prefill and decode apart (for benchmarks)."""
from __future__ import annotations

import contextlib

from kvmap.decoding import Generation, greedy
from kvmap.ports import ImportConfig, MemoryPort


def timed_greedy(port: MemoryPort, tokenizer, prompt_ids: list[int], max_new_tokens: int,
                 memory=None, config: ImportConfig | None = None) -> Generation:
    """Greedy decoding of ``prompt_ids`` (one prefill forward, then one forward per token with the KV
    cache), importing from ``memory`` when given; stops at the EOS token.

    Takes the same path as ``model.generate`` (the port's attention function, the model's cache).
    """
    block = port.importing(memory, config) if memory is not None else contextlib.nullcontext()
    with block:
        return greedy(port.model, tokenizer, prompt_ids, max_new_tokens, chunk=None)
