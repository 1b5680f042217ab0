"""Evaluation tasks: examples generated reproducibly from a seed, every method sees the same ones.

An :class:`Example` is a long ``context`` (what goes into memory, or into the prompt for text
baselines), a ``question`` asked after it, the ``answers`` a scorer accepts, and the ``gold``
passage (the needle, or the story section holding the answer) that the ``oracle`` method sees.
Examples that share a context share a ``group`` so the memory (or prompt cache) is built once.

Tasks: ``passkey`` (Landmark Attention), ``niah`` (RULER-style needles in a haystack of tales),
``fairytaleqa`` (a story followed by distractor tales), ``babi`` (bAbI facts spread through tales,
BABILong style).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

from kvmap.errors import InputError
from kvmap.eval import parts
from kvmap.eval.passkey import depths, make_example

TASKS = ("passkey", "niah", "fairytaleqa", "babi")
TEST_SEED_BASE = 10**9
"""Added to a passkey trial's seed in the test part (the dev part keeps the seeds it always had)."""


@dataclass
class Example:
    """One question about one long context."""

    task: str
    id: str
    """Stable id, unique within a run (used to resume)."""
    group: str
    """Examples with the same group share the same context (one memory, one prompt cache)."""
    length: int
    """Requested context length in tokens (for fairytaleqa: distractor tokens after the story)."""
    context: str
    """The long text."""
    question: str
    answers: list[str]
    """What the scorer accepts (several for multi-value needles and multi-annotator QA)."""
    gold: str
    """The passage that holds the answer: the ``oracle`` method's whole context."""
    instruction: str = ""
    """Task description shown with the question by every method."""
    style: str = "chat"
    """``chat``: the instruct model's chat template; ``completion``: raw text (passkey)."""
    scorer: str = "contains"
    """``passkey`` (first integer), ``all`` (share of answers present), ``contains``, ``qa`` (ROUGE-L)."""
    depth: float | None = None
    """Where the needle / facts sit in the context (0 = start, 1 = end)."""
    documents: list[str] = field(default_factory=list)
    """The context split into documents as a memory reads them (default: the context as one)."""
    meta: dict = field(default_factory=dict)

    def docs(self) -> list[str]:
        return self.documents or [self.context]


# ------------------------------------------------------------------------------------------
# Haystack text: sentences of public-domain tales, cut to a token budget.


@lru_cache(maxsize=4)
def _tale_sentences(exclude: frozenset = frozenset()) -> tuple[str, ...]:
    from kvmap.data import tales

    out = []
    for tale in tales():
        if tale["id"] in exclude:
            continue
        text = re.sub(r"\s+", " ", tale["text"]).strip()
        out += [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    return tuple(out)


def haystack(tokenizer, n_tokens: int, rng: random.Random, exclude: frozenset = frozenset()) -> list[str]:
    """Consecutive tale sentences (from a random start) totalling about ``n_tokens`` tokens."""
    sentences = _tale_sentences(exclude)
    if n_tokens <= 0:
        return []
    start = rng.randrange(len(sentences))
    out, total = [], 0
    i = start
    while total < n_tokens:
        s = sentences[i % len(sentences)]
        out.append(s)
        total += len(tokenizer(" " + s, add_special_tokens=False)["input_ids"])
        i += 1
    return out


def _insert(sentences: list[str], items: list[str], depths: list[float]) -> list[str]:
    """Insert ``items`` between sentences at the given depths (kept in the given order)."""
    out = list(sentences)
    places = [round(d * len(sentences)) for d in depths]
    for offset, (place, item) in enumerate(sorted(zip(places, items), key=lambda p: p[0])):
        out.insert(place + offset, item)
    return out


# ------------------------------------------------------------------------------------------
# The tasks.


def passkey_examples(tokenizer, length: int, n: int, seed: int = 0, part: str = "dev") -> list[Example]:
    """Landmark-Attention passkey at ``length`` tokens, depths spread over 0..1."""
    out = []
    test = parts.check_part(part) == "test"
    for i, depth in enumerate(depths(n)):
        ex = make_example(tokenizer, length, depth, seed=seed * 100003 + i + (TEST_SEED_BASE if test else 0))
        info = f"The pass key is {ex.passkey}. Remember it. {ex.passkey} is the pass key."
        # n in the id: depths are spread over n trials
        eid = f"passkey-{'test-' if test else ''}{length}-{seed}-{n}-{i}"
        out.append(Example("passkey", eid, eid, length,
                           ex.context, ex.question, [str(ex.passkey)], gold=ex.instruction + "\n" + info,
                           instruction=ex.instruction, style="completion", scorer="passkey", depth=depth))
    return out


_NIAH_WORDS = ("amber", "brisk", "cobalt", "dusky", "eager", "frosty", "gentle", "hollow", "ivory", "jolly",
               "keen", "lunar", "misty", "noble", "olive", "proud", "quiet", "rustic", "silver", "tidy")
_NIAH_NOUNS = ("anchor", "badger", "candle", "dragon", "ember", "falcon", "garden", "harbor", "island", "jacket",
               "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "ribbon", "saddle", "tower")
NIAH_VARIANTS = ("single", "multikey", "multivalue", "multiquery")


def niah_examples(tokenizer, length: int, n: int, seed: int = 0, variant: str = "single",
                  part: str = "dev") -> list[Example]:
    """RULER-style needles ("One of the special magic numbers for {key} is: {value}.") in tales.

    ``single``: one needle; ``multikey``: 4 needles with different keys, one asked;
    ``multivalue``: 4 values for one key, all asked; ``multiquery``: 4 keys, 2 asked.
    The first needle sits at the example's depth, the others at random depths. In the test part all
    examples of a length share one haystack (only needles and depths differ), so a reader's chunk
    cache reuses the prefix before the first needle (the dev part keeps the haystacks it always had).
    """
    from kvmap.data import niah_template

    if variant not in NIAH_VARIANTS:
        raise InputError(f"unknown niah variant '{variant}'; choose from {', '.join(NIAH_VARIANTS)}")
    t = niah_template()
    out = []
    stream = parts.stream(seed, part)
    for i, depth in enumerate(depths(n)):
        rng = random.Random(f"niah-{variant}-{length}-{stream}-{i}")
        keys = [f"{a}-{b}" for a, b in zip(rng.sample(_NIAH_WORDS, 4), rng.sample(_NIAH_NOUNS, 4))]
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(4)]
        if variant == "single":
            pairs, asked = [(keys[0], values[0])], [keys[0]]
        elif variant == "multikey":
            pairs, asked = list(zip(keys, values)), [keys[0]]
        elif variant == "multivalue":
            pairs, asked = [(keys[0], v) for v in values], [keys[0]]
        else:
            pairs, asked = list(zip(keys, values)), keys[:2]
        needles = [t["needle"].format(type_needle_v="numbers", key=k, value=v) for k, v in pairs]
        needle_tokens = sum(len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in needles)
        sentences = haystack(tokenizer, length - needle_tokens - 60, rng if part == "dev" else
                             random.Random(f"niah-hay-{variant}-{length}-{stream}"))  # test: one shared haystack
        needle_depths = [depth] + [rng.random() for _ in needles[1:]]
        query = " and ".join(asked)
        intro = t["template"].partition("{context}")[0].format(type_needle_v="numbers").strip()
        context = intro + "\n" + " ".join(_insert(sentences, needles, needle_depths))
        question = t["template"].split("{context}\n")[1].format(type_needle_v="numbers", query=query)
        answer_prefix = t["answer_prefix"].format(type_needle_v="numbers", query=query)
        answers = [v for k, v in pairs if k in asked]
        gold = intro + "\n" + " ".join(s for s, (k, _) in zip(needles, pairs) if k in asked)
        eid = f"niah-{variant}-{length}-{stream}-{n}-{i}"  # n in the id: depths are spread over n examples
        out.append(Example("niah", eid, eid, length, context, question + answer_prefix, answers, gold,
                           instruction=intro, style="completion",
                           scorer="all", depth=depth, meta={"variant": variant}))
    return out


def fairytaleqa_examples(tokenizer, distractor_tokens: int, n: int, seed: int = 0, split: str = "val",
                         data=None, per_story: int = 5, part: str = "dev") -> list[Example]:
    """FairytaleQA: a story, then ``distractor_tokens`` tokens of other tales, then a question.

    Questions are explicit ones (the answer is stated in the text), ``per_story`` per story from
    stories taken in a seeded order until ``n`` questions; the gold passage is the answer's
    section(s). Distractor tales never contain the story itself (overlap table). On the shipped val
    split only the stories of ``part`` are used (:mod:`kvmap.eval.parts`); another file or split is
    used whole, and its part is its own.
    """
    from kvmap.data import fairytaleqa, fairytaleqa_overlap

    stories = fairytaleqa(split, path=data)
    in_part = (lambda story: parts.story_in_part(story, part)) if data is None and split == "val" else None
    overlap = fairytaleqa_overlap()
    rng = random.Random(f"fairytaleqa-{seed}")
    order = list(range(len(stories)))
    rng.shuffle(order)
    out: list[Example] = []
    for si in order:
        if len(out) >= n:
            break
        story = stories[si]
        if in_part is not None and not in_part(story["story"]):
            continue  # skipped after the shuffle, so each part keeps the seed's story order
        sections = {int(s["section"]): s["text"] for s in story["sections"]}
        text = "\n\n".join(sections[k] for k in sorted(sections))
        questions = [q for q in story["questions"] if str(q.get("ex_or_im1", "")).startswith("explicit")]
        qrng = random.Random(f"fairytaleqa-{seed}-{story['story']}")
        qrng.shuffle(questions)
        story_rng = random.Random(f"fairytaleqa-hay-{seed}-{story['story']}-{distractor_tokens}")
        distractors = " ".join(haystack(tokenizer, distractor_tokens, story_rng,
                                        frozenset(overlap.get(story["story"], ()))))
        group = f"fairytaleqa-{distractor_tokens}-{seed}-{story['story']}"
        for q in questions[:per_story]:
            if len(out) >= n:
                break
            cor = [int(c) for c in re.findall(r"\d+", str(q.get("cor_section", ""))) if int(c) in sections]
            gold = "\n\n".join(sections[c] for c in cor) or text
            answers = [a for a in (q.get("answers_annotator1") or []) + (q.get("answers_annotator2") or []) if a]
            context = text + ("\n\n" + distractors if distractors else "")
            out.append(Example("fairytaleqa", f"{group}-{q['question_id']}", group, distractor_tokens, context,
                               q["question"], answers, gold,
                               instruction="Read the story and answer the question in one short sentence.",
                               scorer="qa", documents=[text] + ([distractors] if distractors else []),
                               meta={"story": story["story"], "story_tokens": len(tokenizer(text)["input_ids"])}))
    return out


def babi_examples(tokenizer, length: int, n: int, seed: int = 0, qa: int = 1, part: str = "dev") -> list[Example]:
    """bAbI qa1–qa3 facts spread (in order) between tale sentences, BABILong style (in the test part
    over one haystack per length, as for NIAH)."""
    from kvmap.data import babi, babilong_prompts

    if qa not in (1, 2, 3):
        raise InputError(f"babi task qa{qa} is not included; choose 1, 2 or 3")
    samples = babi(qa, "test")
    prompts = babilong_prompts()["DEFAULT_PROMPTS"][f"qa{qa}"]
    stream = parts.stream(seed, part)
    rng = random.Random(f"babi-{qa}-{stream}")
    pool = range(len(samples)) if part == "dev" else parts.babi_test_pool(qa, len(samples))
    picks = rng.sample(pool, min(n, len(pool)))
    out = []
    for i, pick in enumerate(picks):
        s = samples[pick]
        srng = random.Random(f"babi-{qa}-{length}-{stream}-{i}")
        fact_tokens = sum(len(tokenizer(" " + f, add_special_tokens=False)["input_ids"]) for f in s["facts"])
        sentences = haystack(tokenizer, length - fact_tokens - 300, srng if part == "dev" else
                             random.Random(f"babi-hay-{qa}-{length}-{stream}"))  # test: one shared haystack
        fact_depths = sorted(srng.random() for _ in s["facts"])
        context = " ".join(_insert(sentences, s["facts"], fact_depths))
        instruction = "\n\n".join([prompts["instruction"], prompts["examples"], prompts["post_prompt"]])
        eid = f"babi-qa{qa}-{length}-{stream}-{n}-{i}"  # n in the id: the sample drawn depends on n
        out.append(Example("babi", eid, eid, length, context, s["question"], [s["answer"]], " ".join(s["facts"]),
                           instruction=instruction, scorer="contains", depth=fact_depths[0] if fact_depths else None,
                           meta={"qa": qa}))
    return out


def make_examples(task: str, tokenizer, length: int, n: int, seed: int = 0, **options) -> list[Example]:
    """The first ``n`` examples of ``task`` at ``length`` tokens (same seed, same examples)."""
    makers = {"passkey": passkey_examples, "niah": niah_examples, "fairytaleqa": fairytaleqa_examples,
              "babi": babi_examples}
    if task not in makers:
        raise InputError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    return makers[task](tokenizer, length, n, seed, **options)
