"""RESULTS.md's section on the attention-interface port (``runs/port``): what replacing the copied
attention forward cost and changed, measured against the port it replaced.

- ``decode_cost.json`` (``benchmarks/port_decode_cost.py``): decode ms/token, old and new port in one run.
- ``passkey-16k*/`` (``kvmap eval passkey``): the new port's answers on examples the old port answered with the
  same method (:data:`OLD_PORT_RUNS`: the test-part grid, the dev-part passkey run), on the ids both have.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from kvmap.stats import wilson


OLD_PORT_RUNS = ("grid/passkey", "passkey-16k")
"""Run folders (under runs/) the old port answered passkeys in: the test-part grid, the dev-part passkey run."""


def _rows(path: Path, method: str, length: int) -> dict[str, float]:
    """id -> score of ``method`` at ``length`` in a predictions.jsonl."""
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["id"]: float(r["score"]) for r in rows if r["method"] == method and r["length"] == length}


def _rate(scores: list[float]) -> str:
    hits, n = int(sum(scores)), len(scores)
    lo, hi = wilson(hits, n)
    return f"{hits}/{n} ({100 * hits / max(n, 1):.0f}% [{100 * lo:.0f}, {100 * hi:.0f}])"


def port_section(port_runs: Path) -> list[str]:
    lines = ["## One port through transformers' attention interface", "",
             "The causal-LM port now works inside the attention function transformers calls "
             "(`kvmap/models/interface.py`) instead of swapping in a copy of Llama's attention forward. "
             "Parity (every exported token imported at its true position = full attention, within 1e-4) is a "
             "test on Llama, Qwen2, Qwen3, Mistral, Phi-3 and Gemma 3 (`tests/test_interface_port.py`). What it "
             "costs and changes on SmolLM2-135M, measured against the port it replaced:", ""]
    cost = port_runs / "decode_cost.json"
    if cost.exists():
        r = json.loads(cost.read_text())
        s = r["settings"]
        lines += [f"Decode ms/token, median of {s['rounds']} worker processes per port ({s['order']}), "
                  f"{s['steps']} steps each, a {s['memory_tokens']}-token memory of tales, {s['threads']} threads; "
                  f"old port = commit {s['old_commit']} (`benchmarks/port_decode_cost.py`):", "",
                  "| mode | old port | new port | new / old |", "|---|---|---|---|"]
        for mode, ratio in r["new_over_old"].items():
            old, new = r["decode_ms_median"]["old"][mode], r["decode_ms_median"]["new"][mode]
            lines.append(f"| {mode} | {old:.1f} | {new:.1f} | {ratio:.3f} |")
        lines.append("")
    for run in sorted(port_runs.glob("passkey-16k*")):
        if not (run / "predictions.jsonl").exists():
            continue
        config = yaml.safe_load((run / "config.yaml").read_text())
        part = (config.get("task_options") or {}).get("part", "dev")
        for method in config["methods"]:
            new = _rows(run / "predictions.jsonl", method, 16000)
            for earlier in OLD_PORT_RUNS:
                old_file = port_runs.parent / earlier / "predictions.jsonl"
                old = _rows(old_file, method, 16000) if old_file.exists() else {}
                both = sorted(set(new) & set(old))
                if both:
                    break
            if not both:
                continue
            same = sum(new[i] == old[i] for i in both)
            lines += [f"Passkey at 16k tokens, {part} part, `{method}`, on the {len(both)} examples both ports "
                      "answered (95% Wilson intervals):", "",
                      "| port | passkeys found |", "|---|---|",
                      f"| old (runs/{earlier}) | {_rate([old[i] for i in both])} |",
                      f"| new (runs/port/{run.name}) | {_rate([new[i] for i in both])} |", "",
                      f"Same score on {same} of {len(both)} examples.", ""]
    return lines
