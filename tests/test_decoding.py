"""The one greedy decode loop, on a stand-in model whose next token is the last one plus one."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from kvmap.decoding import decode_greedy, greedy, prefill

VOCAB, EOS = 10, 9


class Counter:
    """Logits favour (last input token + 1) mod VOCAB; the 'cache' counts the tokens seen so far."""

    def __init__(self):
        self.calls = []

    def __call__(self, ids, cache=None, use_cache=True):
        self.calls.append(ids.shape[1])
        cache = (cache or 0) + ids.shape[1]
        logits = torch.zeros(1, ids.shape[1], VOCAB)
        logits[0, -1, (int(ids[0, -1]) + 1) % VOCAB] = 1.0
        return SimpleNamespace(logits=logits, cache=cache)


class Tok:
    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == EOS))


def test_prefill_in_chunks_or_at_once():
    model = Counter()
    cache, logits = prefill(model, list(range(7)), chunk=3)
    assert model.calls == [3, 3, 1] and cache == 7 and int(logits.argmax()) == 7
    model = Counter()
    assert prefill(model, list(range(7)), chunk=None)[0] == 7 and model.calls == [7]


def test_decode_stops_at_eos_or_the_limit():
    model = Counter()
    _, logits = prefill(model, [5])
    new, _ = decode_greedy(model, logits, 1, 10, EOS)
    assert new == [6, 7, 8, 9]  # EOS kept as the last token
    assert decode_greedy(model, logits, 1, 2, EOS)[0] == [6, 7]
    assert decode_greedy(model, logits, 1, 0, EOS)[0] == []


def test_greedy_counts_tokens_and_decodes_text():
    gen = greedy(Counter(), Tok(), [3, 4], max_new_tokens=8, chunk=None)
    assert gen.text == "5 6 7 8" and gen.prefill_tokens == 2 and gen.decode_tokens == 4
    assert gen.seconds == 0.0 and gen.extra == {}
