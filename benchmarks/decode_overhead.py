"""Decode ms/token of the memory path itself, with a tiny memory (one passkey needle), against none.

Separates the fixed per-token cost of importing (30 layers of search among reused candidates and a
longer softmax) from the part that grows with the number of candidates. Alternates no-memory and
memory runs of 20 decode steps, 3 rounds; writes runs/scale/decode_overhead.json.

    python benchmarks/decode_overhead.py
"""
from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvmap.eval.passkey import make_example
from kvmap.fileio import write_json_atomic
from kvmap.models.loading import load_model
from kvmap.ports import ImportConfig
from kvmap.reader import read_into
from kvmap.stores import Memory


def decode_ms(lm, prompt: list[int], memory, config, steps: int = 20) -> float:
    block = lm.port.importing(memory, config) if memory is not None else contextlib.nullcontext()
    with torch.no_grad(), block:
        cache = lm.model(torch.tensor(prompt)[None], use_cache=True).cache
        began = time.perf_counter()
        for _ in range(steps):
            cache = lm.model(torch.tensor([[5]]), cache=cache, use_cache=True).cache
        return (time.perf_counter() - began) / steps * 1000


def main() -> None:
    lm = load_model()
    config = ImportConfig.from_options(reuse=64, reuse_next=8)
    ex = make_example(lm.tokenizer, 256, 0.5, seed=1)
    prompt = lm.tokenizer(ex.instruction + "\n" + ex.question, add_special_tokens=False)["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        memory = Memory.create(Path(tmp) / "m", lm.model_id, lm.port.layout)
        read_into(lm.port, lm.tokenizer, memory, "needle", [ex.context], progress=False)
        rounds = [(decode_ms(lm, prompt, None, None), decode_ms(lm, prompt, memory, config)) for _ in range(3)]
        n_tokens = memory.n_tokens
    none, mem = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
    result = {"settings": {"model": lm.model_id, "memory_tokens": n_tokens, "prompt_tokens": len(prompt),
                           "config": "reuse=64:reuse_next=8", "steps": 20, "rounds": 3, "threads": torch.get_num_threads()},
              "decode_ms_no_memory": none, "decode_ms_memory": mem, "ratio": mem / none, "rounds": rounds}
    out = Path("runs/scale/decode_overhead.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
