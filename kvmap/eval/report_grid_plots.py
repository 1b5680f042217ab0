"""The plots of a harness section of RESULTS.md: score vs length, NIAH/passkey depth x length heatmaps,
answer latency vs context size. Files are named by task (variant) and part, so dev and test never overwrite."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from kvmap.eval.plots import plot_path, pyplot

SCORE_NAMES = {"passkey": "accuracy", "niah": "share of needles recalled", "babi": "accuracy (answer in output)",
               "fairytaleqa": "ROUGE-L F1"}
LENGTH_NAMES = {"fairytaleqa": "distractor tokens after the story"}


def _slug(section) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{section.label} {section.part}".lower()).strip("-")


def section_plots(section, lengths: list[int], methods: list[str], out_dir: Path) -> list[tuple[str, Path]]:
    """The section's plots as (title, path); nothing is drawn for a plot with no points."""
    names = _names(section.task)
    out = []
    if len(lengths) > 1:
        out.append(_score_vs_length(section, lengths, methods, out_dir, names))
    if section.task in ("niah", "passkey") and section.rows:
        out.append(_depth_heatmap(section, lengths, methods, out_dir))
    if section.rows:
        out.append(_latency(section, methods, out_dir))
    return out


def _names(task: str) -> tuple[str, str]:
    return LENGTH_NAMES.get(task, "context tokens"), SCORE_NAMES.get(task, "score")


def _score_vs_length(section, lengths, methods, out_dir, names) -> tuple[str, Path]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method in methods:
        pts = [(x, section.cells[(x, method)]["score"]) for x in lengths if section.cells.get((x, method), {}).get("n")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("symlog", linthresh=1000)
    return _save(fig, ax, names[0], names[1], f"{section.label} ({section.part}): score vs length",
                 plot_path(out_dir, f"results_{_slug(section)}_length.png"))


def _depth_heatmap(section, lengths, methods, out_dir) -> tuple[str, Path]:
    import numpy as np

    plt = pyplot()
    shown = [m for m in methods if any(r["method"] == m for r in section.rows)]
    bins = 5
    fig, axes = plt.subplots(1, len(shown), figsize=(1.6 * len(shown) + 1, 2.6), squeeze=False)
    for ax, method in zip(axes[0], shown):
        grid = defaultdict(list)
        for r in section.rows:
            if r["method"] == method and r.get("depth") is not None and r["length"] in lengths:
                grid[(lengths.index(r["length"]), min(bins - 1, int(r["depth"] * bins)))].append(r["score"])
        img = np.full((bins, len(lengths)), np.nan)  # (depth bin, length)
        for (li, di), v in grid.items():
            img[di, li] = sum(v) / len(v)
        ax.imshow(img, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_title(method, fontsize=6)
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=5, rotation=90)
        ax.set_yticks(range(bins), [f"{i / bins:.0%}" for i in range(bins)], fontsize=5)
    axes[0][0].set_ylabel("needle depth")
    fig.tight_layout()
    path = plot_path(out_dir, f"results_{_slug(section)}_heatmap.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{section.label} ({section.part}) depth x length heatmap", path


def _latency(section, methods, out_dir) -> tuple[str, Path]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    by = defaultdict(list)
    for r in section.rows:
        seconds = r.get("answer_s", r.get("seconds"))
        if seconds is not None:
            by[r["method"]].append((r["context_tokens"], seconds))
    for method in methods:
        if by.get(method):
            ax.scatter(*zip(*by[method]), s=8, label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _save(fig, ax, "context / memory size (tokens)", "answer seconds per question",
                 f"{section.label} ({section.part}): answer latency vs memory size",
                 plot_path(out_dir, f"results_{_slug(section)}_latency.png"))


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
