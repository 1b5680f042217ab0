"""Run-file helpers: JSONL logs that are appended as results come and read back after a kill."""
from __future__ import annotations

import json
import os


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL log; a missing file gives [], a line cut by a kill is left out (it runs again)."""
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append ``rows`` to a JSONL log, one line each."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
