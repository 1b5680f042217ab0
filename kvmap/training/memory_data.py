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
- ``babi`` (``babi_share``): the facts of a bAbI qa1 or qa2 *train* sample planted in order at sentence ends
  of one story, asked in the BABILong chat prompt of the bAbI evaluation; the answer in the format that
  prompt asks for. The evaluation draws its samples from bAbI's test file.

Two modes (``mode``): ``import`` answers with the seed's token-level import of the whole memory; ``splice``
answers as ``kvmap ask`` does by default: the memory blocks BM25 ranks best for the question have their
stored K/V spliced into the prompt (:mod:`kvmap.splice`), after the local context, before the question.

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
from kvmap.presets import SPLICE
from kvmap.reader import token_texts
from kvmap.splice import bm25_blocks
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
MODES = ("import", "splice")
BABI_TASKS = (1, 2)
"""bAbI tasks of the ``babi`` examples (the evaluation's qa1 and qa2)."""


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
    mode: str = "import"
    """``import``: the answer is read with token-level import of the memory (the first two adapters);
    ``splice``: with the BM25-chosen blocks' stored K/V spliced into the prompt (``kvmap ask``'s default)."""
    babi_share: float = 0.0
    """Share of ``babi`` examples (bAbI qa1/qa2 train facts in a story), drawn before the fact/qa choice and only
    when set, so the examples of earlier runs stay the same."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"training mode {self.mode!r}: choose {' or '.join(MODES)}")
        if not 0 <= self.babi_share <= 1:
            raise InputError(f"babi share is a share, 0 to 1, got {self.babi_share}")
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
    splice_ids: torch.Tensor | None = None
    """Splice mode: memory ids (M,) of the blocks BM25 chose, in reading order, spliced into the prompt at
    ``splice_at``; ``None`` in import mode."""
    splice_at: int = 0
    """Index into ``prompt_ids`` where the spliced blocks go (after the local context, before the question)."""

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
        babi = s.babi_share > 0 and rng.random() < s.babi_share  # drawn only when set (earlier runs' examples stay)
        kind = "fact" if rng.random() < s.fact_share else "qa"
        local = rng.choice(s.local_tokens)
        in_local = local > 0 and rng.random() < s.local_answer_share and not babi
        target, *negatives = rng.sample(pool, min(len(pool), 4))
        questions = [q for q in target[0]["questions"] if str(q.get("ex_or_im1", "")).startswith("explicit")
                     and q.get("answers_annotator1")]
        if not questions or in_local:  # a QA answer may sit anywhere in its story: only facts are made local
            kind = "fact"
        kind = "babi" if babi else kind
        pieces = self._pieces(rng, target, negatives, kind, local, in_local)
        if kind == "fact":
            prompt, answer, question = self._fact_prompt(pieces.pop(), local)
        elif kind == "babi":
            prompt, answer, question = self._babi_prompt(pieces.pop())
        else:
            q = rng.choice(questions)
            question = q["question"]
            prompt, answer = self._qa_prompt(question, q["answers_annotator1"][0], local)
        return self._assemble(kind, pieces, local, prompt, answer, not in_local, question)

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
        if kind == "qa":
            return stream
        if kind == "babi":
            sample = self._babi_sample(rng)
            statements = [" " + f for f in sample["facts"]]
            return self._plant(rng, stream, stream.index(target_piece), statements, 0) + [sample]
        key = f"{rng.choice(FACT_ADJECTIVES)} {rng.choice(FACT_NOUNS)}"
        fact = (key, str(rng.randint(100_000, 999_999)), rng.choice(FACT_TEMPLATES))
        statement = " " + fact[2][0].format(key=fact[0], value=fact[1])
        return self._plant(rng, stream, stream.index(target_piece), [statement], local if in_local else 0) + [fact]

    def _plant(self, rng, pieces: list, at: int, statements: list[str], within_last: int) -> list:
        """Insert the statements, in order, into the story ``pieces[at]`` at sentence ends (a single one within
        the story's last ``within_last`` tokens when the answer must be local), each exported in the story's
        context (the 256 tokens before it)."""
        ids, segment, _ = pieces[at]
        planted = [self.tok(st, add_special_tokens=False)["input_ids"] for st in statements]
        if segment not in self._ends:  # one decode per token: done once per story, not once per example
            self._ends[segment] = [i + 1 for i, t in enumerate(ids[:-1])
                                   if self.tok.decode([t]).rstrip().endswith((".", "!", "?"))]
        ends = self._ends[segment]
        lo = max(1, len(ids) - within_last + len(planted[0]) + 1) if within_last else 1
        places = [e for e in ends if e >= lo] or [len(ids)]
        if len(planted) == 1:
            cuts = [rng.choice(places)]
        else:  # several sentence ends in reading order (some shared where the story has too few)
            cuts = sorted(rng.sample(places, len(planted)) if len(places) >= len(planted)
                          else rng.choices(places, k=len(planted)))
        out, last = pieces[:at], 0
        for cut, fact_ids in zip(cuts, planted):
            out += [(ids[last:cut], segment, last), (fact_ids, self._export(ids[max(0, cut - 256):cut], fact_ids), 0)]
            last = cut
        return out + [(ids[last:], segment, last)] + pieces[at + 1:]

    def _babi_sample(self, rng) -> dict:
        """A bAbI qa1 or qa2 *train* sample of at most 16 facts (each fact costs an export), with its task."""
        from kvmap.data import babi

        if not hasattr(self, "_babi"):
            self._babi = {t: [x for x in babi(t, "train") if len(x["facts"]) <= 16] for t in BABI_TASKS}
        task = rng.choice(BABI_TASKS)
        return {**rng.choice(self._babi[task]), "task": task}

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

    def _fact_prompt(self, fact, local: int) -> tuple[list[int], str, str]:
        """(prompt ids, answer, the question BM25 ranks blocks for), in the completion style of NIAH."""
        key, value, (_, question, prefix) = fact
        ask = self.tok("\n" + question.format(key=key) + " " + prefix.format(key=key), add_special_tokens=False)
        # splice mode: the prompt is what follows the spliced blocks, as NIAH's (whose memory holds the instruction)
        head = [] if local or self.settings.mode == "splice" else self.tok(FACT_INSTRUCTION, add_special_tokens=False)["input_ids"]
        return head + ask["input_ids"], f" {value}.", question.format(key=key)

    def _babi_prompt(self, sample: dict) -> tuple[tuple[list[int], list[int]], str, str]:
        """(the bAbI evaluation's chat prompt around its context slot, the answer in the format it asks for,
        the question)."""
        from kvmap.data import babilong_prompts

        prompts = babilong_prompts()["DEFAULT_PROMPTS"][f"qa{sample['task']}"]
        instruction = "\n\n".join([prompts["instruction"], prompts["examples"], prompts["post_prompt"]])
        subject = sample["question"].rstrip("?").split()[-1]  # "Where is Mary?" / "Where is the football?"
        answer = (f"The most recent location of {subject} is {sample['answer']}." if sample["task"] == 1
                  else f"The {subject} is in the {sample['answer']}.")
        return context_prompt(self.tok, sample["question"], instruction), answer, sample["question"]

    def _qa_prompt(self, question: str, answer: str, local: int) -> tuple[list[int], str]:
        if local or self.settings.mode == "splice":  # (before, after) the context slot
            return context_prompt(self.tok, question, QA_INSTRUCTION), answer
        return chat_parts(self.tok, f"{QA_INSTRUCTION}\n\nQuestion: {question}")[0], answer

    def _assemble(self, kind, pieces, local: int, prompt, answer: str, in_memory: bool,
                  question: str) -> TuningExample:
        """Memory = every piece but the last ``local`` tokens; those go into the prompt. Splice mode: the memory
        keeps each token's text, and the blocks BM25 ranks best for ``question`` (above every block of the
        local context, as the evaluation's in-view gate chooses) go between the local context and the rest."""
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
        splice = self.settings.mode == "splice"
        texts = token_texts(self.tok, ids[:cut]) if splice else None
        kv = {l: (k[l][None], v[l][None]) for l in range(layout.n_layers)}
        memory = TensorMemory(layout, self.lm.model_id, kv, texts=texts)
        tail = ids[cut:]
        before, after = prompt if isinstance(prompt, tuple) else ([], prompt)  # chat: around the context slot
        prompt_ids = before + tail + after if isinstance(prompt, tuple) or splice else tail + prompt
        target = self.tok(answer, add_special_tokens=False)["input_ids"]
        if kind != "fact" and self.tok.eos_token_id is not None:
            target = target + [self.tok.eos_token_id]  # the chat turn ends after the answer
        ex = TuningExample(kind, memory, prompt_ids, target, in_memory)
        if splice:
            size, n_blocks = SPLICE["block_size"], SPLICE["n_blocks"]
            view = [self.tok.decode(tail[i:i + size]) for i in range(0, len(tail), size)]
            ex.splice_ids = bm25_blocks(memory, question, size, n_blocks, in_view=view)
            ex.splice_at = len(before) + len(tail)
        return ex


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
