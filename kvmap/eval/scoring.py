"""Scoring generated answers: each task's rule, one function."""
from __future__ import annotations

import re
from functools import lru_cache


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", text.lower())).strip()


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(output: str, answers: list[str]) -> float:
    """ROUGE-L F1 of ``output`` against the best-matching reference (as the FairytaleQA paper)."""
    if not answers:
        return 0.0
    return max(_rouge().score(a, output)["rougeL"].fmeasure for a in answers)


def contains_answer(output: str, answers: list[str]) -> bool:
    """Some reference, normalised (lower case, punctuation dropped), occurs in the normalised output."""
    out = f" {_normalise(output)} "
    return any(f" {_normalise(a)} " in out for a in answers if _normalise(a))


def score(scorer: str, output: str, answers: list[str]) -> dict:
    """``{"score": float in [0, 1], ...}`` for one prediction under the example's scorer.

    ``passkey``: the first integer equals the key (Landmark Attention's rule); ``all``: share of the
    expected values present (RULER's string_match_all); ``contains``: a reference occurs in the
    output (BABILong compares lower-cased substrings); ``qa``: ROUGE-L F1, plus ``contains``.
    """
    if scorer == "passkey":
        found = re.search(r"\d+", output)
        return {"score": float(bool(found) and found.group() == answers[0])}
    if scorer == "all":
        return {"score": sum(a in output for a in answers) / len(answers)}
    if scorer == "contains":
        return {"score": float(contains_answer(output, answers))}
    if scorer == "qa":
        return {"score": rouge_l(output, answers), "contains": float(contains_answer(output, answers))}
    raise ValueError(f"unknown scorer {scorer}")
