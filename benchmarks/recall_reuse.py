"""Recall@k of retrieval reuse (candidates picked by the prompt, top-k among them) on a real memory.

SmolLM2-135M answers FairytaleQA questions with a memory folder attached (e.g. the tales corpus
memory of ``kvmap bench scale``), through the real import path, for each reuse setting: exact
candidates (``reuse=K``: each prompt query's K best) or block-bound candidates (``reuse_blocks=B``
blocks of 32 tokens per layer and KV head). Every search the import makes in the measured layers
(all by default) is recorded: its queries and the ids it returned, and whether it came from the
prompt's forward (which picks the candidates) or from a decode step (which reuses them). Exact search over the whole memory gives each query's true k-th best score;
recall@k = share of returned ids that reach it (ties count, as in ``recall_real_kv.py``).
Writes runs/scale/recall_reuse.json, with decode-step recall per layer (some layers' decode queries
look for other memories than the prompt's did, so the mean hides where reuse loses).

    python benchmarks/recall_reuse.py --memory ~/.cache/kvmap/scale/tales-1m [--settings reuse=128,reuse_blocks=256]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from recall_real_kv import questions  # noqa: E402

import kvmap.models.attend as attend  # noqa: E402
from kvmap.fileio import write_json_atomic  # noqa: E402
from kvmap.models.loading import load_model  # noqa: E402
from kvmap.ports import ImportConfig, format_layers, parse_layers  # noqa: E402
from kvmap.stores import Memory  # noqa: E402
from kvmap.timing import timed_greedy  # noqa: E402


def per_layer(rows: list[dict]) -> list[dict]:
    """One row per (setting, layer, prompt or decode): mean recall and candidates over its searches."""
    groups: dict[tuple, list[dict]] = {}
    for x in rows:
        groups.setdefault((x["budget"], x["layer"], x["first"]), []).append(x)
    return [{"budget": budget, "layer": layer, "first": first, "searches": len(g),
             "recall": statistics.mean(x["recall"] for x in g), "n_queries": sum(x["n_queries"] for x in g),
             "candidates": statistics.mean(x["candidates"] for x in g)}
            for (budget, layer, first), g in groups.items()]


def record_searches(lm, memory, layers: list[int], prompts: list[list[int]], budgets: list[str], k: int,
                    new_tokens: int) -> tuple[list[dict], dict]:
    """Answer every prompt with each reuse setting, recording each search of the measured layers.

    Returns (one dict per search: setting, layer, prompt or decode, queries, ids, candidates; per setting
    the median prompt-forward seconds and the total)."""
    calls: list[dict] = []
    real_retrieve = attend._retrieve
    setting = None

    def recording_retrieve(state, layer, queries, t):
        first = layer not in state.candidates
        out = real_retrieve(state, layer, queries, t)
        if layer in layers:
            calls.append({"budget": setting, "layer": layer, "first": first,
                          "queries": queries.clone(), "ids": out[0].clone(),
                          "candidates": (state.candidates[layer][0] >= 0).sum(1).float().mean().item()})
        return out

    attend._retrieve = recording_retrieve
    attend.FAST_DECODE = False  # decode steps through _retrieve, so they are recorded (same results: a test)
    seconds = {}
    try:
        for setting in budgets:
            options = {key: int(value) for key, _, value in (o.partition("=") for o in setting.split(":"))}
            config = ImportConfig.from_options(top_k=k, **{"reuse": 1, **options})
            began = time.perf_counter()
            first_s = [timed_greedy(lm.port, lm.tokenizer, p, new_tokens, memory, config).prefill_s for p in prompts]
            seconds[setting] = {"prompt_s": statistics.median(first_s), "total_s": time.perf_counter() - began}
            print(f"{setting}: {sum(c['budget'] == setting for c in calls)} searches recorded, "
                  f"prompt forward {seconds[setting]['prompt_s']:.1f}s", flush=True)
    finally:
        attend._retrieve = real_retrieve
    return calls, seconds


def recall_rows(memory, calls: list[dict], layers: list[int], budgets: list[str], k: int) -> list[dict]:
    """Recall@k of each recorded search against exact search over the whole memory (ties counted as hits)."""
    rows = []
    for layer in layers:
        mine = [c for c in calls if c["layer"] == layer]
        queries = torch.cat([c["queries"] for c in mine], dim=1)
        kth = memory.search_streamed(layer, queries, k)[0][..., -1]  # exact k-th best score
        start = 0
        for c in mine:
            m = c["queries"].shape[1]
            ids, q = c["ids"], c["queries"]
            keys = memory.fetch(layer, ids.clamp(min=0))[0]  # (H, M, k, d)
            got = torch.einsum("hmd,hmkd->hmk", q, keys)
            want = kth[:, start:start + m, None]
            hit = ((got >= want - 1e-3 * want.abs()) & (ids >= 0)).float().mean().item()
            rows.append({"layer": layer, "budget": c["budget"], "first": c["first"], "recall": hit, "n_queries": m,
                         "candidates": c["candidates"]})
            start += m
        for budget in budgets:
            for first in (True, False):
                r = [x["recall"] for x in rows if x["layer"] == layer and x["budget"] == budget and x["first"] == first]
                print(f"layer {layer:2d} {budget:18s} {'prompt' if first else 'decode'} recall@{k} "
                      f"{statistics.mean(r):.3f}", flush=True)
    return rows


def summarize(rows: list[dict], calls: list[dict], seconds: dict, budgets: list[str], layers: list[int]) -> dict:
    """Per setting: recall (prompt, decode, all; weighted by queries), timings, candidates, decode recall by layer."""
    def mean(budget: str, first: bool | None) -> float:
        r = [(x["recall"], x["n_queries"]) for x in rows if x["budget"] == budget and (first is None or x["first"] == first)]
        return sum(a * n for a, n in r) / sum(n for _, n in r)

    def by_layer(budget: str, first: bool) -> dict[int, float]:
        return {layer: statistics.mean(x["recall"] for x in rows if x["budget"] == budget and x["layer"] == layer
                                       and x["first"] == first) for layer in layers}

    return {b: {"prompt": mean(b, True), "decode": mean(b, False), "all": mean(b, None), **seconds[b],
                "candidates_per_head": statistics.median(c["candidates"] for c in calls if c["budget"] == b),
                "decode_by_layer": by_layer(b, False), "prompt_by_layer": by_layer(b, True)}
            for b in budgets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", required=True)
    ap.add_argument("--settings", default="reuse=16,reuse=64,reuse=64:reuse_next=8,reuse=128,reuse=256,"
                                         "reuse=256:reuse_next=8:reuse_next_best=16,reuse=1024,reuse_blocks=1024",
                    help="reuse=K (exact candidates) or reuse_blocks=B (block-bound candidates), other ImportConfig "
                         "fields after ':' (e.g. reuse=64:select_last=8), comma-separated")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--layers", help="layers to measure, e.g. 0-29 or 0+10+20+29 (default: all)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--out", default="runs/scale/recall_reuse.json")
    args = ap.parse_args()
    lm = load_model()
    memory = Memory.open(args.memory, expect_model_id=lm.model_id, verify=False)
    layers = list(parse_layers(args.layers) if args.layers else range(lm.port.layout.n_layers))
    prompts = [lm.tokenizer(f"Question: {q}\nAnswer:", add_special_tokens=False)["input_ids"]
               for q in questions(lm.tokenizer, args.questions)]
    budgets = args.settings.split(",")
    calls, seconds = record_searches(lm, memory, layers, prompts, budgets, args.k, args.new_tokens)
    rows = recall_rows(memory, calls, layers, budgets, args.k)
    summary = summarize(rows, calls, seconds, budgets, layers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"model": lm.model_id, "n_tokens": memory.n_tokens,
                                                                     "layers": format_layers(tuple(layers))}
    write_json_atomic(out, {"settings": settings, "recall": summary, "rows": per_layer(rows)}, indent=1)
    print(json.dumps({b: {k: v for k, v in x.items() if not k.endswith("_by_layer")} for b, x in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
