"""The scale section of RESULTS.md, from ``runs/scale/*.json`` (benchmarks/recall_real_kv.py,
benchmarks/sharded_latency.py)."""
from __future__ import annotations

import json
from pathlib import Path


def scale_section(folder: Path, out_dir: Path) -> list[str]:
    """Recall@k of each store setting on real K/V (table and plot) and the sharded store's overhead."""
    lines = ["## Scale: store settings and sharding", ""]
    recall = folder / "recall.json"
    if recall.exists():
        r = json.loads(recall.read_text())
        s = r["settings"]
        lines += [f"Recall@{s['k']} against exact search on SmolLM2's real K/V ({s['n_tokens']} tokens of tales) "
                  f"with the rotated queries the import searches with ({s['questions']} FairytaleQA questions), "
                  f"layers {s['layers']}; search time per query on this 2-core machine (`benchmarks/recall_real_kv.py`).", "",
                  "| setting | mean recall | min over layers | search ms/query | build s |", "|---|---|---|---|---|"]
        for name, mean in r["mean_recall"].items():
            low = min(x["recall"] for x in r["rows"] if x["setting"] == name)
            lines.append(f"| {name} | {mean:.3f} | {low:.3f} | {_over_layers(r, name, 'search_ms_per_query'):.3f} | "
                         f"{_over_layers(r, name, 'build_s'):.2f} |")
        plot = out_dir / "results_recall.png"
        plot_recall(r, plot)
        lines += ["", f"![recall vs search time]({plot.name})", ""]
    latency = folder / "sharded-latency.json"
    if latency.exists():
        r = json.loads(latency.read_text())
        s = r["settings"]
        lines += [f"Ray-sharded store against the single-process store, one layer's search, {s['tokens']} tokens in "
                  f"{s['segments']} segments, {s['shards']} shards, {s['store']} store, k={s['k']}, median of "
                  f"{s['repeats']} (`benchmarks/sharded_latency.py`). Both return the same ids.", "",
                  "| case | queries per head | single process ms | sharded ms | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {x['case']} | {x['queries_per_head']} | {x['single_ms']:.2f} | {x['sharded_ms']:.2f} | "
                  f"{x['ratio']:.2f}× |" for x in r["layer_search"]]
        lines.append("")
    return lines


def _over_layers(r: dict, setting: str, key: str) -> float:
    """The middle value (upper median) of ``key`` over the measured layers of one store setting."""
    values = sorted(x[key] for x in r["rows"] if x["setting"] == setting)
    return values[len(values) // 2]


def plot_recall(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name in r["mean_recall"]:
        ms = _over_layers(r, name, "search_ms_per_query")
        ax.scatter(ms, r["mean_recall"][name])
        ax.annotate(name, (ms, r["mean_recall"][name]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("search ms per query")
    ax.set_ylabel(f"recall@{r['settings']['k']} vs exact")
    ax.set_title("Store settings on SmolLM2's real K/V")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
