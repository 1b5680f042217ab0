"""The diagnosis section of RESULTS.md (issue 16): how much attention token-level import's memories take at
each decode step, per layer and head, and which memories they are, from ``runs/diagnosis/attention_share.json``
(``benchmarks/memory_attention_share.py``)."""
from __future__ import annotations

import json
from pathlib import Path

from kvmap.eval.plots import plot_link, plot_path, pyplot


def diagnosis_section(path: Path, out_dir: Path) -> list[str]:
    d = json.loads(Path(path).read_text())
    lines = [f"## Diagnosis: where imported memories pull decoding ({d['part']} part, {d['length']} tokens)", "",
             f"Token-level import (`kvmap:local=0`, the whole context in memory), {d['n']} examples per task, model `{d['model']}`. *memory share*: the "
             "attention mass that imported memories take, mean over decode steps, layers and query heads (the "
             "rest goes to the prompt); *most-attended on target*: how often the memory a head attends most lies "
             "in the needle sentence or the gold passage; then the memory tokens attended most, over all "
             f"layers, heads and steps ({d['seconds'] / 60:.0f} min on this CPU).", "",
             "| task | example | memory share | most-attended on target | answer | most-attended memories |",
             "|---|---|---|---|---|---|"]
    for task, rows in d["tasks"].items():
        for r in rows:
            share = sum(r["share_per_step"]) / max(1, len(r["share_per_step"]))
            top = ", ".join(f"`{t.strip() or repr(t)}` ×{c}" for t, c in r["most_attended"][:5])
            lines.append(f"| {task} | `{r['id']}` | {share:.0%} | {r['top_on_target']:.0%} | "
                         f"{r['output'][:50].replace('|', '/')!r} | {top} |")
    plot = plot_path(out_dir, "results_diagnosis_share.png")
    _plot(d, plot)
    return lines + ["", f"![memory share of attention by layer and head]({plot_link(out_dir, plot)})", ""]


def _plot(d: dict, path: Path) -> None:
    import numpy as np

    plt = pyplot()
    tasks = list(d["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        grid = np.mean([np.array(r["share_layer_head"]) for r in d["tasks"][task]], axis=0)  # (layers, heads)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto", origin="lower")
        ax.set_title(task, fontsize=8)
        ax.set_xlabel("query head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
    fig.subplots_adjust(bottom=0.16, wspace=0.35)
    fig.colorbar(im, ax=axes[0].tolist(), label="memory share of attention")
    fig.savefig(path, dpi=110)
    plt.close(fig)
