"""Training examples for memory-aware fine-tuning, built only from FairytaleQA's *train* split.

Every example is a memory (what the base model exported reading some stories), an optional local
context (the last tokens of the same text stream, read as ordinary attention context, as every kvmap
method keeps the recent context), a prompt and the answer tokens the loss is taken on. Two kinds:

- ``fact``: a planted fact ("The secret code of the crimson walrus is 482913.") inside one story,
  asked in the completion style of the NIAH and passkey evaluations. Keys are words and values six-digit
  numbers from vocabularies disjoint from every evaluation's (NIAH: other words, seven digits; passkey:
  at most five digits), and the statement templates are not the evaluations' templates.
- ``qa``: an explicit FairytaleQA train question about one story, in the chat style of the FairytaleQA
  evaluation; the answer is the first annotator's.

The other stories in the memory are hard negatives: the same kind of prose, from other documents.
In a share of the examples (``local_answer_share``) the planted fact sits in the local context and the
memory holds no copy of it, so the model also learns to leave memories alone when they do not help.

Stories whose text is also one of the shipped tales (the evaluations' haystacks) are left out, and so
is the whole val split: no evaluation text is ever trained on. The stories are read once into a pool
memory (a kvmap memory folder, one source per story, cached by model and settings); an example's
memory is put together from the pool's stored K/V, and only a planted fact is exported per example.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from kvmap.answer import chat_parts, context_prompt
from kvmap.errors import InputError
from kvmap.stores.tensor import TensorMemory, recording

FACT_ADJECTIVES = ("crimson", "velvet", "granite", "woolen", "copper", "sunlit", "hazel", "scarlet", "mossy", "pebbled",
                   "stormy", "golden", "speckled", "rosy", "sandy", "wintry", "dappled", "marble", "cedar", "linen")
FACT_NOUNS = ("walrus", "teapot", "compass", "beetle", "chimney", "goblet", "heron", "kiln", "ladder", "mitten",
              "nutmeg", "otter", "parrot", "quill", "raft", "spindle", "thimble", "urchin", "violin", "wagon")
FACT_TEMPLATES = (
    ("The secret code of the {key} is {value}.", "What is the secret code of the {key}?",
     "The secret code of the {key} is"),
    ("Remember this: the {key} keeps the number {value}.", "Which number does the {key} keep?",
     "The {key} keeps the number"),
    ("Note for later: the lock of the {key} opens with {value}.", "What opens the lock of the {key}?",
     "The lock of the {key} opens with"),
)
"""(statement, question, answer prefix); the answer is `` {value}.`` after the prefix."""
FACT_INSTRUCTION = "Some facts are hidden in the text below. Remember them: you will be asked about one."
QA_INSTRUCTION = "Read the story and answer the question in one short sentence."
"""The FairytaleQA evaluation's instruction, so the tuned prompt is the evaluated one."""


@dataclass(frozen=True)
class DataSettings:
    """What the examples look like; part of the pool's cache key only through ``n_stories``/``seed``."""

    n_stories: int = 40
    """Train stories in the pool (about 2,800 tokens each); the first ``n_val_stories`` of them are held out."""
    n_val_stories: int = 6
    memory_tokens: tuple[int, int] = (1024, 4096)
    """Range of an example's memory size (the target story plus negatives, cut to size)."""
    local_tokens: tuple[int, ...] = (0, 64, 256, 512)
    """Local context lengths, drawn uniformly (0: the prompt holds only the instruction and question)."""
    fact_share: float = 0.6
    """Share of ``fact`` examples; the rest are ``qa``."""
    local_answer_share: float = 0.2
    """Share of examples whose answer lies in the local context (the memory: negatives only)."""
    instruction_in_memory: float = 0.0
    """Share of ``fact`` examples whose text stream starts with the instruction, as an evaluation's context
    does (NIAH's starts with its task description), so that the memory holds it too and the model learns
    not to answer with it. 0 for the first adapter (``memory-adapter``), which was trained without it."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_val_stories < 2 or self.n_stories < self.n_val_stories + 2:
            raise InputError(f"{self.n_stories} stories with {self.n_val_stories} held out leave too few: each split "
                             "needs 2 or more (a target and a negative); give more stories")


@dataclass
class TuningExample:
    """One training step's input: a memory, the prompt and the answer tokens (the loss is on those)."""

    kind: str
    memory: TensorMemory
    prompt_ids: list[int]
    target_ids: list[int]
    answer_in_memory: bool

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.tensor(self.prompt_ids + self.target_ids)[None]  # (1, T)


def train_stories(n: int, seed: int) -> list[dict]:
    """``n`` FairytaleQA train stories in a seeded order, none of them among the shipped tales."""
    from kvmap.data import fairytaleqa, fairytaleqa_overlap

    overlap = fairytaleqa_overlap()
    stories = sorted((s for s in fairytaleqa("train") if s["story"] not in overlap), key=lambda s: s["story"])
    random.Random(f"finetune-stories-{seed}").shuffle(stories)
    if n > len(stories):
        raise InputError(f"--stories {n}: only {len(stories)} train stories are free of evaluation text")
    return stories[:n]


def story_text(story: dict) -> str:
    """A story's sections joined as the FairytaleQA evaluation joins them."""
    sections = {int(s["section"]): s["text"] for s in story["sections"]}
    return "\n\n".join(sections[k] for k in sorted(sections))


class TuningData:
    """Examples for index ``i`` of a split, the same every time (seeded by split and index).

    Parameters
    ----------
    lm : the base model (a :class:`kvmap.models.loading.LoadedModel`; its adapter, if any, is off while
        the pool and planted facts are exported, as it is for every memory).
    pool : a memory folder holding the stories of :func:`train_stories` (:func:`build_pool`), one source each.
    """

    def __init__(self, lm, pool, stories: list[dict], settings: DataSettings | None = None):
        self.lm, self.pool, self.settings = lm, pool, settings or DataSettings()
        self.tok = lm.tokenizer
        position = {s["source"]: i for i, s in enumerate(pool.sources())}
        missing = [s["story"] for s in stories if s["story"] not in position]
        if missing:
            raise InputError(f"the pool memory {pool.path} lacks {len(missing)} stories (e.g. {missing[0]!r}); "
                             "build it again with build_pool")
        self.stories = [(s, position[s["story"]]) for s in stories]
        self._ids: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}  # segment -> token indices right after a sentence end
        n_val = self.settings.n_val_stories
        self.split_stories = {"val": self.stories[:n_val], "train": self.stories[n_val:]}

    def _story_ids(self, segment: int, story: dict) -> list[int]:
        """Token ids the pool holds for one story (its first ``sinks`` were not stored)."""
        if segment not in self._ids:
            ids = self.tok(story_text(story), add_special_tokens=False)["input_ids"]
            self._ids[segment] = ids[len(ids) - self.pool.segment_sizes()[segment]:]
        return self._ids[segment]

    def example(self, split: str, index: int) -> TuningExample:
        s = self.settings
        rng = random.Random(f"finetune-{split}-{s.seed}-{index}")
        pool = self.split_stories[split]
        if len(pool) < 2:
            raise InputError(f"the {split} split needs at least 2 stories (a target and a negative)")
        kind = "fact" if rng.random() < s.fact_share else "qa"
        local = rng.choice(s.local_tokens)
        in_local = local > 0 and rng.random() < s.local_answer_share
        target, *negatives = rng.sample(pool, min(len(pool), 4))
        questions = [q for q in target[0]["questions"] if str(q.get("ex_or_im1", "")).startswith("explicit")
                     and q.get("answers_annotator1")]
        if not questions or in_local:  # a QA answer may sit anywhere in its story: only facts are made local
            kind = "fact"
        pieces = self._pieces(rng, target, negatives, kind, local, in_local)
        if kind == "fact":
            prompt, answer = self._fact_prompt(pieces.pop(), local)
        else:
            q = rng.choice(questions)
            prompt, answer = self._qa_prompt(q["question"], q["answers_annotator1"][0], local)
        return self._assemble(kind, pieces, local, prompt, answer, not in_local)

    def _pieces(self, rng: random.Random, target, negatives, kind: str, local: int, in_local: bool) -> list:
        """The text stream as pieces ``(ids, segment, start)``; a ``fact`` example's last item is its
        fact ``(key, value, template)`` (popped by the caller).

        Answer in memory: negatives, the target story, then the start of one more negative, at least as
        long as the local context, so the whole target story lies in memory. Answer local: negatives, then
        the target story last, the fact planted in its last ``local`` tokens.
        """
        budget = rng.randint(*self.settings.memory_tokens) + local
        story, segment = target
        target_piece = (self._story_ids(segment, story), segment, 0)
        negs = [(self._story_ids(seg, st), seg, 0) for st, seg in negatives]
        after = []
        if not in_local:
            ids, seg, _ = negs.pop()
            after = [(ids[:local + rng.randint(16, 512)], seg, 0)]
        stream = negs + [target_piece] + after
        total = sum(len(p[0]) for p in stream)
        while total > budget and stream[0] is not target_piece:  # negatives before the target go first
            total -= len(stream.pop(0)[0])
        share = self.settings.instruction_in_memory  # drawn only when set: examples of earlier runs stay the same
        if kind == "fact" and share > 0 and rng.random() < share:
            stream.insert(0, self._instruction_piece())
        if kind != "fact":
            return stream
        key = f"{rng.choice(FACT_ADJECTIVES)} {rng.choice(FACT_NOUNS)}"
        fact = (key, str(rng.randint(100_000, 999_999)), rng.choice(FACT_TEMPLATES))
        return self._plant(rng, stream, stream.index(target_piece), fact, local if in_local else 0) + [fact]

    def _plant(self, rng, pieces: list, at: int, fact, within_last: int) -> list:
        """Insert the fact's statement into the story ``pieces[at]`` at a sentence end (within its last
        ``within_last`` tokens when the answer must be local), exported in the story's context."""
        ids, segment, _ = pieces[at]
        statement = " " + fact[2][0].format(key=fact[0], value=fact[1])
        fact_ids = self.tok(statement, add_special_tokens=False)["input_ids"]
        if segment not in self._ends:  # one decode per token: done once per story, not once per example
            self._ends[segment] = [i + 1 for i, t in enumerate(ids[:-1])
                                   if self.tok.decode([t]).rstrip().endswith((".", "!", "?"))]
        ends = self._ends[segment]
        lo = max(1, len(ids) - within_last + len(fact_ids) + 1) if within_last else 1
        cut = rng.choice([e for e in ends if e >= lo] or [len(ids)])
        exported = self._export(ids[max(0, cut - 256):cut], fact_ids)
        return pieces[:at] + [(ids[:cut], segment, 0), (fact_ids, exported, 0),
                              (ids[cut:], segment, cut)] + pieces[at + 1:]

    def _instruction_piece(self) -> tuple:
        """The fact instruction as the first piece of a stream, exported once."""
        if not hasattr(self, "_instruction"):
            ids = self.tok(FACT_INSTRUCTION + "\n", add_special_tokens=False)["input_ids"]
            self._instruction = (ids, self._export([], ids), 0)
        return self._instruction

    @torch.no_grad()
    def _export(self, before: list[int], ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Pre-RoPE K/V (L, n, H, d) of ``ids`` read right after ``before`` (the adapter off, as for every memory)."""
        port = self.lm.port
        with recording(port) as kv:
            port.base(input_ids=torch.tensor(before + ids)[None])
        n = len(ids)
        keys = np.stack([kv[l][0][0, :, -n:].transpose(0, 1).numpy() for l in range(port.layout.n_layers)])
        values = np.stack([kv[l][1][0, :, -n:].transpose(0, 1).numpy() for l in range(port.layout.n_layers)])
        return keys, values

    def _fact_prompt(self, fact, local: int) -> tuple[list[int], str]:
        key, value, (_, question, prefix) = fact
        ask = self.tok("\n" + question.format(key=key) + " " + prefix.format(key=key), add_special_tokens=False)
        head = [] if local else self.tok(FACT_INSTRUCTION, add_special_tokens=False)["input_ids"]
        return head + ask["input_ids"], f" {value}."

    def _qa_prompt(self, question: str, answer: str, local: int) -> tuple[list[int], str]:
        if local:
            return list(context_prompt(self.tok, question, QA_INSTRUCTION)), answer
        return chat_parts(self.tok, f"{QA_INSTRUCTION}\n\nQuestion: {question}")[0], answer

    def _assemble(self, kind, pieces, local: int, prompt, answer: str, in_memory: bool) -> TuningExample:
        """Memory = every piece but the last ``local`` tokens; those go into the prompt."""
        layout = self.lm.port.layout
        ids = [t for p in pieces for t in p[0]]
        cut = len(ids) - local
        keys, values, taken = [], [], 0
        for piece_ids, where, start in pieces:
            n = min(len(piece_ids), max(0, cut - taken))
            if n > 0:
                if isinstance(where, tuple):  # a planted fact, exported for this example
                    k, v = where[0][:, :n], where[1][:, :n]
                else:
                    kv = [self.pool.segment_kv(where, l) for l in range(layout.n_layers)]
                    k = np.stack([a[start:start + n] for a, _ in kv])
                    v = np.stack([b[start:start + n] for _, b in kv])
                keys.append(k)
                values.append(v)
            taken += len(piece_ids)
        k = torch.from_numpy(np.concatenate(keys, axis=1).astype(np.float32)).permute(0, 2, 1, 3)  # (L, H, M, d)
        v = torch.from_numpy(np.concatenate(values, axis=1).astype(np.float32)).permute(0, 2, 1, 3)
        memory = TensorMemory(layout, self.lm.model_id, {l: (k[l][None], v[l][None]) for l in range(layout.n_layers)})
        tail = ids[cut:]
        if kind == "qa" and local:
            before, after = prompt
            prompt_ids = before + tail + after
        else:
            prompt_ids = tail + prompt if local else prompt
        target = self.tok(answer, add_special_tokens=False)["input_ids"]
        if kind == "qa" and self.tok.eos_token_id is not None:
            target = target + [self.tok.eos_token_id]  # the chat turn ends after the answer
        return TuningExample(kind, memory, prompt_ids, target, in_memory)


def pool_key(model_id: str, settings: DataSettings, reader) -> str:
    raw = json.dumps({"model": model_id, "n": settings.n_stories, "seed": settings.seed, "reader": asdict(reader)},
                     sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def build_pool(lm, stories: list[dict], folder, reader=None, progress: bool = True):
    """The stories read into a memory folder at ``folder`` (one source per story); an existing complete
    pool there is opened instead, and a partial one finished (each story is its own atomic segment)."""
    from kvmap.reader import ReaderConfig, read_into
    from kvmap.stores import Memory

    reader = reader or ReaderConfig()
    memory = Memory.open_or_create(folder, lm.model_id, lm.port.layout)
    done = {s["source"] for s in memory.sources()}
    todo = [s for s in stories if s["story"] not in done]
    for story in todo:
        read_into(lm.port, lm.tokenizer, memory, story["story"], [story_text(story)], reader, progress=progress)
    return memory
