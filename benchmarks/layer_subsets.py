"""Which layers must import memories for passkey retrieval? (Importing into fewer layers would cut decode cost.)

Each trial reads one passkey document (``--length`` tokens) into a fresh memory, then asks for the
passkey with retrieval reuse (``reuse=64:reuse_next=8``) importing into each layer subset in turn,
same memory and prompt. Writes runs/scale/layer_subsets.json.

    python benchmarks/layer_subsets.py [--trials 10 --length 12000]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from kvmap.eval.passkey import depths, make_example, score
from kvmap.fileio import write_json_atomic
from kvmap.models.loading import load_model
from kvmap.ports import ImportConfig, parse_layers
from kvmap.reader import read_into
from kvmap.stores import Memory
from kvmap.timing import timed_greedy

SUBSETS = ["0-29", "0-14", "15-29", "0-28/2", "1-29/2", "0-27/3", "8-23", "0-19", "10-29"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--length", type=int, default=12000, help="passkey document tokens (12000)")
    ap.add_argument("--subsets", default=",".join(SUBSETS))
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--out", default="runs/scale/layer_subsets.json")
    args = ap.parse_args()
    lm = load_model()
    tok = lm.tokenizer
    subsets = args.subsets.split(",")
    rows = []
    for i, depth in enumerate(tqdm(depths(args.trials), desc="trials")):
        ex = make_example(tok, args.length, depth, seed=args.seed + i)
        prompt = tok(ex.instruction + "\n" + ex.question, add_special_tokens=False)["input_ids"]
        with tempfile.TemporaryDirectory() as tmp:
            memory = Memory.create(Path(tmp) / "m", lm.model_id, lm.port.layout)
            read_into(lm.port, tok, memory, "doc", [ex.context], progress=False)
            for subset in subsets:
                config = ImportConfig.from_options(reuse=64, reuse_next=8, layers=parse_layers(subset))
                out = timed_greedy(lm.port, tok, prompt, 12, memory, config)
                rows.append({"trial": i, "depth": depth, "passkey": ex.passkey, "layers": subset,
                             "output": out.text, "correct": score(out.text, ex.passkey)})
    summary = {s: sum(r["correct"] for r in rows if r["layers"] == s) for s in subsets}
    result = {"settings": {"model": lm.model_id, "trials": args.trials, "length": args.length, "seed": args.seed,
                           "config": "reuse=64:reuse_next=8", "max_new_tokens": 12},
              "correct": summary, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
