"""One-off migration (issue 16): ``in_view`` became the default of ``kvmap-splice-bm25``. Rows written before
under the bare name with a kept context and a memory (longer than the 4k window) spliced without the gate:
they are relabelled ``kvmap-splice-bm25:in_view=0`` (with any other options kept), and the ``:in_view=1``
rows take the bare name. Rows at 4k read the whole context as truncation does either way and keep their
name. metrics.json is rebuilt. Run once, on the folders named on the command line; a second run changes
nothing."""
import json
import sys
from pathlib import Path

import yaml

from kvmap.eval.runner import write_metrics

WINDOW_FITS = 4000  # at this length the context fits next to the prompt: no memory, nothing to gate


def relabel(method: str, length: int) -> str:
    base, _, options = method.partition(":")
    if base != "kvmap-splice-bm25" or "local=0" in options.split(":"):
        return method
    if "in_view=1" in options.split(":"):
        return ":".join([base] + [o for o in options.split(":") if o != "in_view=1"])
    if "in_view=" in options or length <= WINDOW_FITS:
        return method
    return ":".join([base] + ([options] if options else []) + ["in_view=0"])


for folder in map(Path, sys.argv[1:]):
    pred = folder / "predictions.jsonl"
    rows = [json.loads(line) for line in pred.read_text().splitlines() if line.strip()]
    if any("in_view=0" in r["method"] for r in rows):
        print(f"{folder}: already relabelled")
        continue
    changed = 0
    for r in rows:
        new = relabel(r["method"], r["length"])
        changed += new != r["method"]
        r["method"] = new
    pred.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    names = []
    for m in config["methods"]:  # a bare name may now name two cells: the 4k rows' and the relabelled ones
        for new in dict.fromkeys([relabel(m, 0)] + [r["method"] for r in rows if r["method"] == relabel(m, 10**9)]):
            if new not in names:
                names.append(new)
    config["methods"] = names
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_metrics(folder)
    print(f"{folder}: {changed} rows relabelled")
