"""Sweep the import knobs (top-k, distance D, importing layers) on passkey and tale QA.

Each haystack is read into memory once; every variant then answers from the same memory, so the
variants are compared on identical examples. Writes runs/sweep/sweep.json.

    python benchmarks/sweep_defaults.py --length 6000 --examples 6
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from kvmap.eval.passkey import depths, make_example, score
from kvmap.fileio import write_json_atomic
from kvmap.models.llama import LlamaMemoryPort
from kvmap.models.loading import load_model
from kvmap.ports import ImportConfig
from kvmap.reader import ReaderConfig, read_into
from kvmap.stores import Memory
from kvmap.timing import timed_greedy


def variants(n_layers: int) -> dict[str, ImportConfig]:
    half = n_layers // 2
    out = {f"k={k}": ImportConfig.from_options(top_k=k) for k in (1, 4, 16, 64)}
    out.update({f"D={d}": ImportConfig.from_options(distance=d) for d in (0, 64, 1024, 4096, 7000)})
    out["layers 0-%d" % (half - 1)] = ImportConfig.from_options(layers=tuple(range(half)))
    out["layers %d-%d" % (half, n_layers - 1)] = ImportConfig.from_options(layers=tuple(range(half, n_layers)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=6000)
    ap.add_argument("--examples", type=int, default=6)
    ap.add_argument("--out", default="runs/sweep")
    args = ap.parse_args()
    lm = load_model()
    port = LlamaMemoryPort(lm.model, lm.model_id)
    tok = lm.tokenizer
    configs = variants(port.layout.n_layers)
    results = {name: [] for name in configs}
    root = Path(tempfile.mkdtemp(prefix="kvmap-sweep-"))
    began = time.time()
    try:
        for i, depth in enumerate(depths(args.examples)):
            ex = make_example(tok, args.length, depth, seed=1000 + i)
            memory = Memory.create(root / f"m{i}", lm.model_id, port.layout)
            read_into(port, tok, memory, "haystack", [ex.context], ReaderConfig(), progress=False)
            prompt = tok(ex.instruction + "\n" + ex.question, add_special_tokens=False)["input_ids"]
            for name, config in configs.items():
                gen = timed_greedy(port, tok, prompt, 10, memory, config)
                results[name].append({"depth": depth, "correct": score(gen.text, ex.passkey),
                                      "decode_ms": gen.decode_ms_per_token, "output": gen.text})
            print(f"example {i}: " + " ".join(f"{n}:{int(r[-1]['correct'])}" for n, r in results.items()), flush=True)
            shutil.rmtree(root / f"m{i}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {name: {"accuracy": sum(r["correct"] for r in rows) / len(rows), "n": len(rows),
                      "decode_ms_median": sorted(r["decode_ms"] for r in rows)[len(rows) // 2]}
               for name, rows in results.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"task": "passkey", "model": lm.model_id, "length": args.length, "examples": args.examples,
              "seconds": time.time() - began, "summary": summary, "rows": results}
    write_json_atomic(out / "sweep.json", report, indent=1)
    for name, s in summary.items():
        print(f"{name:14s} {s['accuracy']:.0%} (n={s['n']}), decode {s['decode_ms_median']:.0f} ms/token")


if __name__ == "__main__":
    main()
