"""Where imported memories pull decoding (issue 16, diagnosis): for token-level import, per layer and query
head, the share of attention that goes to the imported memories at each decode step, and which memory each
head attends most, on passkey (filler), NIAH in tales and FairytaleQA (dev part, 16k tokens by default).

For every example the context is read into a memory, the question is answered with token-level import
(``kvmap``, the seed's method), and the trace records each forward's shares (:attr:`ImportTrace.keep_shares`).
A memory is "on target" when its token lies inside the needle sentence (passkey, NIAH) or the gold passage
(FairytaleQA). The heads whose most-attended memory is most often on target in passkey and NIAH are the
retrieval heads (``retrieval_heads``, printed as a ``kvmap:heads=...`` method; dev data only). Writes
runs/diagnosis/attention_share.json; ``kvmap report`` draws it.

    python benchmarks/memory_attention_share.py [--length 16000] [--n 3] [--out runs/diagnosis]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

TASKS = {"passkey": ("passkey", {}), "niah": ("niah", {"variant": "single"}), "fairytaleqa": ("fairytaleqa", {})}


def target_tokens(tokenizer, context: str, target: str) -> set[int]:
    """Indices of the context's tokens that overlap the first occurrence of ``target`` (empty if absent)."""
    start = context.find(target)
    if start < 0:
        return set()
    offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    end = start + len(target)
    return {i for i, (a, b) in enumerate(offsets) if a < end and b > start}


def target_text(ex) -> str:
    """The text the answer comes from: the needle sentence (its line in the gold) or the gold passage."""
    if ex.task == "fairytaleqa":
        return ex.gold.split("\n\n")[0]
    return ex.gold.split("\n")[-1]


def diagnose(lm, ex, workdir: Path, max_new_tokens: int) -> dict:
    from kvmap.decoding import greedy
    from kvmap.eval.group import prompt_parts, read_memory
    from kvmap.eval.methods import import_config

    memory, _ = read_memory(lm, workdir / "m", "context", [ex.context])
    on_target = target_tokens(lm.tokenizer, ex.context, target_text(ex))
    before, _ = prompt_parts(lm.tokenizer, ex, False)
    with lm.port.importing(memory, import_config("kvmap")) as trace:
        trace.keep_shares = True
        text = greedy(lm.model, lm.tokenizer, before, max_new_tokens).text
    layers = sorted(trace.shares)
    decode = [[share for share, _ in trace.shares[layer][1:]] for layer in layers]  # forwards after the prompt's
    share = torch.stack([torch.cat(steps, dim=1).mean(1) for steps in decode])  # (L, Hq) mean over decode steps
    per_step = torch.stack([torch.cat(steps, dim=1) for steps in decode]).mean((0, 1))  # (steps,)
    tops = Counter(int(i) for layer in layers for _, top in trace.shares[layer][1:] for i in top.flatten().tolist())
    offsets = memory.offsets(torch.tensor(list(tops))).tolist()
    on = sum(c for (i, c), off in zip(tops.items(), offsets) if off in on_target)
    target = torch.tensor(sorted(on_target) or [-1])
    on_by_head = torch.stack([  # (L, Hq): share of decode steps whose most-attended memory is on target
        torch.isin(memory.offsets(torch.cat([top for _, top in trace.shares[layer][1:]], dim=1)), target).float().mean(1)
        for layer in layers])
    texts = memory.token_texts()
    return {"id": ex.id, "output": text.strip(), "answers": ex.answers, "share_layer_head": share.tolist(),
            "share_per_step": per_step.tolist(), "top_on_target": on / max(1, sum(tops.values())),
            "on_target_layer_head": on_by_head.tolist(),
            "target_tokens": len(on_target),
            "most_attended": [[texts[i], c] for i, c in tops.most_common(12)]}


def retrieval_heads(diagnosis: dict, tasks=("passkey", "niah"), n: int = 16) -> list[tuple[int, int]]:
    """The ``n`` (layer, query head) pairs whose most-attended memory is most often on target, averaged over
    the examples of ``tasks`` (Retrieval-Head style scores; choose them on dev data only)."""
    import numpy as np

    grids = [np.array(r["on_target_layer_head"]) for t in tasks for r in diagnosis["tasks"].get(t, [])]
    mean = np.mean(grids, axis=0)  # (L, Hq)
    best = np.argsort(-mean, axis=None, kind="stable")[:n]
    return sorted((int(i // mean.shape[1]), int(i % mean.shape[1])) for i in best if mean.flat[i] > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=16000)
    parser.add_argument("--n", type=int, default=3, help="examples per task")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", default="runs/diagnosis")
    args = parser.parse_args()

    from kvmap.eval.tasks import make_examples
    from kvmap.models.loading import load_model

    lm = load_model()
    out = {"length": args.length, "n": args.n, "part": "dev", "model": lm.model_id, "tasks": {}}
    began = time.perf_counter()
    for name, (task, options) in TASKS.items():
        examples = make_examples(task, lm.tokenizer, args.length, args.n, **options)
        if task == "fairytaleqa":  # one question from each of n stories (the first question of each group)
            examples = list({ex.group: ex for ex in make_examples(task, lm.tokenizer, args.length, 5 * args.n)}.values())
        rows = []
        for ex in examples[:args.n]:
            with tempfile.TemporaryDirectory(prefix="kvmap-diag-") as work:
                rows.append(diagnose(lm, ex, Path(work), args.max_new_tokens))
            print(f"{name} {ex.id}: memory share {sum(rows[-1]['share_per_step']) / len(rows[-1]['share_per_step']):.2f}, "
                  f"top on target {rows[-1]['top_on_target']:.2f}: {rows[-1]['output'][:60]!r}", flush=True)
        out["tasks"][name] = rows
    out["seconds"] = round(time.perf_counter() - began, 1)
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    out["retrieval_heads"] = retrieval_heads(out)
    (path / "attention_share.json").write_text(json.dumps(out, indent=1))
    from kvmap.config import format_heads

    print(f"wrote {path / 'attention_share.json'} ({out['seconds']:.0f} s); retrieval heads on this dev data: "
          f"kvmap:heads={format_heads(tuple(map(tuple, out['retrieval_heads'])))}")


if __name__ == "__main__":
    main()
