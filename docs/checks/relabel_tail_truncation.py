"""One-off migration (issue 15): ``truncate`` became head + tail truncation; rows written before by the
tail-only code are relabelled ``truncate-tail`` (what they are) in the run folders named on the command line.
metrics.json is rebuilt from the relabelled predictions. Run once; a second run changes nothing."""
import json
import sys
from pathlib import Path

import yaml

from kvmap.eval.runner import write_metrics

for folder in map(Path, sys.argv[1:]):
    pred = folder / "predictions.jsonl"
    rows = [json.loads(line) for line in pred.read_text().splitlines() if line.strip()]
    for r in rows:
        if r["method"] == "truncate":
            r["method"] = "truncate-tail"
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["methods"] = ["truncate-tail" if m == "truncate" else m for m in config["methods"]]
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_metrics(folder)
    print(f"{folder}: {sum(r['method'] == 'truncate-tail' for r in rows)} rows are truncate-tail")
