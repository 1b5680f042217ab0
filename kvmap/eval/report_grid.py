"""RESULTS.md sections for runs of the generic harness (``kvmap eval TASK --out DIR``).

Every number comes from a run folder's ``predictions.jsonl``; nothing is typed. Per task (and variant)
and per part of the data (``dev``, where variants are chosen, and ``test``, reported once; see
:mod:`kvmap.eval.parts`): a score table (methods x lengths, 95% CIs, n, cells whose n differs from the
oracle's flagged), the share of the oracle kept and of its gain over ``none`` recovered, both over the
examples the methods share, a paired difference table against ``none`` and against the best RAG with
story-clustered bootstrap intervals, a cost table, and plots. A cell found in two run folders is an
error, not an overwrite.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kvmap.errors import KVMapError
from kvmap.eval.methods import BASELINES
from kvmap.eval.parts import part_of_run
from kvmap.eval.plots import plot_link
from kvmap.eval.report_grid_plots import LENGTH_NAMES, SCORE_NAMES, section_plots
from kvmap.eval.runfiles import read_jsonl
from kvmap.eval.runner import summarize
from kvmap.stats import paired_clustered_ci

VARIANT_OPTIONS = ("variant", "qa")
"""Task options that make another task (a NIAH variant, a bAbI task): each gets its own section."""
RAGS = ("rag-bm25", "rag-embed")


@dataclass
class Section:
    """One task (variant) on one part of the data: its cells and every scored row, from all its run folders."""

    task: str
    label: str
    part: str
    key: str = ""
    """``task`` or ``task/variant`` (``niah/single``, ``babi/1``): how prose placeholders name it (:mod:`kvmap.eval.claims`)."""
    models: set = field(default_factory=set)
    configs: list = field(default_factory=list)
    cells: dict = field(default_factory=dict)
    """(length, method) -> the cell :func:`kvmap.eval.runner.summarize` makes from its rows."""
    owner: dict = field(default_factory=dict)
    """(length, method) -> the run folder the cell comes from."""
    rows: list = field(default_factory=list)
    unrun: list = field(default_factory=list)
    """``"method at length in folder"`` for what a run's config lists but has no prediction for."""

    def scores(self, length: int, method: str) -> dict[str, tuple[float, str]]:
        """Example id -> (score, cluster) of one cell; the cluster is the example's shared context (story)."""
        return {r["id"]: (r["score"], r["group"]) for r in self.rows
                if r["length"] == length and r["method"] == method and "score" in r}


def _order(method: str) -> tuple:
    base = method.split(":")[0]
    return (0, BASELINES.index(base), method) if base in BASELINES else (1, base, method)


def _label(config: dict) -> tuple[str, str]:
    """The section's title and its key: ``niah (variant single)`` and ``niah/single``."""
    options = config.get("task_options") or {}
    variant = ", ".join(f"{k} {options[k]}" for k in VARIANT_OPTIONS if k in options)
    key = "/".join([config["task"]] + [str(options[k]) for k in VARIANT_OPTIONS if k in options])
    return (f"{config['task']} ({variant})" if variant else config["task"]), key


def shown_method(method: str, config: dict) -> str:
    """The name a row is reported under: a method that imports with a memory adapter gets the adapter's run
    name (``kvmap:adapter=1@memory-adapter-v2``), so that two adapters' rows are two cells, never one."""
    adapter = config.get("adapter")
    tuned = "adapter=1" in method.split(":")[1:]  # not parsed: a row's method may name an option since removed
    return f"{method}@{Path(adapter).parent.name}" if adapter and tuned else method


def load_sections(folders: list[Path]) -> list[Section]:
    """Every run folder's rows, grouped by task (variant) and part; KVMapError for a cell in two folders."""
    sections: dict[tuple[str, str], Section] = {}
    for folder in folders:
        config = yaml.safe_load((folder / "config.yaml").read_text())
        rows = [{**r, "method": shown_method(r["method"], config)} for r in read_jsonl(folder / "predictions.jsonl")]
        part = part_of_run(config)
        label, key = _label(config)
        section = sections.setdefault((label, part), Section(config["task"], label, part, key))
        section.models.add(config["model"])
        section.configs.append((folder.name, config))
        for length, cells in summarize(rows).items():
            for method, cell in cells.items():
                where = (int(length), method)
                if where in section.owner:
                    raise KVMapError(f"{section.label} ({part}): {method} at {length} tokens is in two run folders, "
                                     f"{section.owner[where]} and {folder}; keep one (move the other out of the runs folder)")
                section.cells[where], section.owner[where] = cell, folder
        section.rows += [r for r in rows if "score" in r]
        have = {(r["length"], r["method"]) for r in rows}
        section.unrun += [f"{m} at {x} in `{folder.name}`" for x in config["lengths"]
                          for m in (shown_method(m, config) for m in config["methods"]) if (x, m) not in have]
    return sorted(sections.values(), key=lambda s: (s.label, s.part != "test"))


def _fmt_cell(c: dict | None, oracle_n: int | None) -> str:
    if c is None:
        return "–"
    if not c.get("n"):
        return "skipped"
    text = f"{c['score']:.1%} [{c['ci95'][0]:.0%}–{c['ci95'][1]:.0%}] n={c['n']}"
    if oracle_n is not None and c["n"] != oracle_n:
        text += f" ⚠ oracle n={oracle_n}"
    if "contains" in c:
        text += f"; contains {c['contains']:.0%}"
    if "retrieved_answer" in c:
        text += f"; answer retrieved {c['retrieved_answer']:.0%}"
    return text


def _shared(*cells: dict[str, tuple[float, str]]) -> list[str]:
    """The example ids every cell has, in a stable order."""
    ids = set(cells[0])
    for c in cells[1:]:
        ids &= set(c)
    return sorted(ids)


def reference(section: Section, length: int, method: str, base: str) -> str:
    """What ``method`` is measured against: the baseline ``base`` itself, or, for a method tuned by a memory adapter
    (shown as ``...adapter=1@RUN``), the same baseline answered with that adapter on (``oracle:adapter=1@RUN``)
    where the run has it: whatever the adapter learned about answering, the tuned baseline learned too."""
    if "@" not in method:
        return base
    tuned = f"{base}:adapter=1@{method.rsplit('@', 1)[1]}"
    return tuned if section.cells.get((length, tuned), {}).get("n") else base


def share_text(section: Section, length: int, method: str, reference_method: str) -> str:
    """``method``'s mean over ``reference_method``'s, over the examples both have (``87% (n=52)``; ``–`` if none)."""
    m, o = section.scores(length, method), section.scores(length, reference_method)
    ids = _shared(m, o)
    top = sum(o[i][0] for i in ids)
    return f"{sum(m[i][0] for i in ids) / top:.0%} (n={len(ids)})" if ids and top else "–"


def _ratio_row(section: Section, method: str, lengths: list[int], gain: bool) -> str:
    out = []
    for x in lengths:
        m, o = section.scores(x, method), section.scores(x, reference(section, x, method, "oracle"))
        z = section.scores(x, reference(section, x, method, "none")) if gain else {}
        ids = _shared(m, o, z) if gain else _shared(m, o)
        mean = lambda cell: sum(cell[i][0] for i in ids) / len(ids)  # noqa: E731
        if not ids:
            out.append("–")
            continue
        floor = mean(z) if gain else 0.0
        top = mean(o) - floor
        out.append(f"{(mean(m) - floor) / top:.0%} (n={len(ids)})" if top else "–")
    return f"| {method} | " + " | ".join(out) + " |"


def _best_rag(section: Section, length: int, method: str = "") -> str | None:
    """The RAG baseline with the highest score at ``length`` (the strongest text retrieval this run has); for a
    method tuned by a memory adapter (``...@RUN``), the best RAG row answered with the same adapter, if any."""
    run = method.rsplit("@", 1)[1] if "@" in method else None
    candidates = [m for x, m in section.cells if x == length and m.split(":")[0] in RAGS
                  and m.endswith(f"@{run}")] if run else []
    present = [(section.cells[(length, r)]["score"], r) for r in candidates or RAGS
               if section.cells.get((length, r), {}).get("n")]
    return max(present)[1] if present else None


def diff_text(section: Section, length: int, method: str, reference: str | None) -> str:
    """``method − reference`` in points over their shared examples, with the clustered 95% interval; ``–`` if none."""
    if reference is None or method == reference:
        return "–"
    a, b = section.scores(length, method), section.scores(length, reference)
    ids = _shared(a, b)
    if not ids:
        return "–"
    mean, lo, hi = paired_clustered_ci([a[i][0] - b[i][0] for i in ids], [a[i][1] for i in ids])
    clusters = len({a[i][1] for i in ids})
    if clusters < 2:
        return f"{100 * mean:+.1f} (n={len(ids)}, one cluster: no interval)"
    return f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] (n={len(ids)}, {clusters} clusters)"


def _score_table(section: Section, lengths: list[int], methods: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(str(x) for x in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(
            _fmt_cell(section.cells.get((x, method)), section.cells.get((x, "oracle"), {}).get("n"))
            for x in lengths) + " |")
    return lines


def _paired_tables(section: Section, lengths: list[int], methods: list[str]) -> list[str]:
    lines = ["", "Paired differences, in points of the score (method − reference over the examples both have, "
             "same run; 95% percentile bootstrap over clusters: a story with its questions, or one haystack):", ""]
    for x in lengths:
        rag = _best_rag(section, x)
        tuned = sorted({_best_rag(section, x, m) for m in methods if "@" in m} - {rag, None})
        lines += [f"{x} tokens; best RAG here: {f'`{rag}`' if rag else 'no RAG in these runs'}"
                  + (f"; rows tuned by a memory adapter are measured against the same adapter's `none` and best RAG "
                     f"({', '.join(f'`{t}`' for t in tuned)})" if tuned else ""), "",
                  "| method | − none | − best RAG |", "|---|---|---|"]
        for method in methods:
            if method.split(":")[0].split("@")[0] in ("none", "oracle") or not section.cells.get((x, method), {}).get("n"):
                continue
            lines.append(f"| {method} | {diff_text(section, x, method, reference(section, x, method, 'none'))} | "
                         f"{diff_text(section, x, method, _best_rag(section, x, method))} |")
        lines.append("")
    return lines


def _cost_table(section: Section, lengths: list[int], methods: list[str]) -> list[str]:
    lines = ["Cost (medians; this 2-core CPU). *answer s*: from the question to the last answer token "
             "(per-question retrieval, block choice and splicing included); *context s/example*: the cost of "
             "the context itself (kvmap's ingest, a baseline's prefill of the context), divided over the "
             "questions that share it, for every method alike (a read that reused cached chunks of a shared haystack "
             "counts what it computed); "
             "*old s/question*: rows written before the two columns, shared prefill charged to every question:", "",
             "| length | method | answer s | context s/example | old s/question | decode ms/token | "
             "ingest tok/s | peak RSS MB | disk bytes/token |", "|---|---|---|---|---|---|---|---|---|"]
    for x in lengths:
        for method in methods:
            c = section.cells.get((x, method))
            if c and c.get("n"):
                num = lambda key, fmt: format(c[key], fmt) if key in c else ""  # noqa: E731
                lines.append(f"| {x} | {method} | {num('answer_s_median', '.2f')} | "
                             f"{num('context_s_per_example_median', '.2f')} | {num('latency_s_median', '.1f')} | "
                             f"{c['decode_ms_per_token']:.0f} | {num('ingest_tok_s', '.0f')} | "
                             f"{c['peak_rss_mb']:.0f} | {num('disk_bytes_per_token', '.0f')} |")
    return lines + [""]


def _header(section: Section) -> list[str]:
    runs = "; ".join(f"`{name}` ({', '.join(f'{k}={v}' for k, v in cfg.items() if k in ('limit', 'seed', 'store', 'max_new_tokens', 'task_options'))})"
                     for name, cfg in section.configs)
    lines = [f"## {section.label}, {section.part} part", "",
             f"Model `{', '.join(sorted(section.models))}`; score: {SCORE_NAMES.get(section.task, 'score')}; "
             f"columns: {LENGTH_NAMES.get(section.task, 'context tokens')}; data: the **{section.part}** part "
             f"({'variants and defaults were chosen here' if section.part == 'dev' else 'reported once, nothing chosen on it'}). "
             "Cells: mean [95% CI] n (Wilson for 0/1 scores, bootstrap otherwise); ⚠ marks a cell whose n differs "
             f"from the oracle's. Runs: {runs}.", ""]
    return lines


def grid_sections(sections: list[Section], out_dir: Path) -> list[str]:
    """One section per task (variant) and part of the harness's runs: scores, shares, paired differences, cost, plots."""
    lines: list[str] = []
    for section in sections:
        lengths = sorted({x for x, _ in section.cells})
        methods = sorted({m for _, m in section.cells}, key=_order)
        lines += _header(section) + _score_table(section, lengths, methods)
        skipped = {(x, m): c["skipped"] for (x, m), c in section.cells.items() if not c.get("n")}
        if skipped:
            lines += ["", "Skipped: " + "; ".join(f"{m} at {x}: {why}" for (x, m), why in sorted(skipped.items())) + "."]
        if section.unrun:
            lines += ["", "Listed in a run's config but with no predictions (not run yet): "
                      + "; ".join(section.unrun) + "."]
        lines += ["", "Share of `oracle` kept (method mean / oracle mean over the examples both have; a row tuned by a memory "
                  "adapter, `...@RUN`, over the oracle answered with the same adapter where the run has it):", "",
                  "| method | " + " | ".join(str(x) for x in lengths) + " |", "|---|" + "---|" * len(lengths)]
        lines += [_ratio_row(section, m, lengths, gain=False) for m in methods]
        lines += ["", "Share of the oracle's gain over `none` recovered ((method − none) / (oracle − none) over the "
                  "examples all three have; a score floor that needs no context cancels out):", "",
                  "| method | " + " | ".join(str(x) for x in lengths) + " |", "|---|" + "---|" * len(lengths)]
        lines += [_ratio_row(section, m, lengths, gain=True) for m in methods]
        lines += _paired_tables(section, lengths, methods) + _cost_table(section, lengths, methods)
        plots = section_plots(section, lengths, methods, out_dir)
        lines += [f"![{name}]({plot_link(out_dir, path)})" for name, path in plots] + [""]
    return lines

