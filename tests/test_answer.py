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

    def bm25_blocks(memory, question, block_size, n_blocks, neighbours=0):
        raise _Chosen(block_size, n_blocks, neighbours)

    monkeypatch.setattr(kvmap.splice, "bm25_blocks", bm25_blocks)


def test_splice_mode_uses_the_given_block_settings(chooser):
    with pytest.raises(_Chosen) as got:
        ask(_fake_lm(), "Who?", memory=object(), config=preset("splice", block_size=16, n_blocks=3, neighbours=1))
    assert got.value.args == (16, 3, 1)


def test_splice_mode_without_a_config_uses_the_splice_preset(chooser):
    with pytest.raises(_Chosen) as got:
        ask(_fake_lm(), "Who?", memory=object())
    splice = preset("splice")
    assert got.value.args == (splice.blocks.size, splice.blocks.n_blocks, splice.blocks.neighbours)


def test_splice_mode_refuses_a_config_without_blocks(chooser):
    with pytest.raises(InputError, match="block settings"):
        ask(_fake_lm(), "Who?", memory=object(), config=ImportConfig())
