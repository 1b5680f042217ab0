"""Time to first token from a memory whose files are not in the page cache (cold) and from one that is (warm).

Each cold trial drops the OS page cache (``/proc/sys/vm/drop_caches``, so it needs root) with the model
already loaded and the memory already open (its manifest read; the cluster index's small arrays loaded, as
a running ``kvmap ask`` would hold them), then times one prompt forward: every key copy, key and value it
touches comes from disk. Each warm trial asks the same question again straight after. The question is the
passkey harness's own (``kvmap bench scale``'s prompt, without a needle). Writes runs/scale/cold_start.json.

    sudo python benchmarks/cold_start.py --memory ~/.cache/kvmap/scale/tales-1m --reuse-probe 32
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvmap.config import ImportConfig  # noqa: E402
from kvmap.eval.tasks import make_examples  # noqa: E402
from kvmap.fileio import write_json_atomic  # noqa: E402
from kvmap.models.loading import load_model  # noqa: E402
from kvmap.stores import Memory  # noqa: E402
from kvmap.stores.clusters import Probe  # noqa: E402
from kvmap.timing import timed_greedy  # noqa: E402

DROP = Path("/proc/sys/vm/drop_caches")


def drop_page_cache() -> None:
    os.sync()
    DROP.write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=Path, default=Path.home() / ".cache/kvmap/scale/tales-1m")
    parser.add_argument("--reuse-probe", type=int, default=32)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/scale/cold_start.json"))
    args = parser.parse_args()
    if not os.access(DROP, os.W_OK):
        sys.exit(f"cold_start: error: cannot write {DROP} (run as root) to drop the page cache")
    lm = load_model("smollm2-135m")
    memory = Memory.open(args.memory.expanduser(), expect_model_id=lm.model_id, expect_layout=lm.port.layout,
                         verify=False)
    config = ImportConfig.from_options(top_k=16, reuse=256, reuse_next=8, reuse_next_best=16,
                                       reuse_probe=args.reuse_probe)
    memory.query_index(Probe(clusters=args.reuse_probe, distance=config.distance))  # loaded as a running ask holds it
    ex = make_examples("passkey", lm.tokenizer, 256, 1, 0, part="dev")[0]
    prompt = lm.tokenizer(ex.instruction + "\n" + ex.question, add_special_tokens=False)["input_ids"]
    rows = []
    for trial in range(args.trials):
        drop_page_cache()
        cold = timed_greedy(lm.port, lm.tokenizer, prompt, 1, memory, config).prefill_s
        warm = timed_greedy(lm.port, lm.tokenizer, prompt, 1, memory, config).prefill_s
        rows.append({"trial": trial, "cold_s": cold, "warm_s": warm})
        print(f"trial {trial}: first forward cold {cold:.1f} s, warm {warm:.1f} s", flush=True)
    cold, warm = statistics.median(r["cold_s"] for r in rows), statistics.median(r["warm_s"] for r in rows)
    write_json_atomic(args.out, {"memory": str(args.memory), "n_tokens": memory.n_tokens, "options": config.options(),
                                 "prompt_tokens": len(prompt), "rows": rows, "cold_s": cold, "warm_s": warm,
                                 "cold_over_warm": cold / warm})
    print(f"median first forward: cold {cold:.1f} s, warm {warm:.1f} s ({cold / warm:.1f}x); wrote {args.out}")


if __name__ == "__main__":
    main()
