"""Old passkey runner (kvmap eval passkey before issue 14's merge) against the harness that replaced it:
the same 20 trials of 16k tokens, output by output. Usage: python compare.py OLD_PREDICTIONS NEW_PREDICTIONS"""
import json
import sys
from pathlib import Path

old_rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
new_rows = [json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines() if line.strip()]
new = {(int(r["id"].rsplit("-", 1)[1]), r["method"]): r for r in new_rows if "output" in r}
same = differ = 0
for row in sorted(old_rows, key=lambda r: r["trial"]):
    for method in row["methods"]:
        if "output" not in row.get(method, {}):
            continue
        # the old runner's truncate was the tail-only one
        mine = new.get((row["trial"], "truncate-tail" if method == "truncate" else method))
        if mine is None:
            continue
        if mine["output"].strip() == row[method]["output"].strip():
            same += 1
        else:
            differ += 1
            print(f"trial {row['trial']} {method}: old {row[method]['output']!r} new {mine['output']!r}")
print(f"{same} outputs identical, {differ} different")
for method in sorted({m for r in old_rows for m in r["methods"]}):
    old_ok = sum(r[method].get("correct", False) for r in old_rows if method in r)
    new_method = "truncate-tail" if method == "truncate" else method
    new_ok = sum(r["score"] == 1.0 for r in new_rows if r["method"] == new_method and "score" in r)
    print(f"{method:22s} old {old_ok}/20  new {new_ok}/20")
