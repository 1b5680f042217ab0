"""Recall@k of each store setting against exact search, on SmolLM2's real K/V and real queries.

SmolLM2-135M reads ``--tokens`` tokens of tales into an exact memory. FairytaleQA questions are
then read with memory import on, and every (layer, rotated query) the import searches with is
recorded. Each index setting is built over the same keys of sampled layers and answers the same
queries; recall@k = share of its k results that score at least exact search's k-th best (ties count), with its search time per call.
Writes runs/scale/recall.json.

    python benchmarks/recall_real_kv.py [--tokens 16000 --questions 8 --k 16]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvmap.eval.tasks import haystack
from kvmap.fileio import write_json_atomic
from kvmap.models.loading import load_model
from kvmap.ports import ImportConfig
from kvmap.reader import read_into
from kvmap.stores import Memory, make_index

SETTINGS = {
    "flat": {},
    "hnsw ef_search=64": {"ef_search": 64},
    "hnsw ef_search=256": {"ef_search": 256},
    "ivfpq nprobe=16": {"nprobe": 16, "min_points": 1024},
    "ivfpq nprobe=64": {"nprobe": 64, "min_points": 1024},
    "lsh 16x8": {},
    "lsh 32x8": {"n_tables": 32},
}


class _RecordingMemory:
    """Passes searches through to a memory and keeps each layer's queries (H, M, d)."""

    def __init__(self, memory: Memory):
        self.memory, self.queries = memory, {}

    def search(self, layer, queries, k, **kw):
        self.queries.setdefault(layer, []).append(queries.detach().float().clone())
        return self.memory.search(layer, queries, k, **kw)

    def __getattr__(self, name):
        return getattr(self.memory, name)


def tie_aware_recall(queries, keys, ids, kth, tol: float = 1e-3) -> torch.Tensor:
    """Share of returned ids whose true score reaches exact search's k-th best score.

    Counting scores, not ids: layer 0's pre-RoPE keys depend on the token alone, so a repeated
    token ties exactly and any of its copies is an equally right answer.
    """
    valid = ids >= 0
    vecs = keys.gather(1, ids.clamp(min=0).flatten(1)[..., None].expand(-1, -1, keys.shape[-1]))  # (H, M*k, d)
    scores = (vecs.view(*ids.shape, -1) * queries[:, :, None]).sum(-1)  # (H, M, k)
    return ((scores >= kth[..., None] - tol * kth.abs()[..., None]) & valid).float().mean()


def questions(tokenizer, n: int) -> list[str]:
    """The first ``n`` FairytaleQA validation questions of the harness's seed-0 sample."""
    from kvmap.eval.tasks import fairytaleqa_examples

    return [ex.question for ex in fairytaleqa_examples(tokenizer, 0, n, seed=0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16000)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--layers", default="0,10,20,29", help="layers to measure")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--out", default="runs/scale/recall.json")
    args = ap.parse_args()
    lm = load_model()
    layers = [int(x) for x in args.layers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        memory = Memory.create(Path(tmp) / "m", lm.model_id, lm.port.layout)
        read_into(lm.port, lm.tokenizer, memory, "tales", [" ".join(haystack(lm.tokenizer, args.tokens, random.Random(0)))])
        recorder = _RecordingMemory(memory)
        with torch.no_grad(), lm.port.importing(recorder, ImportConfig.from_options(top_k=args.k)):
            for q in questions(lm.tokenizer, args.questions):
                lm.model(lm.tokenizer(f"Question: {q}\nAnswer:", return_tensors="pt").input_ids)
        n = memory.n_tokens
        for layer in layers:
            queries = torch.cat(recorder.queries[layer], dim=1)  # (H, M, d)
            all_ids = torch.arange(n).expand(memory.layout.n_kv_heads, n)
            keys = memory.fetch(layer, all_ids)[0].transpose(0, 1).numpy()  # (N, H, d) as stored
            keys_t = torch.from_numpy(keys).float().transpose(0, 1)  # (H, N, d)
            kth = memory.search(layer, queries, args.k)[0][..., -1]  # (H, M) exact k-th best score
            for name, params in SETTINGS.items():
                index = make_index(name.split()[0], **params)
                began = time.perf_counter()
                index.build([keys])
                build_s = time.perf_counter() - began
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    ids = index.search(queries, args.k)[1]
                    times.append(time.perf_counter() - t)
                hits = tie_aware_recall(queries, keys_t, ids, kth).item()
                rows.append({"layer": layer, "setting": name, "recall": hits, "build_s": build_s,
                             "search_ms_per_query": statistics.median(times) * 1e3 / queries.shape[1],
                             "n_queries": int(queries.shape[1])})
                print(f"layer {layer:2d} {name:20s} recall@{args.k} {hits:.3f}  "
                      f"{rows[-1]['search_ms_per_query']:.3f} ms/query", flush=True)
    summary = {name: statistics.mean(r["recall"] for r in rows if r["setting"] == name) for name in SETTINGS}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"model": lm.model_id, "n_tokens": n}
    write_json_atomic(out, {"settings": settings, "mean_recall": summary, "rows": rows}, indent=1)
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
