"""Passkey retrieval (Landmark Attention's template): a number hidden in repeated filler text.

Lengths are given in tokens; the filler is cut in characters (as in the template) to reach them.
Trials are spread evenly over depths 0..1, and each example is generated from its seed alone.
The task runs through the generic harness like every other (``kvmap eval passkey``,
:func:`kvmap.eval.tasks.passkey_examples`); this module only defines the examples and the score.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from kvmap.data import passkey_template


@dataclass
class PasskeyExample:
    """One passkey trial: the haystack (context), the question, and the answer."""

    context: str
    """Task description + filler with the information line at ``depth``."""
    question: str
    passkey: int
    depth: float
    instruction: str
    """The task description alone (what a memory-backed prompt still shows the model)."""


def make_example(tokenizer, length_tokens: int, depth: float, seed: int) -> PasskeyExample:
    """Build a passkey example whose full prompt is about ``length_tokens`` tokens long."""
    t = passkey_template()
    rng = random.Random(seed)
    passkey = rng.randint(1, 50000)
    garbage = t["garbage_sentence"]
    tokens_per_char = len(tokenizer(garbage, add_special_tokens=False)["input_ids"]) / len(garbage)
    info = t["information_line"].format(pass_key=passkey)
    fixed = len(tokenizer("\n".join([t["task_description"], info, t["final_question"]]),
                          add_special_tokens=False)["input_ids"])
    n_garbage = max(0, int((length_tokens - fixed) / tokens_per_char))
    # Repeat enough filler, then cut prefix/suffix in characters as the template does.
    garbage_inf = " ".join([garbage] * (n_garbage // len(garbage) + 2))
    n_prefix = int(round(depth * n_garbage))
    prefix, suffix = garbage_inf[:n_prefix], garbage_inf[:n_garbage - n_prefix]
    context = "\n".join([t["task_description"], prefix, info, suffix])
    return PasskeyExample(context, t["final_question"], passkey, depth, t["task_description"])


def depths(trials: int) -> list[float]:
    """``trials`` depths spread evenly over [0, 1]."""
    return [i / max(1, trials - 1) for i in range(trials)]


def score(generated: str, passkey: int) -> bool:
    """The template's rule: the first integer in the generated text equals the passkey."""
    found = re.search(r"\d+", generated)
    return bool(found) and int(found.group()) == passkey
