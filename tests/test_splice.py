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


def test_overlapping_blocks_keep_a_phrase_that_a_block_edge_cuts():
    """``stride``: blocks of 4 starting every 2 tokens; "gold king" spans the edge between [4-7] and [8-11]
    and lies whole in the block from token 6. Overlapping choices give each token once, in reading order."""
    from kvmap.splice import block_tokens

    assert bm25_block_ids(memory(), "gold king", block_size=4, n_blocks=1) == [1]  # a tie: one word each
    assert bm25_block_ids(memory(), "gold king", block_size=4, n_blocks=1, stride=2) == [3]
    assert bm25_blocks(memory(), "gold king", block_size=4, n_blocks=1, stride=2).tolist() == [6, 7, 8, 9]
    assert block_tokens([2, 3], 4, 14, stride=2).tolist() == [4, 5, 6, 7, 8, 9]
    # the short block from token 12 gives way to the full one from token 10
    assert bm25_block_ids(memory(), "moon star", block_size=4, n_blocks=1, stride=2) == [5]
    # the text in view is cut the same way by the caller; a block of it holding both words wins
    assert bm25_block_ids(memory(), "gold king", block_size=4, n_blocks=1, stride=2,
                          in_view=["a gold king sat "]) == []


def test_memory_blocks_must_outrank_the_text_in_view():
    """``in_view``: what the prompt holds anyway competes; memory blocks below its best block are not chosen."""
    view = ["sun rain snow wind ", "a frog sat in a well "]
    assert bm25_block_ids(memory(), "the frog by the well", block_size=4, n_blocks=2, in_view=view[:1]) == [1]
    assert bm25_block_ids(memory(), "the frog by the well", block_size=4, n_blocks=2, in_view=view) == []
    assert bm25_blocks(memory(), "frog well", block_size=4, in_view=["frog well "]).numel() == 0
    # the question's words split between view and memory: the block with more of them still wins
    assert bm25_block_ids(memory(), "frog well ball", block_size=4, n_blocks=1, in_view=["frog and trees "]) == [1]


def test_splicing_onto_a_shared_prefix_equals_splicing_after_reading_it():
    """``spliced_cache(cache=...)``: blocks placed after a prefilled prefix get the positions that follow it,
    exactly as if the prefix had been read as the prompt's start."""
    import torch
    from transformers import DynamicCache

    from conftest import BruteForceMemory, export_kv, tiny_llama
    from kvmap.models.llama import LlamaMemoryPort
    from kvmap.splice import spliced_cache

    port = LlamaMemoryPort(tiny_llama(), model_id="tiny")
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    memory = BruteForceMemory(*export_kv(port, ids[:, :24]))
    prefix, question, chosen = ids[0, 24:32].tolist(), ids[0, 32:].tolist(), torch.arange(4, 12)
    whole, n_whole = spliced_cache(port, memory, prefix, chosen)
    shared = DynamicCache(config=port.model.config)
    with torch.no_grad():
        port.model(torch.tensor(prefix[:5])[None], cache=shared, use_cache=True)
    onto, n_onto = spliced_cache(port, memory, prefix[5:], chosen, cache=shared)
    assert n_whole == n_onto == 16
    with torch.no_grad():
        a = port.model(torch.tensor(question)[None], cache=whole, use_cache=True).logits
        b = port.model(torch.tensor(question)[None], cache=onto, use_cache=True).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_following_reads_on_from_each_choice():
    """``following``: the blocks after the best match come too (a tale read on from its title), clipped at the end."""
    assert bm25_block_ids(memory(), "frog well", block_size=4, n_blocks=1, following=1) == [1, 2]
    assert bm25_block_ids(memory(), "frog well", block_size=4, n_blocks=1, neighbours=1, following=1) == [0, 1, 2, 3]
    assert bm25_block_ids(memory(), "crown door", block_size=4, n_blocks=1, following=5) == [2, 3]


def test_following_is_a_block_option_that_round_trips():
    import pytest

    from kvmap.errors import InputError
    from kvmap.ports import ImportConfig

    config = ImportConfig.from_options(block_size=128, n_blocks=1, following=3)
    assert config.blocks.following == 3 and ImportConfig.from_options(**config.options()) == config
    assert "following" not in ImportConfig.from_options(block_size=64).options()  # old run files compare equal
    with pytest.raises(InputError, match="need block retrieval"):
        ImportConfig.from_options(following=2)
