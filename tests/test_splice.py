"""BM25 block choice (kvmap.splice) on a stand-in memory: only its token texts are read."""
from __future__ import annotations

from types import SimpleNamespace

from kvmap.splice import bm25_block_ids, bm25_blocks

WORDS = ["apple ", "pear ", "plum ", "fig ", "frog ", "well ", "ball ", "gold ", "king ", "crown ", "door ", "key ",
         "moon ", "star "]  # 14 tokens: blocks of 4 are [0-3] [4-7] [8-11] and a short [12-13]


def memory(words=WORDS):
    return SimpleNamespace(token_texts=lambda: list(words), n_tokens=len(words))


def test_bm25_chooses_the_block_holding_the_question_words():
    assert bm25_block_ids(memory(), "the frog by the well", block_size=4, n_blocks=1) == [1]
    assert bm25_blocks(memory(), "the frog by the well", block_size=4, n_blocks=1).tolist() == [4, 5, 6, 7]


def test_neighbours_come_with_each_choice_and_merge():
    assert bm25_block_ids(memory(), "frog well", block_size=4, n_blocks=1, neighbours=1) == [0, 1, 2]
    assert bm25_block_ids(memory(), "frog key", block_size=4, n_blocks=2, neighbours=1) == [0, 1, 2, 3]


def test_a_short_last_block_gives_way_to_the_next_best():
    assert bm25_block_ids(memory(), "moon star crown", block_size=4, n_blocks=1) == [2]  # not the 2-token [12-13]
    assert bm25_block_ids(memory(), "moon star", block_size=4, n_blocks=4) == [0, 1, 2, 3]  # every block asked for
