"""Retrieval-augmented-generation baselines for the long-context evaluation.

Instead of showing the model the whole long context (or a key/value memory of it), a RAG baseline
cuts the context into passages, ranks them against the question with a retriever
(:mod:`kvmap.retrieval`: BM25 or MiniLM embeddings), and puts only the best ones, up to a token
budget, into the prompt.

Example
-------
>>> from kvmap.retrieval import make_retriever
>>> prompt_context = rag_context(long_text, question, make_retriever("bm25"), llm_tokenizer, budget_tokens=1024)
"""
from __future__ import annotations

import math
import re

from kvmap.errors import InputError
from kvmap.retrieval import Retriever

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
