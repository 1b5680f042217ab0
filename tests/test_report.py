"""RESULTS.md from run files: the generic harness's run folders, finished or still going."""
from __future__ import annotations

import json

import yaml

from kvmap.cli import main


def write_run(folder, task: str, rows: list[dict], methods: list[str], lengths: list[int], tail: str = "") -> None:
    """A run folder as ``kvmap eval TASK --out folder`` leaves it before metrics.json is written."""
    folder.mkdir(parents=True)
    config = {"task": task, "model": "m", "methods": methods, "lengths": lengths, "limit": len(rows),
              "seed": 0, "task_options": {}, "store": "exact", "max_new_tokens": 10}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def row(i: int, method: str, score: float, length: int = 1000, group: str | None = None, **extra) -> dict:
    return {"id": f"ex{i}", "group": group or f"ex{i}", "task": "passkey", "length": length, "depth": i / 4,
            "method": method, "question": "q", "answers": ["1"], "meta": {}, "output": "1", "score": score,
            "answer_s": 0.5, "context_s_per_example": 2.0, "decode_ms_per_token": 60.0, "prompt_tokens": 20,
            "rss_mb": 900.0, "context_tokens": length, **extra}


def test_report_builds_results_from_a_run_still_going(tmp_path):
    rows = [row(i, m, float(m == "kvmap" or i == 2)) for i in range(3) for m in ("kvmap", "truncate")]
    write_run(tmp_path / "runs" / "pk", "passkey", rows, ["kvmap", "truncate"], [1000], tail='{"id": "ex3", "cut')
    assert main(["report", str(tmp_path / "runs"), "-o", str(tmp_path / "RESULTS.md")]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| kvmap | 100.0% [44%–100%] n=3 |" in text
    assert "| truncate | 33.3% [6%–79%] n=3 |" in text
    assert "| 1000 | kvmap | 0.50 | 2.00 |" in text  # answer s, context s per example
