"""The cross-model memory section of RESULTS.md, from ``runs/**/bridges/TASK/metrics.json``."""
from __future__ import annotations

import json
import os
from pathlib import Path

LABELS = {"bridge": "trained adapter", "random": "untrained (random) adapter", "none": "no bridge",
          "oracle": "oracle: scene/fact in words in the prompt", "direct": "direct: target given to the limb model"}


def bridge_section(metrics_files: list[Path], out_dir: Path) -> list[str]:
    """One table over every bridged task (held-out accuracy per condition, 95% Wilson CI) and the training curves."""
    lines = ["## Cross-model memory (bridges)", "",
             "Held-out accuracy; every condition on the same test examples. The target model imports the source "
             "model's exported K/V through a linear adapter (only the adapter is trained; both models frozen). "
             "Text targets answer by the choice whose first token (either casing) scores highest; the limb target succeeds when "
             "the gripper ends within 4 px of the named object.", "",
             "| task | source → target | condition | accuracy | 95% CI | n | by kind |", "|---|---|---|---|---|---|---|"]
    plots, probes = [], []
    for path in metrics_files:
        m = json.loads(path.read_text())
        if "results" not in m:  # benchmarks/probe_limb_kv.py: linear probes, not a bridged task
            probes.append(m)
            continue
        for condition, r in m["results"].items():
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in r["by_kind"].items())
            low, high = r["ci95"]
            lines.append(f"| {m['task']} | {m['source']} → {m['target']} | {LABELS.get(condition, condition)} | "
                         f"{r['accuracy']:.1%} | {low:.0%}–{high:.0%} | {r['n']} | {kinds} |")
        train = path.parent / "training.json"
        if train.exists():
            t = json.loads(train.read_text())
            d = t["data"]
            plots.append(f"- `{m['task']}`: {t['steps']} steps of {d['batch_size']} examples "
                         f"({d['n_train']} training examples), {t['seconds'] / 60:.0f} min on this CPU, "
                         f"lr {t['hparams']['lr']}; chance: {m['chance']}.")
        png = path.parent / "training.png"
        if png.exists():
            plots.append(f"  ![{m['task']} training curves]({os.path.relpath(png, out_dir)})")
    return lines + [""] + plots + [""] + [line for m in probes for line in _probe_table(m)]


def _probe_table(m: dict) -> list[str]:
    """What a linear read-out of the limb policy's exported K/V gets, per block (probe_limb_kv.py)."""
    acc = m["accuracy"]
    layers = sorted(next(iter(acc.values())), key=int)
    return [f"Linear probes on the limb policy's exported K/V (`benchmarks/probe_limb_kv.py`; {m['n_train']} "
            f"training scenes, {m['n_test']} test scenes; mean-pooled and class-token K/V per block): held-out "
            "accuracy of reading each vision-text answer straight from the source memory.", "",
            "| question | " + " | ".join(f"block {l}" for l in layers) + " |", "|---|" + "---|" * len(layers)] + [
        f"| {kind} | " + " | ".join(f"{acc[kind][l]:.0%}" for l in layers) + " |" for kind in acc] + [""]
