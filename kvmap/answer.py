"""Ask a question with (or without) memory: prompt building, generation, and provenance of what came back."""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch

from kvmap.errors import InputError
from kvmap.models.adapter import adapter_active
from kvmap.models.loading import LoadedModel
from kvmap.ports import ImportConfig, ImportTrace, MemoryEntry, MemoryPort
from kvmap.presets import preset


@dataclass
class Answer:
    """A generated answer and the memories that were imported most often while producing it."""

    text: str
    memories: list[MemoryEntry] = field(default_factory=list)
    """Splice modes: every spliced block, best retrieval score first, with its whole text. Import mode:
    the most-retrieved memory tokens (score: times retrieved), with a snippet of their neighbourhood."""
    source_shares: dict[str, float] = field(default_factory=dict)
    """Source -> its share of what came back (spliced text, or retrievals; sums to 1 over sources)."""
    new_tokens: int = 0
    seconds: float = 0.0
    trace: ImportTrace | None = None
    """Import modes with memory: what the import retrieved (with ``keep_shares``, each forward's shares)."""
    trace_ids: torch.Tensor | None = None
    """Mode import-bm25: the memory ids (M,) of the part imported from, which the trace's ids index."""


def chat_prompt(tokenizer, question: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat prompt (falls back to plain text for tokenizers without a template)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(question, add_special_tokens=True)["input_ids"]


@torch.no_grad()
def generate(lm: LoadedModel, prompt_ids: list[int], memory=None, config: ImportConfig | None = None,
             max_new_tokens: int = 64, do_sample: bool = False, port: MemoryPort | None = None,
             keep_shares: bool = False, **generate_kwargs) -> tuple[str, ImportTrace, int]:
    """Generate a continuation of ``prompt_ids``, importing from ``memory`` when given.

    ``keep_shares``: the trace also records each forward's attention share of the memories per head
    (:attr:`ImportTrace.keep_shares`; decoding then takes the general path, a little slower).
    Returns the decoded new text, the import trace (empty without memory) and the new token count.
    """
    import contextlib

    port = port or lm.port
    ids = torch.tensor(prompt_ids)[None]
    block = port.importing(memory, config) if memory is not None else contextlib.nullcontext(ImportTrace())
    with block as trace:
        trace.keep_shares = keep_shares
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=do_sample, pad_token_id=lm.tokenizer.eos_token_id, **generate_kwargs)
    new = out[0, ids.shape[1]:]
    return lm.tokenizer.decode(new, skip_special_tokens=True).strip(), trace, len(new)


def snippet(memory, memory_id: int, radius: int = 8) -> str:
    """Text around one memory token: its neighbours from the same source and document."""
    centre = memory.entry(memory_id)
    parts = []
    for i in range(max(0, memory_id - radius), min(memory.n_tokens, memory_id + radius + 1)):
        e = memory.entry(i)
        if e.source == centre.source and e.doc_id == centre.doc_id:
            parts.append(e.text)
    return "".join(parts).replace("\n", " ").strip()


def describe_trace(memory, trace: ImportTrace, n: int = 8,
                   ids: torch.Tensor | None = None) -> tuple[list[MemoryEntry], dict[str, float]]:
    """The ``n`` most-retrieved memories (with snippets) and each source's share of all retrievals.
    ``ids``: the memory ids (M,) of the entries of the memory imported from, where that was a part of
    ``memory`` (:func:`kvmap.splice.bm25_memory`): the trace's ids index them."""
    to_memory = (lambda i: i) if ids is None else (lambda i: int(ids[i]))  # noqa: E731
    per_source: Counter = Counter()
    for memory_id, hits in trace.hits.items():
        per_source[memory.entry(to_memory(memory_id)).source] += hits
    total = sum(per_source.values()) or 1.0
    entries = []
    for traced_id, hits in trace.top(n):
        memory_id = to_memory(traced_id)
        e = memory.entry(memory_id, score=hits)
        e.text = snippet(memory, memory_id)
        entries.append(e)
    shares = {src: c / total for src, c in per_source.most_common()}
    return entries, shares


_SLOT = "\u2063MEMORY\u2063"
"""Marks where a context goes inside a user message; removed when the prompt is split there."""


def chat_parts(tokenizer, user: str) -> tuple[list[int], list[int]]:
    """Token ids of a one-turn chat prompt, split where ``user`` holds ``_SLOT`` (after = [] without it)."""
    messages = [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = user + "\nAnswer:"
    before, _, after = text.partition(_SLOT)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(before), enc(after) if after else []


def context_prompt(tokenizer, question: str, instruction: str = "") -> tuple[list[int], list[int]]:
    """Chat prompt ids before and after a ``<context>`` slot (spliced memories or a text context fill it)."""
    head = f"{instruction}\n\n" if instruction else ""
    return chat_parts(tokenizer, f"{head}<context>\n{_SLOT}\n</context>\n\nQuestion: {question}")


def ask_spliced(lm: LoadedModel, question: str, memory, choice: str = "bm25", config: ImportConfig | None = None,
                max_new_tokens: int = 64, port: MemoryPort | None = None,
                recompute: bool = False) -> tuple[str, list[MemoryEntry]]:
    """Answer with the memory blocks chosen for the question spliced into the prompt (see kvmap.splice).
    ``recompute``: the blocks' tokens are read again in the prompt, their K/V computed anew next to the
    question, instead of spliced as stored (CacheBlend's limit where every spliced token is recomputed).

    ``choice``: ``bm25`` (block text) or ``attention`` (the question's queries). ``config`` gives the
    blocks (``config.blocks``: size, count); ``None``: the splice preset (8 blocks of 64 tokens).
    Returns the answer text and the spliced blocks, best retrieval score first (BM25 score, or the
    attention mass the question's queries gave the block), each with its whole text: what the answer
    was read from.
    """
    from kvmap.decoding import greedy
    from kvmap.splice import block_mass, block_tokens, bm25_block_ids, bm25_block_scores, spliced_cache, top_blocks

    port = port or lm.port
    tok = lm.tokenizer
    if config is None:
        config = preset("splice")
    elif config.blocks is None:
        raise InputError("splice modes need block settings (config.blocks); "
                         "use kvmap.presets.preset('splice', ...) or ImportConfig.from_options(block_size=..., n_blocks=...)")
    size = config.blocks.size
    if choice == "bm25":
        blocks = bm25_block_ids(memory, question, size, config.blocks.n_blocks, config.blocks.neighbours,
                                following=config.blocks.following)
        scores = bm25_block_scores(memory, question, size)
    else:
        question_tokens = len(tok(question, add_special_tokens=False)["input_ids"])
        scores = block_mass(port, memory, chat_prompt(tok, question), config, select_last=question_tokens + 6)
        blocks = top_blocks(scores, config.blocks.n_blocks, size, memory.n_tokens)
    before, after = context_prompt(tok, question)
    ids = block_tokens(blocks, size, memory.n_tokens)  # (M,) memory ids in reading order
    # the memory adapter (if the model has one, and unless config.adapter is off) reads the blocks and answers,
    # as `kvmap finetune --mode splice` trained it; the memory itself stays the base model's
    with adapter_active(lm.model) if config.adapter else contextlib.nullcontext():
        if recompute:
            text = greedy(lm.model, tok, before + memory.token_ids()[ids.numpy()].tolist() + after, max_new_tokens).text
        else:
            cache, _ = spliced_cache(port, memory, before, ids)
            text = greedy(lm.model, tok, after, max_new_tokens, cache).text
    text = text.strip()
    return text, describe_blocks(memory, blocks, [float(scores[b]) for b in blocks], size)


def describe_blocks(memory, blocks: list[int], scores: list[float], block_size: int) -> list[MemoryEntry]:
    """One entry per spliced block, best score first: where it starts (source, document, offset), its
    retrieval score and its whole text."""
    texts = memory.token_texts()
    entries = []
    for block, score in sorted(zip(blocks, scores), key=lambda bs: -bs[1]):
        start = block * block_size
        entry = memory.entry(start, score=score)
        entry.text = "".join(texts[start:start + block_size]).replace("\n", " ").strip()
        entries.append(entry)
    return entries


ASK_MODES = ("splice", "splice-attention", "recompute", "import", "import-bm25")


def ask(lm: LoadedModel, question: str, memory=None, config: ImportConfig | None = None,
        max_new_tokens: int = 64, n_memories: int = 8, port: MemoryPort | None = None,
        mode: str = "splice", keep_shares: bool = False) -> Answer:
    """Answer ``question`` with the model and ``memory`` (``None``: no memory).

    ``mode``: ``splice`` (default) splices the memory blocks BM25 picks for the question into the
    prompt; ``splice-attention`` lets the question's queries pick them (:mod:`kvmap.splice`);
    ``recompute`` reads the blocks BM25 picks again as tokens (their K/V computed anew, not spliced);
    ``import`` adds every query's top-k memory tokens to attention (the seed's token-level import);
    ``import-bm25`` does the same among the tokens of the few memory blocks BM25 ranks best for the
    question only (:data:`kvmap.presets.BM25_GATE`), the way the NIAH rows of RESULTS.md found needles.
    ``config`` configures any: in the splice modes it must have block settings (``None``: the
    splice preset, :func:`kvmap.presets.preset`); in import mode ``None`` is the token-level default,
    in import-bm25 mode the preset ``bm25-import``. ``keep_shares`` (import modes): the answer's trace
    records the memories' attention share per layer, head and forward (:mod:`kvmap.inspection`).
    """
    import time

    if mode not in ASK_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(ASK_MODES)}")
    began = time.perf_counter()
    if memory is not None and (mode.startswith("splice") or mode == "recompute"):
        choice = "attention" if mode == "splice-attention" else "bm25"
        text, blocks = ask_spliced(lm, question, memory, choice, config, max_new_tokens, port, mode == "recompute")
        shares = Counter()
        for entry in blocks:
            shares[entry.source] += len(entry.text) or 1
        total = sum(shares.values())
        # every spliced block is listed (they are all the answer read), not only n_memories of them
        return Answer(text=text, seconds=time.perf_counter() - began, memories=blocks,
                      source_shares={src: n / total for src, n in shares.most_common()})
    source, ids = memory, None
    if memory is not None and mode == "import-bm25":
        from kvmap.presets import BM25_GATE
        from kvmap.splice import bm25_memory

        source, ids = bm25_memory(memory, question, BM25_GATE["n_blocks"], BM25_GATE["block_size"], BM25_GATE["stride"])
        config = config or preset("bm25-import")
        if source is not None:  # None: an empty memory, nothing to import
            config = config.with_options(top_k=min(config.top_k, source.n_tokens))  # fewer tokens than k
    text, trace, n_new = generate(lm, chat_prompt(lm.tokenizer, question), source, config, max_new_tokens, port=port,
                                  keep_shares=keep_shares and source is not None)
    answer = Answer(text=text, new_tokens=n_new, seconds=time.perf_counter() - began)
    if memory is not None:
        answer.memories, answer.source_shares = describe_trace(memory, trace, n_memories, ids)
        answer.trace, answer.trace_ids = trace, ids
    return answer
