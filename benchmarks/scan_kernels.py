"""What one chunk of the exact streamed search costs on this CPU, and what an int8 first stage would cost.

Issue 17 asks for a first answer from a 1M-token memory in seconds; the prompt's forward now reads every
key with :func:`kvmap.stores.scan.stream_topk` (float16 keys cast to float32, an einsum, a top-k per
chunk). This times the kernels of one chunk, side by side in one process, median of ``--repeats``:

- ``stream_topk path``: the cast, the einsum and the top-k, as ``stream_topk`` does them;
- ``float32 matmul``: the product alone, keys already float32 and laid out (H, d, n);
- ``int8 matmul``: ``torch._int_mm`` on int8 keys (n, d) -> (d, n), the product of a quantised first stage;
- ``top-k``: the chunk's top-``rerank`` of the float scores, what a first stage hands to exact re-ranking.

Random keys and queries: only the time is measured here, not recall (that needs real queries:
``benchmarks/recall_real_kv.py``). Scaled to 1M tokens x 30 layers it says how far each path is from the
issue's 5 s. Writes runs/scale/scan_kernels.json.

    python benchmarks/scan_kernels.py [--keys 262144 --queries 120 --threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kvmap.fileio import write_json_atomic


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1 << 18, help="keys in the chunk (n)")
    ap.add_argument("--queries", type=int, default=120, help="queries per KV head (a prompt's tokens x 3 query heads)")
    ap.add_argument("--heads", type=int, default=3, help="KV heads (SmolLM2-135M: 3)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--rerank", type=int, default=64, help="first-stage candidates per query")
    ap.add_argument("--layers", type=int, default=30, help="for the 1M extrapolation")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="runs/scale/scan_kernels.json")
    ap.add_argument("--note", default="", help="what else the machine was running (recorded with the numbers)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, m, h, d = args.keys, args.queries, args.heads, args.head_dim
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(n, h, d, generator=gen).numpy().astype(np.float16)  # (n, H, d) as a segment stores them
    queries = torch.randn(h, m, d, generator=gen)  # (H, M, d) float32
    keys_hdn = torch.from_numpy(raw.astype(np.float32)).permute(1, 2, 0).contiguous()  # (H, d, n)
    int8_keys = [torch.randint(-127, 128, (d, n), dtype=torch.int8, generator=gen) for _ in range(h)]  # (d, n) each
    int8_queries = torch.randint(-127, 128, (h, m, d), dtype=torch.int8, generator=gen)

    def stream_path():
        keys = torch.from_numpy(raw.astype(np.float32))
        torch.einsum("hmd,nhd->hmn", queries, keys).topk(args.k, dim=-1)

    def float32_matmul():
        torch.bmm(queries, keys_hdn)  # (H, M, n)

    def int8_matmul():
        for head in range(h):
            torch._int_mm(int8_queries[head], int8_keys[head])  # (M, n) int32

    scores = torch.bmm(queries, keys_hdn)

    def topk():
        scores.topk(args.rerank, dim=-1)

    timed = {name: median_seconds(fn, args.repeats) for name, fn in
             (("stream_topk path", stream_path), ("float32 matmul", float32_matmul),
              ("int8 matmul", int8_matmul), ("top-k", topk))}
    scale = (1_000_000 / n) * args.layers  # chunks of this size in 1M tokens, times the layers
    rows = [{"kernel": name, "chunk_s": round(s, 4), "keys_per_s": round(n * h * m / s),
             "one_prompt_1m_tokens_s": round(s * scale, 1)} for name, s in timed.items()]
    for row in rows:
        print(f"{row['kernel']:18s} {row['chunk_s']:.4f} s a chunk -> {row['one_prompt_1m_tokens_s']:7.1f} s "
              f"for one prompt over 1M tokens x {args.layers} layers")
    write_json_atomic(Path(args.out), {"settings": vars(args), "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
