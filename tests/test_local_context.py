"""kvmap methods with ``local=N``: the most recent context stays ordinary attention context, only what
lies before it goes to memory; where everything fits, a kvmap method reads the context as truncation does."""
from __future__ import annotations

import pytest

from kvmap.errors import InputError
from kvmap.eval.methods import check_methods, import_config, local_tokens


def test_local_is_a_runner_option_of_every_kvmap_method():
    assert local_tokens("kvmap:local=4096:top_k=8") == 4096 and local_tokens("kvmap-splice-bm25:local=0") == 0
    assert local_tokens("kvmap-splice-bm25") is None  # the default: as much as fits the window
    assert import_config("kvmap:local=4096:top_k=8").top_k == 8  # not an ImportConfig field
    for bad in (["rag-bm25:local=5"], ["kvmap:local=-1"], ["kvmap:local=x"], ["kvmap-splice-bm25:tail_import=1"],
                ["kvmap:splice_after_tail=1"], ["kvmap-splice:in_view=1"], ["kvmap:in_view=1"],
                ["kvmap-block:bm25_blocks=4"], ["kvmap:bm25_blocks=0"], ["kvmap-splice-bm25:bm25_blocks=4"], ["kvmap:bm25_stride=32"],
                ["kvmap:bm25_blocks=4:bm25_stride=0"], ["kvmap:bm25_blocks=4:bm25_stride=65"],
                ["kvmap-splice:bm25_stride=32"], ["kvmap-splice-bm25:tail_in_memory=1"],
                ["kvmap:tail_in_memory=1:tail_import=1"], ["kvmap:bm25_blocks=4:tail_in_memory=1:in_view=1"],
                ["kvmap:tail_in_memory=2"], ["kvmap-splice-bm25:in_view=-1"]):
        with pytest.raises(InputError):
            check_methods(bad)
    check_methods(["kvmap:bm25_blocks=4", "kvmap:bm25_blocks=4:in_view=0:local=4096",
                   "kvmap:bm25_blocks=4:bm25_stride=32", "kvmap-splice-bm25:bm25_stride=32",
                   "kvmap:tail_in_memory=1", "kvmap:local=4096:bm25_blocks=8:bm25_stride=32:tail_in_memory=1"])


@pytest.fixture(scope="module")
def lm():
    from kvmap.models.loading import load_model

    return load_model()


def test_a_context_that_fits_is_read_as_truncation_reads_it_and_a_longer_one_splits(lm, tmp_path):
    from kvmap.eval.group import GroupRunner, prompt_parts
    from kvmap.eval.tasks import make_examples

    examples = make_examples("niah", lm.tokenizer, 700, 1, part="test")
    runner = GroupRunner(lm, examples, tmp_path, max_new_tokens=8)
    try:
        tail = runner.answer("truncate-tail")[0]
        for method in ("kvmap", "kvmap:local=8000", "kvmap-splice-bm25", "kvmap-block:local=8000"):
            got = runner.answer(method)[0]
            assert got.text == tail.text, method  # same prompt, no memory: the same greedy answer
            assert runner.ingest == {}
        # a window of 300 tokens left for the context: the rest is read into a memory of what lies before
        prompt = max(len(b) + len(a) for b, a in (prompt_parts(lm.tokenizer, ex, True) for ex in examples))
        runner.window = 300 + prompt + runner.max_new_tokens
        answer = runner.answer("kvmap")[0]
        assert answer.text and runner.ingest["tokens"] > 0
        assert answer.extra["context_s"] > 0  # the tail prefilled once without memory, as truncation reads it
        per_question = runner.answer("kvmap:tail_import=1")[0]  # the tail read with import, per question
        assert per_question.text and "context_s" not in per_question.extra
        assert runner.ingest["tokens"] < len(runner.context_ids) - 250  # only the context before the tail
        runner.answer("kvmap:local=0")
        assert runner.ingest["tokens"] >= len(runner.context_ids) - 2  # the seed's setting: all of it
        before = runner.answer("kvmap-splice-bm25:splice_after_tail=0:n_blocks=1:block_size=16")[0]
        assert before.text and "context_s" not in before.extra  # each question re-reads the tail over the blocks
        after = runner.answer("kvmap-splice-bm25:local=8000:n_blocks=1:block_size=16")
        assert after[0].text and after[0].extra["context_s"] > 0  # the default: tail prefilled once, blocks after it
        gated = runner.answer("kvmap-splice-bm25:in_view=1:n_blocks=1:block_size=16")[0]
        assert gated.text and gated.extra["spliced_tokens"] in (0, 16)
        default = runner.answer("kvmap-splice-bm25:n_blocks=1:block_size=16")[0]  # the gate is the default
        assert (default.text, default.extra["spliced_tokens"]) == (gated.text, gated.extra["spliced_tokens"])
        ungated = runner.answer("kvmap-splice-bm25:in_view=0:n_blocks=1:block_size=16")[0]
        assert ungated.extra["spliced_tokens"] == 16  # the best block, whatever the tail holds
        everywhere = runner.answer("kvmap:bm25_blocks=1:in_view=0")[0]  # token import among one block's tokens
        assert everywhere.text and everywhere.extra["candidate_tokens"] == 64
        restricted = runner.answer("kvmap:bm25_blocks=1")[0]  # gated: none where the tail ranks first
        assert restricted.text and restricted.extra["candidate_tokens"] in (0, 64)
        remembered = runner.answer("kvmap:tail_in_memory=1")[0]  # the tail read as context and in memory too
        assert remembered.text and remembered.extra["context_s"] > 0
        assert runner.ingest["tokens"] >= len(runner.context_ids) - 2
        whole = runner.answer("kvmap:bm25_blocks=1:tail_in_memory=1")[0]  # no gate: some block always comes back
        assert whole.extra["candidate_tokens"] == 64
    finally:
        runner.close()
    assert not list(tmp_path.glob("memory-*"))


def test_recompute_reads_the_chosen_blocks_again_as_tokens_after_the_kept_context(lm, tmp_path):
    from kvmap.decoding import greedy
    from kvmap.eval.group import GroupRunner, prompt_parts
    from kvmap.eval.tasks import make_examples
    from kvmap.splice import bm25_blocks

    examples = make_examples("niah", lm.tokenizer, 700, 1, part="test")
    runner = GroupRunner(lm, examples, tmp_path, max_new_tokens=8)
    try:
        before, after = prompt_parts(lm.tokenizer, examples[0], True)
        runner.window = 300 + len(before) + len(after) + runner.max_new_tokens + 16
        method = "kvmap-splice-bm25:in_view=0:n_blocks=1:block_size=16"
        spliced = runner.answer(method)[0]
        reread = runner.answer(method + ":recompute=1")[0]
        memory, tail = runner._split_context(None, reserve=16)
        ids = bm25_blocks(memory, examples[0].question, 16, 1, 0, in_view=(), stride=0)
        block = memory.token_ids()[ids.numpy()].tolist()
        assert lm.tokenizer.decode(block) == "".join(memory.token_texts()[i] for i in ids.tolist())
        expected = greedy(lm.model, lm.tokenizer, before + tail + block + after, runner.max_new_tokens).text.strip()
        assert reread.text == expected  # the same tokens, read as tokens: no stored K/V in the answer
        assert reread.extra["spliced_tokens"] == spliced.extra["spliced_tokens"] == 16
        with pytest.raises(InputError):
            check_methods(["kvmap:recompute=1"])
        with pytest.raises(InputError):
            check_methods(["kvmap-splice-layerwise:recompute=1"])
    finally:
        runner.close()


def test_a_splice_method_with_the_adapter_reads_its_blocks_tuned_over_a_memory_the_base_model_wrote(tmp_path):
    """``kvmap-splice-bm25:adapter=1``: the memory is read by the base model (the same K/V as without the adapter);
    the adapter is on while the kept context, the blocks' prompt and the answer are read, and off afterwards."""
    import copy

    import torch

    from kvmap.eval.group import GroupRunner, prompt_parts
    from kvmap.eval.tasks import make_examples
    from kvmap.models.adapter import AdapterSettings, add_adapter
    from kvmap.models.loading import LoadedModel, load_model

    base = load_model()
    model = copy.deepcopy(base.model)
    add_adapter(model, AdapterSettings(rank=2))
    with torch.no_grad():  # B = 0 would make the adapter a no-op: give it weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    lm = LoadedModel(model=model, tokenizer=base.tokenizer, model_id=base.model_id, adapter="a/adapter")
    examples = make_examples("niah", lm.tokenizer, 700, 1, part="test")
    runner = GroupRunner(lm, examples, tmp_path, max_new_tokens=8)
    try:
        before, after = prompt_parts(lm.tokenizer, examples[0], True)
        runner.window = 300 + len(before) + len(after) + runner.max_new_tokens + 16
        method = "kvmap-splice-bm25:in_view=0:n_blocks=1:block_size=16"
        plain = runner.answer(method)[0]
        memory = runner._memories[next(iter(runner._memories))]
        stored = memory.fetch(5, torch.arange(memory.n_tokens)[None].expand(3, -1))[0].clone()
        tuned = runner.answer(method + ":adapter=1")[0]
        assert torch.equal(memory.fetch(5, torch.arange(memory.n_tokens)[None].expand(3, -1))[0], stored)
        assert tuned.extra["spliced_tokens"] == plain.extra["spliced_tokens"] == 16  # the same blocks
        assert tuned.text != plain.text  # read with the adapter on
        assert all(layer.disable_adapters for layer in model._kvmap_lora_layers)  # and off again
        again = runner.answer("oracle:adapter=0")[0]
        assert again.text == GroupRunner(base, examples, tmp_path / "b", max_new_tokens=8).answer("oracle")[0].text
    finally:
        runner.close()
