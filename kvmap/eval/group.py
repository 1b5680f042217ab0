"""Running the methods of :mod:`kvmap.eval.methods` on a group of examples that share one context.

A :class:`GroupRunner` builds what the group's questions share once (the context read into a memory,
a prefill of the context) and answers every question with any method, timing each answer from the
question on and keeping the shared context's cost apart (:mod:`kvmap.eval.runner` divides it over
the group's questions).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from kvmap.answer import chat_parts, context_prompt
from kvmap.decoding import Generation, greedy, prefill
from kvmap.eval.methods import (BASELINE_OPTIONS, KVMAP_PRESETS, KVMAP_RUNNER_OPTIONS, import_config, local_tokens,
                                parse_method, yarn_rope)
from kvmap.eval.scoring import contains_answer
from kvmap.eval.tasks import Example
from kvmap.models.adapter import adapter_active
from kvmap.ports import ImportConfig
from kvmap.presets import SPLICE

BM25_BLOCK = SPLICE["block_size"]
"""Tokens per block that ``bm25_blocks`` ranks: the splice preset's blocks, so both choose among the same passages."""


# ------------------------------------------------------------------------------------------
# Prompts.

def prompt_parts(tokenizer, ex: Example, with_context: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the context (the context itself goes between them)."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if ex.style == "completion":
        if with_context:
            return [], enc("\n" + ex.question)
        return enc(ex.instruction) + enc("\n" + ex.question), []
    if with_context:
        return context_prompt(tokenizer, ex.question, ex.instruction)
    return chat_parts(tokenizer, f"{ex.instruction}\n\nQuestion: {ex.question}")


def read_memory(lm, path, source: str, docs: list[str], store: str = "exact", reader_config=None,
                chunk_cache=None):
    """``docs`` read into a new memory at ``path``; returns (memory, ingest figures).

    Ingest figures: tokens, seconds, tokens reused from ``chunk_cache``, disk bytes per token and,
    for a fresh read only (nothing reused), ``ingest_tok_s``.
    """
    from kvmap.fileio import disk_usage
    from kvmap.reader import read_into
    from kvmap.stores import Memory

    memory = Memory.create(path, lm.model_id, lm.port.layout, store=store)
    reused = chunk_cache.reused_tokens if chunk_cache else 0
    stats = read_into(lm.port, lm.tokenizer, memory, source, docs, reader_config, progress=False,
                      chunk_cache=chunk_cache)
    reused = (chunk_cache.reused_tokens if chunk_cache else 0) - reused
    ingest = {"tokens": stats.n_tokens, "seconds": stats.seconds, "reused_tokens": reused,
              "disk_bytes_per_token": disk_usage(memory.path) / max(1, stats.n_tokens)}
    if reused == 0:  # only fresh reads measure ingest speed
        ingest["ingest_tok_s"] = stats.tokens_per_s
    return memory, ingest


# ------------------------------------------------------------------------------------------
# Running one method on a group of examples that share a context.


@dataclass
class SharedPrefix:
    """A group's shared prompt start and context tokens, prefilled once; each question is read after it."""

    tok: object
    cache: object
    n_tokens: int
    cost: dict
    """``context_s`` (the runner divides it over the group's questions) and the prefill's tokens per second."""

    def rest_of_prompt(self, ex: Example) -> list[int]:
        """Crops the cache back to the shared prefix (dropping the previous question and answer) and returns
        the rest of ``ex``'s prompt, to read after it."""
        extra = self.cache.get_seq_length() - self.n_tokens
        if extra > 0:
            self.cache.crop(-extra)
        return prompt_parts(self.tok, ex, True)[1]


class GroupRunner:
    """Answers a group's questions with any method; builds shared state (memory, caches) once."""

    def __init__(self, lm, examples: list[Example], workdir, reader_config=None, chunk_cache=None,
                 store: str = "exact", max_new_tokens: int = 32):
        self.lm, self.examples = lm, examples
        self.tok, self.model, self.port = lm.tokenizer, lm.model, lm.port
        self.workdir, self.reader_config, self.chunk_cache = workdir, reader_config, chunk_cache
        self.store, self.max_new_tokens = store, max_new_tokens
        self.window = self.model.config.max_position_embeddings
        self._memories: dict[int, object | None] = {}  # local tokens -> memory of the context before them
        self._ingests: dict[int, dict] = {}
        self.ingest: dict = {}
        """Ingest figures of the memory the latest method read from (what its rows' context cost is)."""
        self.context_ids = self.tok(examples[0].context, add_special_tokens=False)["input_ids"]
        self.group_size = len(examples)
        """How many questions share the context (and its ingest or prefill cost)."""

    # -- shared state -------------------------------------------------------------------------

    def memory(self, local: int = 0):
        """The group's context read into a fresh memory, once: all of it (``local=0``), or what lies before
        its last ``local`` tokens (``None`` when nothing does). Its ingest figures become ``self.ingest``."""
        if local not in self._memories:
            if local == 0:
                docs = self.examples[0].docs()
            else:  # byte-level BPE: the decoded prefix is the context's text up to the tail
                cut = len(self.context_ids) - local
                docs = [self.tok.decode(self.context_ids[:cut])] if cut > 0 else []
            memory, ingest = None, {}
            if docs:
                memory, ingest = read_memory(self.lm, self.workdir / f"memory-{local}", "context", docs,
                                             self.store, self.reader_config, self.chunk_cache)
            self._memories[local], self._ingests[local] = memory, ingest
        self.ingest = self._ingests[local]
        return self._memories[local]

    def _split_context(self, local: int | None, reserve: int = 0,
                       tail_in_memory: bool = False) -> tuple[object | None, list[int]]:
        """(memory of what lies before the tail, the tail): the last context tokens a ``local`` option keeps in
        the prompt, at most ``local`` (None: no limit) and what fits the window next to every question's
        prompt, the answer and ``reserve`` spliced tokens; the memory is ``None`` when the tail is the whole
        context. ``tail_in_memory``: where there is a memory, it holds the whole context, the tail too."""
        n = 0
        if local is None or local > 0:
            parts = [prompt_parts(self.tok, ex, True) for ex in self.examples]
            room = self.window - max(len(b) + len(a) for b, a in parts) - self.max_new_tokens - reserve
            n = max(0, min(len(self.context_ids), room) if local is None else min(local, len(self.context_ids), room))
        tail = self.context_ids[len(self.context_ids) - n:] if n else []
        if tail_in_memory and len(tail) < len(self.context_ids):
            return self.memory(0), tail
        return self.memory(n), tail

    def close(self) -> None:
        import shutil

        for memory in self._memories.values():
            if memory is not None:
                shutil.rmtree(memory.path, ignore_errors=True)
        self._memories.clear()

    # -- methods ------------------------------------------------------------------------------

    def answer(self, method: str) -> list[Generation | str]:
        """One Generation per example (or a string saying why the method was skipped)."""
        base, options = parse_method(method)
        if base.startswith("kvmap-splice"):
            return self._splice(import_config(method), choice=base.rpartition("-")[2], local=local_tokens(method),
                                after_tail=bool(options.get("splice_after_tail", KVMAP_RUNNER_OPTIONS["splice_after_tail"])),
                                in_view=bool(options.get("in_view", KVMAP_RUNNER_OPTIONS["in_view"])),
                                stride=options.get("bm25_stride", KVMAP_RUNNER_OPTIONS["bm25_stride"]),
                                recompute=bool(options.get("recompute", KVMAP_RUNNER_OPTIONS["recompute"])))
        if base in KVMAP_PRESETS:
            return self._kvmap(import_config(method), text_choice=base == "kvmap-bm25", local=local_tokens(method),
                               tail_import=bool(options.get("tail_import", KVMAP_RUNNER_OPTIONS["tail_import"])),
                               bm25_blocks=options.get("bm25_blocks", KVMAP_RUNNER_OPTIONS["bm25_blocks"]),
                               in_view=bool(options.get("in_view", KVMAP_RUNNER_OPTIONS["in_view"])),
                               stride=options.get("bm25_stride", KVMAP_RUNNER_OPTIONS["bm25_stride"]),
                               tail_in_memory=bool(options.get("tail_in_memory", KVMAP_RUNNER_OPTIONS["tail_in_memory"])))
        opts = {**BASELINE_OPTIONS.get(base, {}), **options}
        with adapter_active(self.model) if opts.get("adapter") else contextlib.nullcontext():
            return self._baseline(base, opts)

    def _baseline(self, base: str, opts: dict) -> list[Generation | str]:
        if base == "none":
            return [self._plain(ex, None) for ex in self.examples]
        if base == "oracle":
            return [self._plain(ex, ex.gold) for ex in self.examples]
        if base.startswith("rag-"):
            return self._rag(base[4:], opts["budget"])
        if base == "full":
            return self._shared_context(self.context_ids, fits_window=True)
        if base in ("truncate", "truncate-tail"):
            return self._shared_context(self._truncated(head=base == "truncate"), fits_window=True)
        if base == "yarn":
            return self._yarn(opts["max_tokens"])
        if base == "streaming":
            return self._streaming(opts["window"])
        raise AssertionError(base)

    def _blocks_of(self, ids: list[int], size: int, stride: int = 0) -> list[str]:
        """The text of ``ids`` in blocks of ``size`` tokens, one starting every ``stride`` (0: ``size``) tokens,
        as a memory's blocks are cut."""
        return [self.tok.decode(ids[i:i + size]) for i in range(0, len(ids), stride or size)]

    def _enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _generate(self, ids: list[int], cache=None, **extra) -> Generation:
        """Greedy answer after ``cache``; ``seconds`` is the answer latency, from the question on.

        A context cost shared by the group (a prefill of the context) goes into ``extra["context_s"]``,
        not into ``seconds``: the runner divides it over the group's questions, as it does kvmap's ingest.
        """
        began = time.perf_counter()
        gen = greedy(self.model, self.tok, ids, self.max_new_tokens, cache)
        gen.text, gen.extra = gen.text.strip(), extra
        gen.seconds = time.perf_counter() - began
        return gen

    def _plain(self, ex: Example, context: str | None) -> Generation:
        before, after = prompt_parts(self.tok, ex, context is not None)
        return self._generate(before + (self._enc(context) if context is not None else []) + after)

    def _rag(self, retriever_name: str, budget: int) -> list[Generation]:
        from kvmap.eval.rag import rag_context
        from kvmap.retrieval import make_retriever

        retriever = make_retriever(retriever_name)
        out = []
        for ex in self.examples:
            began = time.perf_counter()
            passages = rag_context(ex.context, ex.question, retriever, self.tok, budget_tokens=budget)
            ans = self._plain(ex, passages)
            ans.extra["retrieved_answer"] = float(contains_answer(passages, ex.answers))
            ans.seconds = time.perf_counter() - began  # retrieval included
            out.append(ans)
        return out

    def _truncated(self, head: bool) -> list[int]:
        """The context cut to fit the window next to every question and the answer.

        ``head``: the first and the last half of that budget (the whole context when it fits);
        otherwise the last ``budget`` tokens only.
        """
        parts = [prompt_parts(self.tok, ex, True) for ex in self.examples]
        budget = self.window - max(len(b) + len(a) for b, a in parts) - self.max_new_tokens
        if len(self.context_ids) <= budget:
            return self.context_ids
        if not head:
            return self.context_ids[-budget:]
        return self.context_ids[:budget // 2] + self.context_ids[-(budget - budget // 2):]

    def _shared_context(self, context_ids: list[int], fits_window: bool) -> list[Generation | str]:
        """Prefill [before, context] once, then answer each question from a copy of that cache."""
        before = self._shared_before()
        total = len(before) + len(context_ids) + max(len(prompt_parts(self.tok, ex, True)[1]) for ex in self.examples)
        if fits_window and total + self.max_new_tokens > self.window:
            return [f"{total} prompt tokens exceed the {self.window}-token window"] * len(self.examples)
        shared = self._shared_prefill(context_ids)
        return [self._generate(shared.rest_of_prompt(ex), shared.cache, **shared.cost) for ex in self.examples]

    def _shared_before(self) -> list[int]:
        befores = {tuple(prompt_parts(self.tok, ex, True)[0]) for ex in self.examples}
        assert len(befores) == 1, "examples of a group share the prompt start"
        return list(befores.pop())

    def _shared_prefill(self, context_ids: list[int]) -> SharedPrefix:
        """[before, context] prefilled once for the group (no memory attached)."""
        ids = self._shared_before() + list(context_ids)
        began = time.perf_counter()
        cache, _ = prefill(self.model, ids)
        seconds = time.perf_counter() - began
        return SharedPrefix(self.tok, cache, len(ids), {"context_s": seconds, "context_prefill_tok_s": len(ids) / seconds})

    def _yarn(self, max_tokens: int) -> list[Generation | str]:
        import math

        n = len(self.context_ids) + 200
        if n > max_tokens:
            return [f"{n} tokens: above yarn's max_tokens={max_tokens} (full attention cost grows quadratically; "
                    f"raise with yarn:max_tokens=N)"] * len(self.examples)
        factor = max(1.0, math.ceil(2 * n / self.window) / 2)
        with yarn_rope(self.model, factor):
            answers = self._shared_context(self.context_ids, fits_window=False)
        for a in answers:
            if isinstance(a, Generation):
                a.extra["yarn_factor"] = factor
        return answers

    def _streaming(self, window: int) -> list[Generation]:
        """Prompt start (attention sinks) + the last ``window`` context tokens as streamed by the reader."""
        memory = self.memory()
        tail = torch.arange(max(0, memory.n_tokens - window), memory.n_tokens)
        return [self._spliced_answer(ex, tail, 0.0) for ex in self.examples]

    def _spliced_answer(self, ex: Example, ids, chose_s: float, memory=None, tail: list[int] = (),
                        shared: SharedPrefix | None = None, recompute: bool = False) -> Generation:
        """Answer with memory tokens' K/V placed where a text baseline's context goes (see kvmap.splice),
        followed by ``tail``, the most recent context tokens kept as ordinary context; with ``shared`` (the
        prompt start and tail, prefilled once), the blocks come after the tail instead, next to the question.
        ``recompute``: the same memory tokens are read again as tokens (their K/V recomputed in the new
        context, CacheBlend's limit of recomputing every spliced token) instead of spliced as stored."""
        from kvmap.splice import spliced_cache

        memory = memory or self.memory()
        began = time.perf_counter()
        reread = memory.token_ids()[ids.numpy()].tolist() if recompute else []
        if shared is not None:
            after = shared.rest_of_prompt(ex)
            cache = shared.cache if recompute else spliced_cache(self.port, memory, [], ids, cache=shared.cache)[0]
            answer = self._generate(reread + after, cache, **shared.cost)
        else:
            before, after = prompt_parts(self.tok, ex, True)
            if recompute:
                answer = self._generate(before + reread + list(tail) + after)
            else:
                cache, _ = spliced_cache(self.port, memory, before, ids)
                answer = self._generate(list(tail) + after, cache)
        answer.seconds = time.perf_counter() - began + chose_s  # choosing and splicing follow the question
        return answer

    def _splice(self, config: ImportConfig, choice: str, local: int | None = None,
                after_tail: bool = True, in_view: bool = False, stride: int = 0,
                recompute: bool = False) -> list[Generation]:
        """``choice``: ``bm25`` (block text), ``layerwise`` (per layer and head), else shared attention choice.
        ``after_tail``: the kept tail is prefilled once for the group without memory and the blocks are
        spliced after it; else they go before it, in reading order, and each question re-reads the tail
        over them. ``in_view`` (bm25): only memory blocks BM25 ranks above every block of the kept tail. ``stride``
        (bm25): blocks start every ``stride`` tokens, overlapping (0: they do not). ``recompute``: the chosen
        blocks are read again as tokens instead of spliced as stored K/V (see :meth:`_spliced_answer`)."""
        blocks = config.blocks
        # the memory is read first, by the base model (a memory holds what the base model wrote); then the adapter,
        # with adapter=1, is on for everything this method reads and answers
        memory, tail = self._split_context(local, reserve=blocks.n_blocks * blocks.size
                                           * (1 + 2 * blocks.neighbours + blocks.following))
        with adapter_active(self.model) if config.adapter else contextlib.nullcontext():
            return self._splice_answers(config, choice, memory, tail, after_tail, in_view, stride, recompute)

    def _splice_answers(self, config: ImportConfig, choice: str, memory, tail: list[int], after_tail: bool,
                        in_view: bool, stride: int, recompute: bool) -> list[Generation]:
        """:meth:`_splice` once the memory and the kept tail are there."""
        from kvmap.splice import bm25_blocks, choose_blocks

        blocks = config.blocks
        if memory is None:  # the whole context fits next to the prompt: it is read as ordinary context
            return self._shared_context(tail, fits_window=True)
        shared = self._shared_prefill(tail) if tail and after_tail else None
        view = self._blocks_of(tail, blocks.size, stride) if in_view and choice == "bm25" else ()
        out = []
        for ex in self.examples:
            began = time.perf_counter()
            before, _ = prompt_parts(self.tok, ex, False)
            if choice == "bm25":
                ids = bm25_blocks(memory, ex.question, config.blocks.size, config.blocks.n_blocks, config.blocks.neighbours,
                                  in_view=view, stride=stride, following=config.blocks.following)
            elif choice == "layerwise":
                with torch.no_grad(), self.port.importing(memory, config) as trace:
                    self.model(torch.tensor(before)[None], use_cache=False)
                ids = dict(trace.blocks)
            else:  # the question's tokens and the assistant turn's opening vote, summed over layers
                ids = choose_blocks(self.port, memory, before, config, select_last=len(self._enc(ex.question)) + 6)
            answer = self._spliced_answer(ex, ids, time.perf_counter() - began, memory, tail, shared, recompute)
            first = ids if isinstance(ids, torch.Tensor) else next(iter(ids.values()))[0]  # layer 0, head 0
            texts = memory.token_texts()
            answer.extra["retrieved_answer"] = float(contains_answer("".join(texts[i] for i in first.tolist()),
                                                                     ex.answers))
            answer.extra["spliced_tokens"] = len(first)
            out.append(answer)
        return out

    def _kvmap(self, config: ImportConfig, text_choice: bool = False, local: int | None = None,
               tail_import: bool = False, bm25_blocks: int = 0, in_view: bool = True,
               stride: int = 0, tail_in_memory: bool = False) -> list[Generation]:
        """Memories imported while the question is read and the answer decoded. The recent context kept in the
        prompt (the tail) is ordinary context, prefilled once for the group without memory, as truncation reads
        it; ``tail_import``: the tail is read with memory import too, once per question (the first ``local``
        rows, which cost about 100 s an answer at a 4k tail on this CPU). ``bm25_blocks``: each question's
        token import searches only the tokens of the memory blocks BM25 ranks best for it (``in_view``: those
        ranked above every block of the tail; none, and no import, where the tail ranks first; ``stride``: the
        blocks start every ``stride`` tokens, overlapping). ``tail_in_memory``: the memory holds the tail too, so
        the question imports from all of the context, and with ``bm25_blocks`` nothing is gated: the tail's
        blocks are ranked as memory blocks, and one that holds the answer comes back next to the question as
        well as being read where it is."""
        from kvmap.splice import bm25_block_ids, bm25_memory

        memory, tail = self._split_context(local, tail_in_memory=tail_in_memory)
        if memory is None:  # the whole context fits next to the prompt: it is read as ordinary context
            return self._shared_context(tail, fits_window=True)
        shared = self._shared_prefill(tail) if tail and not tail_import else None
        view = self._blocks_of(tail, BM25_BLOCK, stride) if bm25_blocks and in_view and not tail_in_memory else ()
        out = []
        for ex in self.examples:
            before, after = prompt_parts(self.tok, ex, bool(tail))
            prompt = shared.rest_of_prompt(ex) if shared else before + tail + after if tail else before
            began = time.perf_counter()
            source = memory
            if text_choice:
                blocks = bm25_block_ids(memory, ex.question, config.blocks.size, config.blocks.n_blocks)
                config = config.with_options(fixed_blocks=tuple(blocks))
            elif bm25_blocks:
                # None where a block of the tail ranks first: no import
                source, _ = bm25_memory(memory, ex.question, bm25_blocks, BM25_BLOCK, stride, view)
            with self.port.importing(source, config) if source is not None else contextlib.nullcontext():
                answer = (self._generate(prompt, shared.cache, **shared.cost) if shared else self._generate(prompt))
            answer.seconds = time.perf_counter() - began
            if bm25_blocks:
                answer.extra["candidate_tokens"] = source.n_tokens if source is not None else 0
                answer.extra["retrieved_answer"] = float(source is not None and contains_answer(
                    "".join(source.token_texts()), ex.answers))
            out.append(answer)
        return out
