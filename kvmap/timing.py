"""Greedy decoding with separate prefill and per-token decode timings (for benchmarks)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from kvmap.ports import ImportConfig, MemoryPort


@dataclass
class TimedGeneration:
    """Output of :func:`timed_greedy`."""

    text: str
    prefill_tokens: int
    prefill_s: float
    decode_tokens: int
    decode_s: float

    @property
    def decode_ms_per_token(self) -> float:
        return 1000 * self.decode_s / max(1, self.decode_tokens)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / max(self.prefill_s, 1e-9)


@torch.no_grad()
def timed_greedy(port: MemoryPort, tokenizer, prompt_ids: list[int], max_new_tokens: int,
                 memory=None, config: ImportConfig | None = None) -> TimedGeneration:
    """Greedy decoding, one forward per token with the KV cache, timing prefill and decode apart.

    Takes the same path as ``model.generate`` (the port's attention forward, the model's cache);
    stops at the EOS token.
    """
    model = port.model
    block = port.importing(memory, config) if memory is not None else contextlib.nullcontext()
    eos = tokenizer.eos_token_id
    new: list[int] = []
    with block:
        began = time.perf_counter()
        out = model(torch.tensor(prompt_ids)[None], use_cache=True)
        prefill_s = time.perf_counter() - began
        cache, token = out.cache, int(out.logits[0, -1].argmax())
        began = time.perf_counter()
        for _ in range(max_new_tokens):
            new.append(token)
            if token == eos or len(new) == max_new_tokens:
                break
            out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
            cache, token = out.cache, int(out.logits[0, -1].argmax())
        decode_s = time.perf_counter() - began
    text = tokenizer.decode(new, skip_special_tokens=True)
    return TimedGeneration(text, len(prompt_ids), prefill_s, max(0, len(new) - 1), decode_s)
