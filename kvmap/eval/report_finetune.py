"""The memory-adapter section of RESULTS.md (issue 16): each ``kvmap finetune`` run's settings, cost, training
curve and validation before/after, and its side effects on held-out text (``benchmarks/adapter_side_effects.py``).
How the tuned model answers is in the task sections, as the ``adapter=1`` method rows of the runs that loaded it."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from kvmap.eval.plots import plot_link, plot_path


def _val_rows(metrics: Path) -> list[dict]:
    return [r for r in csv.DictReader(open(metrics, newline="")) if r.get("val/loss")]


def finetune_section(runs: list[Path], out_dir: Path) -> list[str]:
    from kvmap.training.run import plot_curves

    lines = ["## Memory-aware fine-tuning (the seed's next step)", "",
             "`kvmap finetune`: a LoRA adapter (peft) on the frozen model, active only while memories are imported, "
             "trained with token-level import in the forward pass on FairytaleQA *train* stories (planted facts with "
             "their own vocabulary, and the stories' explicit questions; other stories as hard negatives). "
             "*val*: held-out train stories, teacher-forced: *accuracy* = every answer token is the model's top "
             "choice. Step 0 is the base model (the adapter starts as the identity).", "",
             "*instruction in memory*: the share of planted-fact examples whose memory starts with the task "
             "instruction, as NIAH's context does. Each run's *val* examples are drawn with its own data settings, "
             "so val figures compare steps within a run, not runs.", "",
             "| run | steps × batch | instruction in memory | training time | LoRA | val loss (step 0 → last) | "
             "val accuracy (step 0 → last) |",
             "|---|---|---|---|---|---|---|"]
    plots = []
    for folder in runs:
        training = json.loads((folder / "training.json").read_text())
        settings = json.loads((folder / "adapter" / "adapter.json").read_text())["settings"]
        val = _val_rows(folder / "metrics.csv")
        first, last = val[0], val[-1]
        untracked = training.get("untracked_attempts", [])  # attempts whose time was measured outside the run
        cpu = training.get("train_cpu_s", 0) + sum(a["cpu_s"] for a in untracked)
        wall = training.get("train_wall_s", 0) + sum(a["wall_s"] for a in untracked)
        in_memory = training.get("data", {}).get("instruction_in_memory", 0.0)  # not recorded before it existed
        lines.append(f"| `{folder.name}` | {training['steps']} × {training['batch_size']} | {in_memory:.0%} | "
                     f"{cpu / 3600:.2f} CPU-h ({wall / 60:.0f} min wall){' †' if untracked else ''} | "
                     f"r={settings['rank']} on {', '.join(settings['targets'])} | "
                     f"{float(first['val/loss']):.2f} → {float(last['val/loss']):.2f} | "
                     f"{float(first['val/accuracy']):.0%} → {float(last['val/accuracy']):.0%} |")
        plot = plot_path(out_dir, f"results_finetune_{folder.name}.png")
        plot_curves(folder / "metrics.csv", plot, f"memory adapter {folder.name}: training with import in the forward pass")
        plots.append(f"![training curve of {folder.name}]({plot_link(out_dir, plot)})")
    if any(json.loads((f / "training.json").read_text()).get("untracked_attempts") for f in runs):
        lines += ["", "† includes an attempt timed from outside (its `training.json` says how)."]
    lines += ["", *plots, ""]
    for folder in runs:
        side = folder / "side_effects.json"
        if side.exists():
            lines += _side_effects(folder.name, json.loads(side.read_text()))
    return lines


def _side_effects(name: str, d: dict) -> list[str]:
    labels = {"base": "base, no memory", "tuned": "tuned, no memory (the adapter off: the base model)",
              "tuned_adapter_forced_on": "tuned, the adapter forced on, no memory",
              "base_with_memory": "base + memory", "tuned_with_memory": "tuned + memory"}
    rows = [f"| {labels.get(cond, cond)} | {value:.2f} |" for cond, value in d["perplexity"].items()]
    return [f"Side effects of `{name}`: perplexity of {d['tokens']} tokens of {d['tales']} held-out tales (no memory "
            f"unless said; *+ memory*: token-level import of {d['memory_tokens']} tokens of an unrelated tale). Tuned "
            f"vs base without memory: {d['tuned_vs_base_no_memory']:+.2%}.", "",
            "| condition | perplexity |", "|---|---|", *rows, ""]
