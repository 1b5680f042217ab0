"""Dev and test parts of the evaluation data: disjoint, and dev is exactly what runs used before the split."""
from __future__ import annotations

import pytest

from kvmap.eval.parts import DEV_STORIES, babi_test_pool
from kvmap.eval.tasks import make_examples


@pytest.fixture(scope="module")
def tokenizer():
    from kvmap.models.loading import load_model

    return load_model().tokenizer


def test_fairytaleqa_parts_split_the_val_stories(tokenizer):
    dev = make_examples("fairytaleqa", tokenizer, 0, 60, per_story=5)
    test = make_examples("fairytaleqa", tokenizer, 0, 60, per_story=5, part="test")
    assert {e.meta["story"] for e in dev} <= set(DEV_STORIES)
    assert not {e.meta["story"] for e in test} & set(DEV_STORIES)
    assert len({e.meta["story"] for e in test}) >= 12
    # the dev part is the first 10 stories of the seed-0 order, in that order: the examples earlier runs had
    assert [e.group for e in dev[::5]] == [f"fairytaleqa-0-0-{story}" for story in DEV_STORIES]


@pytest.mark.parametrize("task,options", [("passkey", {}), ("niah", {"variant": "multikey"}), ("babi", {"qa": 2})])
def test_generated_parts_are_disjoint_and_dev_keeps_its_ids(tokenizer, task, options):
    dev = make_examples(task, tokenizer, 600, 4, **options)
    test = make_examples(task, tokenizer, 600, 4, part="test", **options)
    assert not {e.id for e in dev} & {e.id for e in test}
    assert not {e.context for e in dev} & {e.context for e in test}
    assert "test" not in dev[0].id and "test" in test[0].id


def test_babi_test_pool_never_holds_a_dev_question():
    import random

    pool = set(babi_test_pool(1, 1000))
    for n in (1, 10, 50, 120, 200):
        assert not pool & set(random.Random("babi-1-0").sample(range(1000), n))
    assert len(pool) > 700
