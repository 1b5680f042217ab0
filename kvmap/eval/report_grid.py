"""RESULTS.md sections for runs of the generic harness (``kvmap eval TASK --out DIR``).

Every number comes from a run folder's ``metrics.json`` / ``predictions.jsonl``; nothing is typed.
Per task: a score table (methods x lengths, 95% CIs, n), the share of the oracle each method keeps,
a cost table, and plots (score vs length; NIAH depth x length heatmaps; latency vs context size).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import yaml

from kvmap.eval.methods import BASELINES
from kvmap.eval.runfiles import read_jsonl
from kvmap.eval.runner import summarize
from kvmap.eval.plots import plot_link, plot_path, pyplot

SCORE_NAMES = {"passkey": "accuracy", "niah": "share of needles recalled", "babi": "accuracy (answer in output)",
               "fairytaleqa": "ROUGE-L F1"}
LENGTH_NAMES = {"fairytaleqa": "distractor tokens after the story"}


def _order(method: str) -> tuple:
    base = method.split(":")[0]
    return (0, BASELINES.index(base), method) if base in BASELINES else (1, base, method)


def _load(folders: list[Path]) -> dict[str, dict]:
    """task -> {"cells": {(length, method): cell}, "rows": [...], "model": ..., "config": [...]}"""
    tasks: dict[str, dict] = {}
    for folder in folders:
        # always from the predictions (metrics.json is rebuilt from them, and a run still going has none yet)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        m = {"task": config["task"], "model": config["model"], "config": config,
             "metrics": summarize(read_jsonl(folder / "predictions.jsonl"))}
        t = tasks.setdefault(m["task"], {"cells": {}, "rows": [], "models": set(), "configs": []})
        t["models"].add(m["model"])
        t["configs"].append((folder.name, m["config"]))
        for length, cells in m["metrics"].items():
            for method, cell in cells.items():
                t["cells"][(int(length), method)] = cell
        pred = folder / "predictions.jsonl"
        if pred.exists():
            for line in pred.read_text().splitlines():
                try:
                    t["rows"].append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return tasks


def _cell(c: dict | None) -> str:
    if c is None:
        return "–"
    if not c.get("n"):
        return "skipped"
    text = f"{c['score']:.1%} [{c['ci95'][0]:.0%}–{c['ci95'][1]:.0%}] n={c['n']}"
    if "contains" in c:
        text += f"; contains {c['contains']:.0%}"
    if "retrieved_answer" in c:
        text += f"; answer retrieved {c['retrieved_answer']:.0%}"
    return text


def grid_sections(folders: list[Path], out_dir: Path) -> list[str]:
    """One section per task of the generic harness's runs: scores, shares of the oracle, cost, plots."""
    lines: list[str] = []
    for task, t in sorted(_load(folders).items()):
        cells = t["cells"]
        lengths = sorted({length for length, _ in cells})
        methods = sorted({m for _, m in cells}, key=_order)
        lines += [f"## {task}", "",
                  f"Model `{', '.join(sorted(t['models']))}`; score: {SCORE_NAMES.get(task, 'score')}; "
                  f"columns: {LENGTH_NAMES.get(task, 'context tokens')}. Cells: mean [95% CI] n "
                  "(Wilson for 0/1 scores, bootstrap otherwise). Runs: " +
                  "; ".join(f"`{name}` ({', '.join(f'{k}={v}' for k, v in cfg.items() if k in ('limit', 'seed', 'store', 'max_new_tokens', 'task_options'))})"
                            for name, cfg in t["configs"]) + ".", "",
                  "| method | " + " | ".join(str(x) for x in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(_cell(cells.get((x, method))) for x in lengths) + " |")
        skipped = {(x, m): c["skipped"] for (x, m), c in cells.items() if not c.get("n")}
        if skipped:
            lines += ["", "Skipped: " + "; ".join(f"{m} at {x}: {why}" for (x, m), why in sorted(skipped.items())) + "."]
        # How much of the ceiling each method keeps, and the gain over truncation.
        lines += ["", "Share of `oracle` kept (method score / oracle score, same examples):", "",
                  "| method | " + " | ".join(str(x) for x in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for method in methods:
            row = []
            for x in lengths:
                c, o = cells.get((x, method)), cells.get((x, "oracle"))
                row.append(f"{c['score'] / o['score']:.0%}" if c and o and c.get("n") and o.get("n") and o["score"] else "–")
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines += ["", "Share of the oracle's gain over `none` recovered ((method − none) / (oracle − none); "
                  "a score floor that needs no context, such as ROUGE on words copied from the question, cancels out):", "",
                  "| method | " + " | ".join(str(x) for x in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for method in methods:
            row = []
            for x in lengths:
                c, o, z = cells.get((x, method)), cells.get((x, "oracle")), cells.get((x, "none"))
                ok = all(v and v.get("n") for v in (c, o, z)) and o["score"] != z["score"]
                row.append(f"{(c['score'] - z['score']) / (o['score'] - z['score']):.0%}" if ok else "–")
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines += ["", "Cost (medians; this 2-core CPU). *answer s*: from the question to the last answer token "
                  "(per-question retrieval, block choice and splicing included); *context s/example*: the cost of "
                  "the context itself (kvmap's ingest, a baseline's prefill of the context), divided over the "
                  "questions that share it, for every method alike; *old s/question*: rows written before the two "
                  "columns, shared prefill charged to every question:", "",
                  "| length | method | answer s | context s/example | old s/question | decode ms/token | "
                  "ingest tok/s | peak RSS MB | disk bytes/token |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for x in lengths:
            for method in methods:
                c = cells.get((x, method))
                if c and c.get("n"):
                    num = lambda key, fmt: format(c[key], fmt) if key in c else ""  # noqa: E731
                    lines.append(f"| {x} | {method} | {num('answer_s_median', '.2f')} | "
                                 f"{num('context_s_per_example_median', '.2f')} | {num('latency_s_median', '.1f')} | "
                                 f"{c['decode_ms_per_token']:.0f} | {num('ingest_tok_s', '.0f')} | "
                                 f"{c['peak_rss_mb']:.0f} | {num('disk_bytes_per_token', '.0f')} |")
        lines.append("")
        plots = _plots(task, t, lengths, methods, out_dir)
        lines += [f"![{name}]({plot_link(out_dir, path)})" for name, path in plots] + [""]
    return lines


def _plots(task: str, t: dict, lengths: list[int], methods: list[str], out_dir: Path) -> list[tuple[str, Path]]:
    plt = pyplot()
    out = []
    cells, rows = t["cells"], t["rows"]
    if len(lengths) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for method in methods:
            pts = [(x, cells[(x, method)]["score"]) for x in lengths if cells.get((x, method), {}).get("n")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("symlog", linthresh=1000)
        out.append(_save(fig, ax, LENGTH_NAMES.get(task, "context tokens"), SCORE_NAMES.get(task, "score"),
                         f"{task}: score vs length", plot_path(out_dir, f"results_{task}_length.png")))
    if task in ("niah", "passkey") and rows:
        shown = [m for m in methods if any(r["method"] == m and "score" in r for r in rows)]
        bins = 5
        fig, axes = plt.subplots(1, len(shown), figsize=(1.6 * len(shown) + 1, 2.6), squeeze=False)
        for ax, method in zip(axes[0], shown):
            grid = defaultdict(list)
            for r in rows:
                if r["method"] == method and "score" in r and r.get("depth") is not None:
                    grid[(lengths.index(r["length"]) if r["length"] in lengths else 0,
                          min(bins - 1, int(r["depth"] * bins)))].append(r["score"])
            import numpy as np

            img = np.full((bins, len(lengths)), np.nan)
            for (li, di), v in grid.items():
                img[di, li] = sum(v) / len(v)
            ax.imshow(img, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            ax.set_title(method, fontsize=6)
            ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=5, rotation=90)
            ax.set_yticks(range(bins), [f"{i / bins:.0%}" for i in range(bins)], fontsize=5)
        axes[0][0].set_ylabel("needle depth")
        fig.tight_layout()
        path = plot_path(out_dir, f"results_{task}_heatmap.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append((f"{task} depth x length heatmap", path))
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        by = defaultdict(list)
        for r in rows:
            seconds = r.get("answer_s", r.get("seconds"))
            if seconds is not None:
                by[r["method"]].append((r["context_tokens"], seconds))
        for method in methods:
            if by.get(method):
                ax.scatter(*zip(*by[method]), s=8, label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        out.append(_save(fig, ax, "context / memory size (tokens)", "answer seconds per question",
                         f"{task}: latency vs memory size", plot_path(out_dir, f"results_{task}_latency.png")))
    return out


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> tuple[str, Path]:
    """Label, legend, save and close a line/scatter plot; returns (title, path) for the markdown."""
    plt = pyplot()

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return title, path
