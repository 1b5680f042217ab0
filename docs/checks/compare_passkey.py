"""Compare a passkey rerun with the committed run, trial by trial: identical outputs, same scores.

    python docs/checks/compare_passkey.py [NEW.jsonl OLD.jsonl]

Works on `kvmap eval passkey` predictions and on `kvmap bench scale` trials (methods kvmap, none).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

here = Path(__file__).parent
new_path = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "passkey-16k-after-issue14" / "predictions.jsonl"
old_path = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "passkey-runner-merge" / "16k-old-runner" / "predictions.jsonl"
old = {row["trial"]: row for row in map(json.loads, old_path.read_text().splitlines())}
same = total = 0
scores: dict[str, list[int]] = {}
for row in map(json.loads, new_path.read_text().splitlines()):
    for method in row.get("methods") or [m for m in ("kvmap", "none") if m in row]:
        before, after = old[row["trial"]][method], row[method]
        total += 1
        same += before["output"] == after["output"]
        counts = scores.setdefault(method, [0, 0, 0])
        counts[0] += after["correct"]
        counts[1] += before["correct"]
        counts[2] += 1
        if before["output"] != after["output"]:
            print(f"trial {row['trial']} {method}: {before['output']!r} -> {after['output']!r}")
print(f"{same}/{total} outputs identical")
for method, (now, then, n) in scores.items():
    print(f"  {method}: {now}/{n} now, {then}/{n} before")
