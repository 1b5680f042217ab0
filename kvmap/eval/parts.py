"""The dev and test parts of the evaluation data: variants and defaults are chosen on dev, and each
method is reported once on test.

What was looked at before the split existed is dev, so that nothing already used for a choice can
be reported as a test number:

- FairytaleQA (shipped val split, 23 stories): dev is the 10 stories every earlier run used (the
  first 10 of the seed-0 story order, the 4k pilot's story among them); test is the other 13.
- passkey, NIAH: generated from a seed; dev is the earlier stream (its example ids are unchanged),
  test a separate stream (ids marked ``test``).
- bAbI: dev is the earlier draw from bAbI's test file; test draws from the questions that no dev
  draw of seed 0 picks for any n up to :data:`BABI_DEV_MAX`.

A run's part is its ``task_options["part"]``; a run without one is dev (every run before the split).
"""
from __future__ import annotations

import random

from kvmap.errors import InputError

PARTS = ("dev", "test")
DEV_STORIES = ("the-lady-of-the-moon", "the-king-of-the-ants", "assipattle-and-the-mester-stoorworm",
               "charcol-nils-troll-woman", "kari-woodencoat", "the-page-boy-and-the-silver-goblet", "magic-apples",
               "the-battle-of-the-birds", "finn-the-giant-and-the-minister-of-lund", "helge-hal-in-blue-hill")
"""FairytaleQA val stories of the dev part; every other val story is test."""
BABI_DEV_MAX = 200
"""bAbI questions a dev draw of seed 0 may pick at most (per task) without touching the test pool."""


def check_part(part: str) -> str:
    if part not in PARTS:
        raise InputError(f"unknown part '{part}'; choose dev (where variants are chosen) or test (reported once)")
    return part


def part_of_run(config: dict) -> str:
    """The part a run folder's config.yaml says it ran on (dev when it says nothing)."""
    return check_part((config.get("task_options") or {}).get("part", "dev"))


def story_in_part(story: str, part: str) -> bool:
    """Whether a FairytaleQA val story belongs to ``part``."""
    return (story in DEV_STORIES) == (check_part(part) == "dev")


def stream(seed: int, part: str) -> str:
    """The name of a generated task's example stream: the seed alone for dev (as before the split)."""
    return str(seed) if check_part(part) == "dev" else f"test-{seed}"


def babi_test_pool(qa: int, n_samples: int) -> list[int]:
    """Indices of bAbI questions that no dev draw of seed 0 picks (for any n up to BABI_DEV_MAX)."""
    dev: set[int] = set()
    for n in range(1, min(BABI_DEV_MAX, n_samples) + 1):
        dev |= set(random.Random(f"babi-{qa}-0").sample(range(n_samples), n))
    return [i for i in range(n_samples) if i not in dev]
