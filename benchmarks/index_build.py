"""What the query-aware cluster index adds to remembering: seconds per 1k tokens of each of its parts.

On a copy of a corpus memory (hard links: the K/V files are shared, never written) without its index,
each segment is indexed part by part, as ``remember`` does at commit: the model's queries over the
segment's first 1,024 tokens (``sample_query_moments``), k-means under their moment
(``clusters.build``), and the int8 key copy in cluster order (``sketch.build``). Ingest without the index
is the corpus build's own rate (``build.jsonl`` of the run folder that built the memory) minus these. Writes
runs/scale/index_build.json.

    python benchmarks/index_build.py --memory ~/.cache/kvmap/scale/tales-10k --build runs/scale/tales-10k-probe32
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvmap.config import ImportConfig  # noqa: E402
from kvmap.fileio import write_json_atomic  # noqa: E402
from kvmap.models.loading import load_model  # noqa: E402
from kvmap.reader import sample_query_moments  # noqa: E402
from kvmap.stores import Memory, clusters, sketch  # noqa: E402

DERIVED = ("clusters-", "sketch-", clusters.MOMENTS_FILE)


def index_copy(source: Path, model: str) -> dict:
    """Seconds of each index part over every segment of a hard-linked copy of ``source`` without its index."""
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        copy = Path(tmp) / "memory"
        shutil.copytree(source, copy, copy_function=os.link)
        for path in copy.glob("segments/*/*"):
            if path.name.startswith(DERIVED):
                path.unlink()
        memory = Memory.open(copy, verify=False)
        lm = load_model(model)
        lm.port.check_memory(memory)
        spec = (ImportConfig().distance, clusters.CLUSTER_SIZE)
        L, H, d = memory.layout.n_layers, memory.layout.n_kv_heads, memory.layout.head_dim
        seconds = {"moments": 0.0, "clusters": 0.0, "sketch": 0.0}
        for seg in memory._segments:
            began = time.perf_counter()
            clusters.save_moments(seg.folder, *sample_query_moments(lm.port, seg.tokens()["token_ids"].tolist()))
            seconds["moments"] += time.perf_counter() - began
            began = time.perf_counter()
            layers = clusters.build(seg.folder, seg.read_keys, *spec, seg.n_tokens, L, H, d)
            clusters.save(seg.folder, *spec, layers, seg.n_tokens)
            seconds["clusters"] += time.perf_counter() - began
            began = time.perf_counter()
            sketch.build(seg.folder, *spec, layers, seg.read_keys, seg.n_tokens, H, d)
            seconds["sketch"] += time.perf_counter() - began
        return {"n_tokens": memory.n_tokens, "n_segments": len(memory._segments), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=Path, default=Path.home() / ".cache/kvmap/scale/tales-10k")
    parser.add_argument("--build", type=Path, default=Path("runs/scale/tales-10k-probe32"),
                        help="the run folder whose build.jsonl built the memory (with its index)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("runs/scale/index_build.json"))
    args = parser.parse_args()
    result = index_copy(args.memory.expanduser(), args.model)
    builds = [json.loads(x) for x in (args.build / "build.jsonl").read_text().splitlines() if x.strip()]
    read, build_s = sum(b["tokens_read"] for b in builds), sum(b["seconds"] for b in builds)
    index_s = sum(result["seconds"].values())
    per_1k = {part: s / result["n_tokens"] * 1000 for part, s in result["seconds"].items()}
    result.update(memory=str(args.memory), build_run=str(args.build), build_tokens_read=read, build_s=build_s,
                  index_s=index_s, index_s_per_1k=sum(per_1k.values()), part_s_per_1k=per_1k,
                  ingest_s_per_1k_with_index=build_s / read * 1000,
                  index_share_of_ingest=index_s / max(build_s - index_s, 1e-9))
    write_json_atomic(args.out, result)
    print(f"index: {result['index_s_per_1k']:.3f} s per 1k tokens "
          f"({', '.join(f'{p} {s:.3f}' for p, s in per_1k.items())}); ingest with it "
          f"{result['ingest_s_per_1k_with_index']:.2f} s per 1k tokens; the index adds "
          f"{100 * result['index_share_of_ingest']:.0f}% to ingest; wrote {args.out}")


if __name__ == "__main__":
    main()
