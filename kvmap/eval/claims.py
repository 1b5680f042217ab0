"""Numbers in prose, taken from the run files: the placeholders of runs/DISCUSSION.md (and any text the
report embeds) filled from the harness sections, so that no figure in RESULTS.md is typed by hand.

``{{score KEY PART LENGTH METHOD}}``: the cell's mean (``16.4%``); ``{{correct ...}}``: ``19/20``;
``{{cell ...}}``: mean, interval and n; ``{{diff KEY PART LENGTH A B}}``: A − B over the examples both
have, in points, with its story-clustered 95% interval; ``{{share KEY PART LENGTH A B}}``: A's mean over B's on
the examples both have (``87% (n=52)``). KEY is the task, or task/variant
(``niah/single``, ``babi/1``); PART is ``dev`` or ``test``. ``{{json FILE FIELD [FORMAT]}}``: a field
(dotted path, list items by index) of a JSON run file under the runs folder (the scale and bridge
results), formatted with a Python format spec: ``{{json scale/filler-1m/passkey-scale.json
speed.decode_ratio .2f}}``. A placeholder naming no cell becomes a
visible ``[no such cell: ...]`` and is listed, so that a claim whose run is gone cannot pass unseen.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

PLACEHOLDER = re.compile(r"\{\{(score|correct|cell|diff|share|json) ([^}]+)\}\}")


def _json_field(runs: Path, args: list[str]) -> str | None:
    """The formatted field a ``json`` placeholder names, or None if the file or the field is not there."""
    if len(args) not in (2, 3) or runs is None or ".." in Path(args[0]).parts or Path(args[0]).is_absolute():
        return None
    try:
        value = json.loads((runs / args[0]).read_text())
        for key in args[1].split("."):
            value = value[int(key)] if isinstance(value, list) else value[key]
        return format(value, args[2] if len(args) == 3 else "")
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def fill_claims(text: str, sections: list, runs: Path | None = None) -> tuple[str, list[str]]:
    """``text`` with every placeholder replaced; and the placeholders that named nothing."""
    from kvmap.eval.report_grid import diff_text, share_text

    by_key = {(s.key, s.part): s for s in sections}
    missing: list[str] = []

    def replace(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2).split()
        if kind == "json":
            value = _json_field(runs, args)
            if value is None:
                missing.append(match.group(0))
                return f"**[no such field: {match.group(2)}]**"
            return value
        n_args = 5 if kind in ("diff", "share") else 4  # KEY PART LENGTH METHOD [REFERENCE]
        section = by_key.get((args[0], args[1])) if len(args) == n_args else None
        try:
            length = int(args[2])
        except (IndexError, ValueError):
            section = None
        if section is not None and kind in ("diff", "share"):
            text = (diff_text if kind == "diff" else share_text)(section, length, args[3], args[4])
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
