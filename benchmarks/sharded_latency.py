"""Search latency of the Ray-sharded store against the single-process store, same data, same run.

One layer's search, SmolLM2's KV shape (3 KV heads x 64 dims), exact store, random keys (search
cost does not depend on the values). Decode searches 1 query per head, a prefill chunk 512.
Writes runs/scale/sharded-latency.json.

    python benchmarks/sharded_latency.py [--tokens 100000 --segments 8 --shards 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kvmap.fileio import write_json_atomic
from kvmap.ports import KVLayout
from kvmap.stores import Memory
from kvmap.stores.sharded import ShardedMemory

LAYOUT = KVLayout(n_layers=1, n_kv_heads=3, head_dim=64)


def build(path: Path, n_tokens: int, n_segments: int, store: str) -> Memory:
    rng = np.random.default_rng(0)
    memory = Memory.create(path, "bench", LAYOUT, store=store)
    per = n_tokens // n_segments
    for s in range(n_segments):
        shape = (1, LAYOUT.n_kv_heads, per, LAYOUT.head_dim)
        with memory.writer(f"s{s}") as w:
            w.append(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32),
                     np.zeros(per, int), np.full(per, s), np.arange(per), [""] * per)
    return Memory.open(path)


def median_ms(search, queries, k: int, repeats: int) -> float:
    search(0, queries, k)  # warm: builds the RAM index
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        search(0, queries, k)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--store", default="exact")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default="runs/scale/sharded-latency.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the single-process store on one core, as each shard
    with tempfile.TemporaryDirectory() as tmp:
        memory = build(Path(tmp) / "m", args.tokens, args.segments, args.store)
        sharded = ShardedMemory(Path(tmp) / "m", n_shards=args.shards)
        rows = []
        for name, m in (("decode", 1), ("prefill-chunk", 512)):
            q = torch.randn(LAYOUT.n_kv_heads, m, LAYOUT.head_dim)
            assert torch.equal(memory.search(0, q, args.k)[1], sharded.search(0, q, args.k)[1])
            single = median_ms(memory.search, q, args.k, args.repeats)
            shard = median_ms(sharded.search, q, args.k, args.repeats)
            rows.append({"case": name, "queries_per_head": m, "single_ms": single, "sharded_ms": shard,
                         "ratio": shard / single})
            print(f"{name:14s} single {single:8.2f} ms  sharded({args.shards}) {shard:8.2f} ms  x{shard / single:.2f}")
        sharded.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_json_atomic(out, {"settings": settings, "layer_search": rows}, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
