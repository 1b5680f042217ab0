"""Greedy decoding, one loop for every caller: ``ask``, the evaluation methods and the benchmarks' timings.

:func:`prefill` feeds prompt ids after a cache (in chunks, or in one forward), :func:`decode_greedy`
takes the argmax token by token until EOS, and :func:`greedy` does both and times them apart.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    """A greedy continuation and what it cost."""

    text: str
    """The new tokens decoded (special tokens skipped, whitespace kept)."""
    prefill_tokens: int
    """Prompt tokens fed before decoding (after the cache it started from)."""
    prefill_s: float
    decode_tokens: int
    """Decode forwards: new tokens after the first, which the prefill's logits give."""
    decode_s: float
    seconds: float = 0.0
    """Wall time of the whole answer as the caller counts it (e.g. a shared context prefill included)."""
    extra: dict = field(default_factory=dict)
    """Figures the caller attaches (e.g. whether the retrieved text held the answer)."""

    @property
    def decode_ms_per_token(self) -> float:
        return 1000 * self.decode_s / max(1, self.decode_tokens)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / max(self.prefill_s, 1e-9)


@torch.no_grad()
def prefill(model, ids: list[int], cache=None, chunk: int | None = 2048):
    """Run ``ids`` through the model after ``cache`` (``None``: the model starts a new one).

    ``chunk``: tokens per forward (bounded attention memory); ``None``: all in one forward.
    Returns (cache, logits of the last position).
    """
    logits = None
    step = chunk or max(1, len(ids))
    for start in range(0, len(ids), step):
        out = model(torch.tensor(ids[start:start + step])[None], cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[0, -1]
    return cache, logits


@torch.no_grad()
def decode_greedy(model, logits: torch.Tensor, cache, max_new_tokens: int, eos: int | None) -> tuple[list[int], float]:
    """Greedy tokens from the logits that follow ``cache``: at most ``max_new_tokens``, the last one EOS
    if it came. Returns (token ids, seconds of the decode forwards)."""
    began = time.perf_counter()
    if max_new_tokens < 1:
        return [], 0.0
    new = [int(logits.argmax())]
    while new[-1] != eos and len(new) < max_new_tokens:
        out = model(torch.tensor([[new[-1]]]), cache=cache, use_cache=True)
        new.append(int(out.logits[0, -1].argmax()))
    return new, time.perf_counter() - began


def greedy(model, tokenizer, ids: list[int], max_new_tokens: int, cache=None, chunk: int | None = 2048) -> Generation:
    """Feed ``ids`` after ``cache`` (see :func:`prefill`), then decode greedily until EOS."""
    began = time.perf_counter()
    cache, logits = prefill(model, ids, cache, chunk)
    prefill_s = time.perf_counter() - began
    new, decode_s = decode_greedy(model, logits, cache, max_new_tokens, tokenizer.eos_token_id)
    return Generation(tokenizer.decode(new, skip_special_tokens=True), len(ids), prefill_s,
                      max(0, len(new) - 1), decode_s)
