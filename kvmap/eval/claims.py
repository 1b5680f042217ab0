"""Numbers in prose, taken from the run files: the placeholders of runs/DISCUSSION.md (and any text the
report embeds) filled from the harness sections, so that no figure in RESULTS.md is typed by hand.

``{{score KEY PART LENGTH METHOD}}``: the cell's mean (``16.4%``); ``{{correct ...}}``: ``19/20``;
``{{cell ...}}``: mean, interval and n; ``{{diff KEY PART LENGTH A B}}``: A − B over the examples both
have, in points, with its story-clustered 95% interval. KEY is the task, or task/variant
(``niah/single``, ``babi/1``); PART is ``dev`` or ``test``. A placeholder naming no cell becomes a
visible ``[no such cell: ...]`` and is listed, so that a claim whose run is gone cannot pass unseen.
"""
from __future__ import annotations

import re

PLACEHOLDER = re.compile(r"\{\{(score|correct|cell|diff) ([^}]+)\}\}")


def fill_claims(text: str, sections: list) -> tuple[str, list[str]]:
    """``text`` with every placeholder replaced; and the placeholders that named nothing."""
    from kvmap.eval.report_grid import diff_text

    by_key = {(s.key, s.part): s for s in sections}
    missing: list[str] = []

    def replace(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2).split()
        want = 6 if kind == "diff" else 5
        section = by_key.get((args[0], args[1])) if len(args) == want - 1 else None
        try:
            length = int(args[2])
        except (IndexError, ValueError):
            section = None
        if section is not None and kind == "diff":
            text = diff_text(section, length, args[3], args[4])
            if text != "–":
                return text
        elif section is not None:
            cell = section.cells.get((length, args[3]))
            if cell and cell.get("n"):
                if kind == "score":
                    return f"{cell['score']:.1%}"
                if kind == "correct":
                    return f"{round(cell['score'] * cell['n'])}/{cell['n']}"
                return f"{cell['score']:.1%} [{cell['ci95'][0]:.0%}–{cell['ci95'][1]:.0%}], n={cell['n']}"
        missing.append(match.group(0))
        return f"**[no such cell: {match.group(1)} {match.group(2)}]**"

    return PLACEHOLDER.sub(replace, text), missing
