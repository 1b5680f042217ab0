"""The scale section of RESULTS.md, from ``runs/scale``: passkey by memory size (``kvmap eval passkey``
runs and ``kvmap bench scale``), recall of store settings and of retrieval reuse on real K/V
(``benchmarks/recall_real_kv.py``, ``benchmarks/recall_reuse.py``), the sharded store's overhead
(``benchmarks/sharded_latency.py``)."""
from __future__ import annotations

import json
from pathlib import Path

from kvmap.eval.plots import plot_link, plot_path, pyplot
from kvmap.ports import format_layers


def scale_section(folder: Path, out_dir: Path) -> list[str]:
    """The scale section: passkey by memory size, corpus builds, and each scale benchmark's run file."""
    lines = ["## Scale: store settings and sharding", ""] + _sizes(folder, out_dir) + _builds(folder)
    for name, section in _BENCHMARKS:
        r = _read(folder, name)
        if r is not None:  # that benchmark has run
            lines += section(r, out_dir)
    return lines


def _sizes(folder: Path, out_dir: Path) -> list[str]:
    """Passkey by memory size, with memory and without (table and plot)."""
    rows = size_rows(folder)
    if not rows:
        return []
    lines = ["Passkey by memory size, with memory and without it (same prompt, same process, one after the "
             "other). `kvmap` searches the memory at every forward (exact store in RAM); `kvmap:reuse=64` "
             "searches it once, exactly, streamed from disk, for the prompt's queries (64 candidates each), "
             "and every decode step takes its top-16 among those candidates; `reuse_next=8` also keeps the 8 "
             "memories after each candidate, and `reuse_next_best=16` only after each query's 16 best (so "
             "`reuse` can grow without the followers multiplying the candidates). 1k–100k: `kvmap eval "
             "passkey` (one haystack per trial, read in that trial; peak RSS includes the runner's chunk "
             "cache of up to 4 GB); 1M: `kvmap bench scale` (one filler or tales memory built once, a needle "
             "document added and forgotten per trial; rows marked with a task and part are its NIAH or test-part runs). The `reuse_next` rows ran alone on the two cores and decode "
             "with the fused C kernel (`kvmap/models/decode_step.c`); the 1M `reuse=64` row ran before it, on "
             "the PyTorch path. Ratio: median decode time with memory over median without.", "",
             "| memory tokens | method | passkey | decode ms/token, memory | no memory | ratio | first forward s "
             "| ingest tok/s | peak RSS GiB | disk KiB/token |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']:,} | {r['method']} | {r['correct']}/{r['n']} | {r['decode_ms']:.0f} | "
                     f"{r['decode_ms_none']:.0f} | {r['decode_ms'] / r['decode_ms_none']:.2f}× | "
                     f"{_fmt(r.get('first_s'), '.1f')} | {_fmt(r.get('ingest_tok_s'), '.0f')} | "
                     f"{r['peak_rss_mb'] / 1024:.2f} | {_fmt(r.get('disk_bytes_per_token', 0) / 1024, '.1f')} |")
    plot = plot_path(out_dir, "results_scale.png")
    plot_sizes(rows, plot)
    lines += ["", f"![decode time, accuracy and RSS by memory size]({plot_link(out_dir, plot)})", ""]
    return lines


def _builds(folder: Path) -> list[str]:
    """Corpus memory builds (one line per build call)."""
    builds = sorted(folder.glob("*/build.jsonl"))
    if not builds:
        return []
    lines = ["Corpus memory builds (`kvmap bench scale`; one line per build call, a resumed build adds one):", "",
             "| run | memory tokens after | tokens read | minutes | tok/s | note |", "|---|---|---|---|---|---|"]
    for path in builds:
        for b in (json.loads(x) for x in path.read_text().splitlines() if x.strip()):
            lines.append(f"| {path.parent.name} | {b['n_tokens']:,} | {b['tokens_read']:,} | {b['seconds'] / 60:.1f} | "
                         f"{b['ingest_tok_s']:.0f} | {b.get('note', '')} |")
    lines.append("")
    return lines


def _decode_overhead(r: dict, out_dir: Path) -> list[str]:
    """Decode cost of the memory path itself (``benchmarks/decode_overhead.py``)."""
    lines = [f"Decode cost of the memory path itself (`benchmarks/decode_overhead.py`, a {r['settings']['memory_tokens']}"
             f"-token memory, {r['settings']['config']}): {r['decode_ms_memory']:.1f} vs {r['decode_ms_no_memory']:.1f} "
             f"ms/token without memory ({r['ratio']:.2f}×), median of {r['settings']['rounds']} alternating rounds.", ""]
    return lines


def _recall_reuse(r: dict, out_dir: Path, plot_name: str = "results_recall_reuse.png") -> list[str]:
    """Recall of retrieval reuse against exact search (``benchmarks/recall_reuse.py``), table and plot."""
    s = r["settings"]
    lines = [f"Recall@{s['k']} of retrieval reuse against exact search over the whole memory, on SmolLM2's "
             f"real K/V ({s['n_tokens']:,} tokens of tales), through the real import path "
             f"({s['questions']} FairytaleQA questions, {s['new_tokens']} decoded tokens each, layers "
             f"{s['layers']}; `benchmarks/recall_reuse.py`). *Prompt*: the forward that picks the candidates; "
             "*decode*: later tokens searching among them. `reuse=K`: each prompt query's K best by exact "
             "search; `reuse_blocks=B`: the tokens of B blocks of 32 per (layer, KV head), ranked by "
             "per-channel key bounds (Quest); `reuse_probe=P`: each query's K best among the keys of its P best "
             "clusters of the query-aware cluster index (`kvmap/stores/clusters.py`). *Worst layer*: the layer whose decode steps keep the least.", "",
             "| setting | recall, prompt | worst layer, prompt | recall, decode | worst layer, decode "
             "| candidates per (layer, KV head) | first forward s |", "|---|---|---|---|---|---|---|"]

    def worst(by_layer: dict | None) -> str:
        if not by_layer:
            return "–"
        layer, value = min(by_layer.items(), key=lambda kv: kv[1])
        return f"{value:.3f} (layer {layer})"

    for name, x in r["recall"].items():
        lines.append(f"| {name} | {x['prompt']:.3f} | {worst(x.get('prompt_by_layer'))} | {x['decode']:.3f} | "
                     f"{worst(x.get('decode_by_layer'))} | {x['candidates_per_head']:.0f} | {x['prompt_s']:.1f} |")
    lines.append("")
    if any(x.get("decode_by_layer") for x in r["recall"].values()):
        plot = plot_path(out_dir, plot_name)
        plot_recall_by_layer(r, plot)
        lines += [f"![decode-step recall by layer]({plot_link(out_dir, plot)})", ""]
    return lines


def _quantization(r: dict, out_dir: Path) -> list[str]:
    """What int8 storage would cost in recall and attention output (``benchmarks/quantization_cost.py``)."""
    s, b = r["settings"], r["bytes_per_token"]
    lines = [f"Compact storage: float16 K/V take {b['float16'] / 1024:.1f} KiB per token. Int8 with per-channel "
             f"scales (per segment, KV head and channel) would take {b['int8'] / 1024:.1f} KiB; on "
             f"{s['n_tokens']:,} tokens of real SmolLM2 K/V it keeps recall@{s['k']} of {r['mean_recall']:.3f} "
             f"against float16 search (per layer: "
             + ", ".join(f"{x['layer']}: {x['recall_int8_vs_fp16']:.2f}" for x in r["rows"])
             + f") and changes the memory part of attention by {r['median_output_error']:.1%} (median relative "
             "error), `benchmarks/quantization_cost.py`. Memories stay float16.", ""]
    return lines


def _recall(r: dict, out_dir: Path) -> list[str]:
    """Recall@k of each store setting on real K/V (``benchmarks/recall_real_kv.py``), table and plot."""
    s = r["settings"]
    lines = [f"Recall@{s['k']} against exact search on SmolLM2's real K/V ({s['n_tokens']} tokens of tales) "
             f"with the rotated queries the import searches with ({s['questions']} FairytaleQA questions), "
             f"layers {s['layers']}; search time per query on this 2-core machine (`benchmarks/recall_real_kv.py`).", "",
             "| setting | mean recall | min over layers | search ms/query | build s |", "|---|---|---|---|---|"]
    for name, mean in r["mean_recall"].items():
        low = min(x["recall"] for x in r["rows"] if x["setting"] == name)
        lines.append(f"| {name} | {mean:.3f} | {low:.3f} | {_over_layers(r, name, 'search_ms_per_query'):.3f} | "
                     f"{_over_layers(r, name, 'build_s'):.2f} |")
    plot = plot_path(out_dir, "results_recall.png")
    plot_recall(r, plot)
    lines += ["", f"![recall vs search time]({plot_link(out_dir, plot)})", ""]
    return lines


def _layer_subsets(r: dict, out_dir: Path) -> list[str]:
    """Passkey with imports into layer subsets only (``benchmarks/layer_subsets.py``)."""
    s = r["settings"]
    lines = [f"Importing into fewer layers would cut decode cost in proportion, so we asked which layers passkey "
             f"retrieval needs: {s['trials']} passkey documents of {s['length']:,} tokens, each read into a memory "
             f"and asked with `{s['config']}` importing into only these layers (`benchmarks/layer_subsets.py`):", "",
             "| layers | passkey |", "|---|---|"]
    lines += [f"| {name} | {correct}/{s['trials']} |" for name, correct in r["correct"].items()]
    lines.append("")
    return lines


def _sharded(r: dict, out_dir: Path) -> list[str]:
    """The Ray-sharded store's overhead (``benchmarks/sharded_latency.py``)."""
    s = r["settings"]
    lines = [f"Ray-sharded store against the single-process store, one layer's search, {s['tokens']} tokens in "
             f"{s['segments']} segments, {s['shards']} shards, {s['store']} store, k={s['k']}, median of "
             f"{s['repeats']} (`benchmarks/sharded_latency.py`). Both return the same ids.", "",
             "| case | queries per head | single process ms | sharded ms | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {x['case']} | {x['queries_per_head']} | {x['single_ms']:.2f} | {x['sharded_ms']:.2f} | "
              f"{x['ratio']:.2f}× |" for x in r["layer_search"]]
    lines.append("")
    return lines


def _index_build(r: dict, out_dir: Path) -> list[str]:
    """What the cluster index adds to remembering (``benchmarks/index_build.py``)."""
    parts = r["part_s_per_1k"]
    return [f"Building the query-aware cluster index (`benchmarks/index_build.py`) for a {r['n_tokens']:,}-token "
            f"tales memory ({r['n_segments']} segments, one part after another on a hard-linked copy): "
            f"{r['index_s_per_1k']:.2f} s per 1k tokens in all, of which sampling the model's queries "
            f"{parts['moments']:.2f}, k-means {parts['clusters']:.2f} and the int8 key copy {parts['sketch']:.2f}. "
            f"Reading with the index ran at {r['ingest_s_per_1k_with_index']:.2f} s per 1k tokens (the build "
            f"table's row for `{Path(r['build_run']).name}`), so the index adds "
            f"{100 * r['index_share_of_ingest']:.0f}% to reading without it.", ""]


def _cold_start(r: dict, out_dir: Path) -> list[str]:
    """Time to first token with the page cache dropped (``benchmarks/cold_start.py``)."""
    options = ":".join(f"{k}={v}" for k, v in r["options"].items() if k in ("reuse", "reuse_probe"))
    return [f"Time to first token with the page cache dropped before each question (`benchmarks/cold_start.py`, "
            f"{r['n_tokens']:,}-token memory, `{options}`, a {r['prompt_tokens']}-token prompt, median of "
            f"{len(r['rows'])}): cold {r['cold_s']:.1f} s, warm (the same question straight after) "
            f"{r['warm_s']:.1f} s, {r['cold_over_warm']:.1f}× warm.", ""]


_BENCHMARKS = (
    ("index_build.json", _index_build),
    ("cold_start.json", _cold_start),
    ("decode_overhead.json", _decode_overhead),
    ("recall_reuse.json", _recall_reuse),
    ("recall_probe_200k.json", lambda r, out_dir: _recall_reuse(r, out_dir, "results_recall_probe_200k.png")),
    ("recall_probe_1m.json", lambda r, out_dir: _recall_reuse(r, out_dir, "results_recall_probe_1m.png")),
    ("quantization.json", _quantization),
    ("recall.json", _recall),
    ("layer_subsets.json", _layer_subsets),
    ("sharded-latency.json", _sharded),
)
"""Each scale benchmark's run file under ``runs/scale`` and the function that writes its part, in report order."""


def _read(folder: Path, name: str) -> dict | None:
    """The JSON file ``folder/name``, or None if that benchmark has not run."""
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def size_rows(folder: Path) -> list[dict]:
    """One row per (memory size, kvmap method): grid passkey runs under ``folder`` and ``*/passkey-scale.json``."""
    rows = []
    for metrics in sorted(folder.glob("*/metrics.json")):
        m = json.loads(metrics.read_text())
        if m.get("task") != "passkey":
            continue
        for length, cells in m["metrics"].items():
            none = cells.get("none", {})
            for method, c in cells.items():
                if method.startswith("kvmap") and c.get("n") and none.get("decode_ms_per_token"):
                    rows.append({"tokens": int(length), "method": method, "correct": round(c["score"] * c["n"]),
                                 "n": c["n"], "decode_ms": c["decode_ms_per_token"],
                                 "decode_ms_none": none["decode_ms_per_token"], "ingest_tok_s": c.get("ingest_tok_s"),
                                 "peak_rss_mb": c["peak_rss_mb"], "disk_bytes_per_token": c.get("disk_bytes_per_token", 0),
                                 "accuracy": c["score"]})
    for result in sorted(folder.glob("*/*scale.json")):
        r = json.loads(result.read_text())
        builds = [json.loads(x) for x in (result.parent / "build.jsonl").read_text().splitlines()] \
            if (result.parent / "build.jsonl").exists() else []
        read, seconds = sum(b["tokens_read"] for b in builds), sum(b["seconds"] for b in builds)
        k = r["methods"]["kvmap"]
        nxt, best, layers, probe = (r["config"].get(key) for key in ("reuse_next", "reuse_next_best", "layers",
                                                                     "reuse_probe"))
        if r["config"].get("block_size"):  # the InfLLM-style block import (`--reuse 0 --block-size B`)
            method = f"kvmap-block:block_size={r['config']['block_size']}:n_blocks={r['config']['n_blocks']}"
        else:
            method = f"kvmap:reuse={r['config']['reuse']}" + (f":reuse_next={nxt}" if nxt else "") \
                + (f":reuse_next_best={best}" if nxt and best else "") + (f":reuse_probe={probe}" if probe else "")
        method += f":layers={format_layers(tuple(layers))}" if layers else ""
        task = r["task"].removesuffix("-scale")
        curve = task == "passkey" and r.get("part", "dev") == "dev"  # the plot's lines: one task, every size
        label = r["corpus"] if curve else f"{r['corpus']}, {task}, {r.get('part', 'dev')} part"
        rows.append({"tokens": r["haystack_tokens"], "method": f"{method} ({label})",
                     "correct": k["correct"], "n": k["n"], "decode_ms": r["speed"]["decode_ms_memory"],
                     "decode_ms_none": r["speed"]["decode_ms_no_memory"], "first_s": r["speed"]["prefill_s_memory"],
                     "ingest_tok_s": read / seconds if seconds else None, "peak_rss_mb": r["peak_rss_mb"],
                     "disk_bytes_per_token": r["disk_bytes_per_token"], "accuracy": k["accuracy"], "curve": curve})
    return sorted(rows, key=lambda x: (x["method"].split(" ")[0], x["tokens"]))


def plot_sizes(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(14, 4.8))
    lines = sorted({r["method"] for r in rows if r.get("curve", True)})  # a line per method and corpus; not NIAH
    for i, method in enumerate(lines):
        mine = [r for r in rows if r["method"] == method]
        x = [r["tokens"] for r in mine]
        style = {"marker": "o", "label": method, "color": f"C{i % 10}"}  # the same colour in every panel
        axes[0].plot(x, [r["decode_ms"] / r["decode_ms_none"] for r in mine], **style)
        axes[1].plot(x, [r["accuracy"] for r in mine], **style)
        axes[2].plot(x, [r["peak_rss_mb"] / 1024 for r in mine], **style)
        timed = [r for r in mine if r.get("first_s") is not None]
        if timed:
            axes[3].plot([r["tokens"] for r in timed], [r["first_s"] for r in timed], **style)
    axes[0].axhline(1.3, color="grey", lw=0.8, ls="--")
    axes[2].axhline(6, color="grey", lw=0.8, ls="--")
    axes[3].axhline(5, color="grey", lw=0.8, ls="--")
    axes[3].set_yscale("log")
    for ax, title in zip(axes, ["decode ms/token, memory / none", "passkey accuracy", "peak RSS (GiB)",
                                "first forward s (time to first token)"]):
        ax.set_xscale("log")
        ax.set_xlabel("memory tokens")
        ax.set_title(title, fontsize=9)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7)  # below the panels
    fig.tight_layout(rect=(0, 0.25, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _over_layers(r: dict, setting: str, key: str) -> float:
    """The middle value (upper median) of ``key`` over the measured layers of one store setting."""
    values = sorted(x[key] for x in r["rows"] if x["setting"] == setting)
    return values[len(values) // 2]


def plot_recall_by_layer(r: dict, path: Path) -> None:
    """Decode-step recall@k of each reuse setting, layer by layer (``recall_reuse.json``)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.4))
    for name, x in r["recall"].items():
        by_layer = x.get("decode_by_layer")
        if by_layer:
            layers = sorted(by_layer, key=int)
            ax.plot([int(l) for l in layers], [by_layer[l] for l in layers], marker=".", label=name)
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"decode recall@{r['settings']['k']}")
    ax.set_title(f"Retrieval reuse, decode steps ({r['settings']['n_tokens']:,} tokens of tales)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recall(r: dict, path: Path) -> None:
    plt = pyplot()
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
