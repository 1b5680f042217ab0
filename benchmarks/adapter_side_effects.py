"""What a memory adapter does to the model's other abilities (issue 16, item 4): perplexity on held-out tales.

The adapter acts only while memories are imported (kvmap.models.adapter), so without memory the tuned model
*is* the base model; this measures that instead of assuming it, and measures what the adapter changes:

- ``base`` / ``tuned``: no memory (must be equal);
- ``tuned_adapter_forced_on``: the LoRA weights switched on without memory (what they would do if they
  were always on: how far training moved the model);
- ``base_with_memory`` / ``tuned_with_memory``: token-level import of an unrelated tale while reading (how much
  an irrelevant memory hurts ordinary text, before and after tuning).

Held-out text: the first ``--tokens`` tokens of ``--tales`` shipped tales (the first long enough, in a seeded order) (the evaluations' haystack tales,
never trained on: training uses FairytaleQA train stories that are not among them); the unrelated memory
is the next tale in the same seeded order. Writes ``side_effects.json`` into the adapter's run folder.

    python benchmarks/adapter_side_effects.py --adapter runs/finetune/memory-adapter/adapter [--tales 6]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def nll(lm, ids: list[int], memory=None, force_adapter: bool = False) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ``ids`` (one forward) and the number of predicted tokens."""
    import contextlib

    from kvmap.models.adapter import adapter_active

    x = torch.tensor(ids)[None]
    block = lm.port.importing(memory) if memory is not None else contextlib.nullcontext()
    forced = adapter_active(lm.model) if force_adapter else contextlib.nullcontext()
    with torch.no_grad(), block, forced:
        logits = lm.model(input_ids=x).logits[0, :-1].float()
    return float(F.cross_entropy(logits, x[0, 1:], reduction="sum")), len(ids) - 1


def memory_of(lm, ids: list[int]):
    """A TensorMemory of what the base model exports reading ``ids`` (the reader's chunked read)."""
    from kvmap.reader import read_tokens
    from kvmap.stores.tensor import TensorMemory

    parts = list(read_tokens(lm.port, ids))
    keys = torch.cat([k for _, k, _ in parts], dim=2)  # (L, H, M, d)
    values = torch.cat([v for _, _, v in parts], dim=2)
    return TensorMemory(lm.port.layout, lm.model_id, {l: (keys[l][None], values[l][None]) for l in range(keys.shape[0])})


def main() -> None:
    from kvmap.data import tales
    from kvmap.models.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, help="adapter folder (kvmap finetune's OUT/adapter)")
    ap.add_argument("--tales", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--memory-tokens", type=int, default=2048)
    args = ap.parse_args()
    base, tuned = load_model(), load_model(adapter=args.adapter)
    tok = base.tokenizer
    order = sorted(tales(), key=lambda t: t["id"])
    random.Random("adapter-side-effects").shuffle(order)
    texts = []  # the first tales (in that order) long enough for a window; one more for the memory
    for tale in order:
        ids = tok(" ".join(tale["text"].split()), add_special_tokens=False)["input_ids"]
        if len(ids) >= args.tokens:
            texts.append(ids)
        if len(texts) == args.tales + 1:
            break
    memory = memory_of(base, texts[-1][:args.memory_tokens])
    conditions = {"base": (base, None, False), "tuned": (tuned, None, False),
                  "tuned_adapter_forced_on": (tuned, None, True),
                  "base_with_memory": (base, memory, False), "tuned_with_memory": (tuned, memory, False)}
    began = time.perf_counter()
    sums = {name: [0.0, 0] for name in conditions}
    for ids in texts[:-1]:
        window = ids[:args.tokens]
        for name, (lm, mem, forced) in conditions.items():
            total, n = nll(lm, window, mem, forced)
            sums[name][0] += total
            sums[name][1] += n
    result = {"perplexity": {name: round(math.exp(t / n), 3) for name, (t, n) in sums.items()},
              "tokens": sums["base"][1], "tales": len(texts) - 1, "memory_tokens": memory.n_tokens,
              "adapter": args.adapter, "seconds": round(time.perf_counter() - began, 1)}
    ppl = result["perplexity"]
    result["tuned_vs_base_no_memory"] = round(ppl["tuned"] / ppl["base"] - 1, 5)
    out = Path(args.adapter).parent / "side_effects.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
