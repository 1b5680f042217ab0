"""Decode ms/token of the attention-interface port against the port it replaced, in one run.

The old port (a copy of transformers' Llama attention forward, swapped in while attached) lives only in git
history, so it runs from a worktree of the last commit that had it; the new one from this tree. Worker
processes alternate old, new, new, old, ... (``--rounds`` each), each loading SmolLM2-135M, opening the
same memory (about 4k tokens of Grimm's tales, read once by the first worker), and timing ``--steps``
decode steps after a short prompt (the order flips every round): without memory, with token-level import (the seed's method, default
settings) and with the 1M-token setting (``preset("scale-1m")``: retrieval reuse and the fused decode
kernel). Reports medians and new/old ratios; writes runs/port/decode_cost.json.

    python benchmarks/port_decode_cost.py [--old-commit REV] [--rounds 3] [--steps 32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OLD = "28d030e"
"""The last commit whose Llama port swapped in a copied attention forward."""


def worker(tree: str, memory_dir: str, steps: int) -> dict:
    """Time decode steps with the kvmap found in ``tree`` (run in a fresh process)."""
    sys.path.insert(0, tree)
    import kvmap
    from kvmap.data import grimm_tales
    from kvmap.models.loading import load_model
    from kvmap.ports import ImportConfig
    from kvmap.presets import preset
    from kvmap.reader import read_into
    from kvmap.stores import Memory

    assert Path(kvmap.__file__).is_relative_to(tree), kvmap.__file__
    lm = load_model()
    folder = Path(memory_dir) / "tales"
    if not (folder / "manifest.json").exists():
        memory = Memory.create(folder, lm.model_id, lm.port.layout)
        text = " ".join(t["text"] for t in grimm_tales()[:4])[:16000]
        read_into(lm.port, lm.tokenizer, memory, "tales", [text], progress=False)
    memory = Memory.open(folder)
    prompt = lm.tokenizer("Who found the golden ball, and where did it fall?", add_special_tokens=False)["input_ids"]

    from decode_overhead import decode_ms  # beside this script; imports kvmap from `tree`, now first on the path

    def ms(config) -> float:
        return decode_ms(lm, prompt, memory if config is not None else None, config, steps)

    ms(None)  # warm up (kernel build, first allocations)
    return {"port": type(lm.port).__module__, "memory_tokens": memory.n_tokens,
            "none": ms(None), "token-import": ms(ImportConfig()), "scale-1m": ms(preset("scale-1m"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-commit", default=DEFAULT_OLD)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--worker", nargs=2, metavar=("TREE", "MEMORY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old_tree), args.old_commit],
                       check=True)
        try:
            runs = {"old": [], "new": []}
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
            for round_ in range(args.rounds):
                order = (("old", old_tree), ("new", ROOT))
                for name, tree in order if round_ % 2 == 0 else order[::-1]:  # ABBA: no order effect
                    out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", str(tree), tmp],
                                         check=True, capture_output=True, text=True, env=env, cwd=tree)
                    runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(f"round {round_ + 1} {name}: {runs[name][-1]}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False)
    import torch

    modes = ("none", "token-import", "scale-1m")
    medians = {name: {m: statistics.median(r[m] for r in rs) for m in modes} for name, rs in runs.items()}
    result = {"settings": {"old_commit": args.old_commit, "rounds": args.rounds, "steps": args.steps,
                           "memory_tokens": runs["new"][0]["memory_tokens"], "threads": torch.get_num_threads(),
                           "order": "old, new / new, old alternating by round, one process each"},
              "decode_ms_median": medians,
              "new_over_old": {m: medians["new"][m] / medians["old"][m] for m in modes}, "runs": runs}
    out = ROOT / "runs/port/decode_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("settings", "decode_ms_median", "new_over_old")}, indent=1))


if __name__ == "__main__":
    main()
