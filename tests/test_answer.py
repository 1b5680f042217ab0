"""``ask``'s splice modes honour the ImportConfig they are given (fast: the model is never run)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvmap.answer import ask
from kvmap.errors import InputError
from kvmap.ports import ImportConfig
from kvmap.presets import preset


class _Chosen(Exception):
    """Raised by the stand-in block chooser, carrying the block settings it was called with."""


def _fake_lm():
    return SimpleNamespace(port=None, tokenizer=None, model=None)


@pytest.fixture
def chooser(monkeypatch):
    import kvmap.splice

    def bm25_block_ids(memory, question, block_size, n_blocks, neighbours=0, following=0):
        raise _Chosen(block_size, n_blocks, neighbours, following)

    monkeypatch.setattr(kvmap.splice, "bm25_block_ids", bm25_block_ids)


def test_splice_mode_uses_the_given_block_settings(chooser):
    with pytest.raises(_Chosen) as got:
        ask(_fake_lm(), "Who?", memory=object(), config=preset("splice", block_size=16, n_blocks=3, neighbours=1,
                                                                  following=2))
    assert got.value.args == (16, 3, 1, 2)


def test_splice_mode_without_a_config_uses_the_splice_preset(chooser):
    with pytest.raises(_Chosen) as got:
        ask(_fake_lm(), "Who?", memory=object())
    splice = preset("splice")
    assert got.value.args == (splice.blocks.size, splice.blocks.n_blocks, splice.blocks.neighbours,
                              splice.blocks.following)


def test_splice_mode_refuses_a_config_without_blocks(chooser):
    with pytest.raises(InputError, match="block settings"):
        ask(_fake_lm(), "Who?", memory=object(), config=ImportConfig())


def test_spliced_answers_list_every_spliced_block_best_score_first(tmp_path):
    """The block holding a planted fact is listed, whole, when BM25 splices it (the review's probe: a fact
    answered from a 9k-token memory while none of the 8 listed snippets held it)."""
    import torch

    from kvmap.answer import describe_blocks
    from kvmap.splice import bm25_block_ids, bm25_block_scores
    from tests.conftest import BruteForceMemory

    texts = ["The road went on through the wood. "] * 25 + ["The baker's secret ingredient is saffron. "] + \
        ["The road went on through the wood. "] * 15  # one "token" a sentence
    memory = BruteForceMemory([torch.zeros(1, len(texts), 4)], [torch.zeros(1, len(texts), 4)], texts=texts)
    blocks = bm25_block_ids(memory, "What is the baker's secret ingredient?", block_size=4, n_blocks=3)
    scores = bm25_block_scores(memory, "What is the baker's secret ingredient?", block_size=4)
    entries = describe_blocks(memory, blocks, [float(scores[b]) for b in blocks], block_size=4)
    assert len(entries) == len(blocks) == 3
    assert "saffron" in entries[0].text and entries[0].score == max(e.score for e in entries)
    assert [e.score for e in entries] == sorted((e.score for e in entries), reverse=True)
    assert entries[0].offset == 24  # the block's first token: the fact's block starts there
