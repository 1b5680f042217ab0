"""Passkey retrieval (Landmark Attention's template): a number hidden in repeated filler text.

Lengths are given in tokens; the filler is cut in characters (as in the template) to reach them.
Trials are spread evenly over depths 0..1, and each example is generated from its seed alone.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from kvmap.data import passkey_template


@dataclass
class PasskeyExample:
    """One passkey trial: the haystack (context), the question, and the answer."""

    context: str
    """Task description + filler with the information line at ``depth``."""
    question: str
    passkey: int
    depth: float
    instruction: str
    """The task description alone (what a memory-backed prompt still shows the model)."""


def make_example(tokenizer, length_tokens: int, depth: float, seed: int) -> PasskeyExample:
    """Build a passkey example whose full prompt is about ``length_tokens`` tokens long."""
    t = passkey_template()
    rng = random.Random(seed)
    passkey = rng.randint(1, 50000)
    garbage = t["garbage_sentence"]
    tokens_per_char = len(tokenizer(garbage, add_special_tokens=False)["input_ids"]) / len(garbage)
    info = t["information_line"].format(pass_key=passkey)
    fixed = len(tokenizer("\n".join([t["task_description"], info, t["final_question"]]),
                          add_special_tokens=False)["input_ids"])
    n_garbage = max(0, int((length_tokens - fixed) / tokens_per_char))
    # Repeat enough filler, then cut prefix/suffix in characters as the template does.
    garbage_inf = " ".join([garbage] * (n_garbage // len(garbage) + 2))
    n_prefix = int(round(depth * n_garbage))
    prefix, suffix = garbage_inf[:n_prefix], garbage_inf[:n_garbage - n_prefix]
    context = "\n".join([t["task_description"], prefix, info, suffix])
    return PasskeyExample(context, t["final_question"], passkey, depth, t["task_description"])


def depths(trials: int) -> list[float]:
    """``trials`` depths spread evenly over [0, 1]."""
    return [i / max(1, trials - 1) for i in range(trials)]


def score(generated: str, passkey: int) -> bool:
    """The template's rule: the first integer in the generated text equals the passkey."""
    found = re.search(r"\d+", generated)
    return bool(found) and int(found.group()) == passkey


# --------------------------------------------------------------------------------------------
# Running the task: every method on the same examples, side by side.

METHODS = ("kvmap", "kvmap-fixed", "truncate", "full", "none")
"""``kvmap``: memories imported with the given ImportConfig (default: ordered placement);
``kvmap-fixed``: the same memory, every memory at position 0 (the seed's placement);
``kvmap:KEY=VALUE[:KEY=VALUE...]``: the same memory with ImportConfig fields changed, e.g.
``kvmap:distance=64:top_k=32`` (every kvmap variant of a trial shares one read)."""


def check_methods(methods: list[str]) -> None:
    """Raise InputError naming any method that is neither in METHODS nor a valid kvmap variant."""
    from kvmap.errors import InputError
    from kvmap.ports import ImportConfig

    for method in methods:
        if method in METHODS:
            continue
        if method.startswith("kvmap:"):
            try:
                kvmap_variant(method, ImportConfig())
                continue
            except (ValueError, TypeError) as err:
                raise InputError(f"bad kvmap variant '{method}' ({err}); write e.g. kvmap:distance=64:top_k=32") from None
        raise InputError(f"unknown passkey method '{method}'; choose from {', '.join(METHODS)} or kvmap:KEY=VALUE")
    if not methods:
        raise InputError(f"no method given; choose from {', '.join(METHODS)}")


def kvmap_variant(method: str, config):
    """The ImportConfig a kvmap method name asks for (see METHODS)."""
    from kvmap.ports import OPTION_NAMES

    if method == "kvmap":
        return config
    if method == "kvmap-fixed":
        return config.with_options(placement="fixed")
    changes = {}
    for option in method.split(":")[1:]:
        key, _, value = option.partition("=")
        if key not in OPTION_NAMES or key in ("layers", "fixed_blocks"):
            raise ValueError(f"no ImportConfig option '{key}'")
        changes[key] = value if key == "placement" else int(value)
    return config.with_options(**changes)


def _timed_plain_prefill(model, ids: list[int]) -> float:
    """Tokens/s of one plain forward pass (no port, default attention) over ``ids``."""
    import time

    import torch

    with torch.no_grad():
        began = time.perf_counter()
        model(torch.tensor(ids)[None], use_cache=False)
    return len(ids) / (time.perf_counter() - began)


def run_passkey(lm, length: int, trials: int, methods: list[str], config=None, reader_config=None,
                store: str = "exact", seed: int = 0, max_new_tokens: int = 10, workdir=None,
                progress: bool = True, log_path=None, reuse_chunks: bool = True) -> dict:
    """Evaluate ``methods`` on ``trials`` passkey examples of ``length`` tokens (depths spread 0..1).

    Returns a dict with per-method accuracy (+ 95% Wilson CI), the speed figures measured in the same
    run (kvmap ingest tokens/s, plain prefill tokens/s, decode ms/token with and without memory) and
    every example's prediction. With ``log_path``, each finished trial is appended to that JSONL
    file at once, and trials already there (same length, seed and methods) are not run again.
    With ``reuse_chunks``, haystack chunks whose whole token prefix equals an earlier trial's (the
    filler before the needle) reuse that trial's K/V (see :class:`kvmap.reader.ChunkCache`): the
    memories are those a fresh read makes, and ingest speed is reported from fresh reads only.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from tqdm.auto import tqdm

    from kvmap.eval.stats import median, wilson
    from kvmap.ports import ImportConfig
    from kvmap.reader import ChunkCache, ReaderConfig, read_into
    from kvmap.stores import Memory
    from kvmap.timing import timed_greedy

    check_methods(methods)
    config = config or ImportConfig()
    reader_config = reader_config or ReaderConfig()
    tok = lm.tokenizer
    port = lm.port
    window = lm.model.config.max_position_embeddings - max_new_tokens
    speed_keys = ("ingest_tok_s", "decode_ms_memory", "decode_ms_no_memory", "truncate_prefill_tok_s")
    speed = {k: [] for k in speed_keys}
    done = _load_log(log_path, length, seed, methods)
    rows = list(done.values())
    for row in rows:
        for k in speed_keys:
            if k in row.get("speed", {}):
                speed[k].append(row["speed"][k])
    chunk_cache = ChunkCache() if reuse_chunks else None
    root = Path(tempfile.mkdtemp(prefix="kvmap-passkey-", dir=workdir))
    try:
        for i, depth in enumerate(tqdm(depths(trials), desc=f"passkey {length} tokens", disable=not progress)):
            if i in done:
                continue
            ex = make_example(tok, length, depth, seed=seed * 100003 + i)
            q_ids = tok("\n" + ex.question, add_special_tokens=False)["input_ids"]
            ctx_ids = tok(ex.context, add_special_tokens=False)["input_ids"]
            memory = None
            row = {"trial": i, "seed": seed, "length": length, "depth": depth, "passkey": ex.passkey,
                   "context_tokens": len(ctx_ids), "methods": methods, "speed": {}}
            for method in methods:
                if method.startswith("kvmap"):
                    if memory is None:  # one read serves every kvmap variant
                        memory = Memory.create(root / f"m{i}", lm.model_id, port.layout, store=store)
                        reused_before = chunk_cache.reused_tokens if chunk_cache else 0
                        stats = read_into(port, tok, memory, "passkey", [ex.context], reader_config,
                                          progress=False, chunk_cache=chunk_cache)
                        reused = (chunk_cache.reused_tokens if chunk_cache else 0) - reused_before
                        row["reused_tokens"] = reused
                        if reused == 0:  # a fresh read: its speed is the ingest speed
                            row["speed"]["ingest_tok_s"] = stats.tokens_per_s
                    prompt = tok(ex.instruction, add_special_tokens=False)["input_ids"] + q_ids
                    variant = kvmap_variant(method, config)
                    gen = timed_greedy(port, tok, prompt, max_new_tokens, memory, variant)
                    if method == "kvmap":
                        base = timed_greedy(port, tok, prompt, max_new_tokens)  # same prompt, no memory
                        row["speed"].update(decode_ms_memory=gen.decode_ms_per_token,
                                            decode_ms_no_memory=base.decode_ms_per_token)
                elif method == "truncate":
                    gen = timed_greedy(port, tok, (ctx_ids + q_ids)[-window:], max_new_tokens)
                    row["speed"]["truncate_prefill_tok_s"] = gen.prefill_tokens_per_s
                elif method == "full":
                    if len(ctx_ids) + len(q_ids) > window:
                        row[method] = {"skipped": f"{len(ctx_ids) + len(q_ids)} tokens exceed the {window}-token window"}
                        continue
                    gen = timed_greedy(port, tok, ctx_ids + q_ids, max_new_tokens)
                else:  # none: the question and the instruction only
                    gen = timed_greedy(port, tok, tok(ex.instruction, add_special_tokens=False)["input_ids"] + q_ids,
                                       max_new_tokens)
                row[method] = {"output": gen.text, "correct": score(gen.text, ex.passkey)}
            if memory is not None:
                shutil.rmtree(memory.path)
            rows.append(row)
            for k, v in row["speed"].items():
                speed[k].append(v)
            if log_path is not None:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    summary = summarize(rows, methods)
    if "kvmap" in methods and rows:
        sample = tok(make_example(tok, length, 0.5, seed).context, add_special_tokens=False)["input_ids"]
        speed["plain_prefill_tok_s"] = [_timed_plain_prefill(lm.model, sample[:reader_config.chunk_size * 2])]
    return {
        "task": "passkey", "model": lm.model_id, "length": length, "trials": trials, "seed": seed,
        "settings": {"top_k": config.top_k, "distance": config.distance, "layers": config.layers,
                     "placement": config.placement,
                     "store": store, "chunk_size": reader_config.chunk_size, "context": reader_config.context,
                     "sinks": reader_config.sinks, "window": window, "reuse_chunks": reuse_chunks,
                     "reused_token_share": sum(r.get("reused_tokens", 0) for r in rows)
                     / max(1, sum(r["context_tokens"] for r in rows))},
        "methods": summary,
        "speed": {k: median(v) for k, v in speed.items() if v},
        "examples": sorted(rows, key=lambda r: r["trial"]),
    }


def summarize(rows: list[dict], methods: list[str]) -> dict:
    """Per-method accuracy with its 95% Wilson interval over trial rows (as logged)."""
    from kvmap.eval.stats import wilson

    summary = {}
    for method in methods:
        done = [r[method] for r in rows if "correct" in r.get(method, {})]
        correct = sum(r["correct"] for r in done)
        if done:
            lo, hi = wilson(correct, len(done))
            summary[method] = {"accuracy": correct / len(done), "correct": correct, "n": len(done), "ci95": [lo, hi]}
        else:
            summary[method] = {"accuracy": None, "n": 0, "skipped": rows[0][method]["skipped"] if rows else "no trials"}
    return summary


def summarize_log(log_path) -> list[dict]:
    """Results of a run folder's predictions.jsonl (e.g. a run still going or stopped), per length."""
    from kvmap.eval.stats import median

    rows = [json.loads(line) for line in open(log_path, encoding="utf-8") if line.strip().endswith("}")]
    out = []
    for length in sorted({r["length"] for r in rows}):
        mine = [r for r in rows if r["length"] == length]
        methods = mine[0]["methods"]
        speed_keys = sorted({k for r in mine for k in r.get("speed", {})})
        out.append({"task": "passkey", "model": None, "length": length, "trials": len(mine), "partial": True,
                    "settings": {}, "methods": summarize(mine, methods),
                    "speed": {k: median([r["speed"][k] for r in mine if k in r["speed"]]) for k in speed_keys}})
    return out


def _load_log(log_path, length: int, seed: int, methods: list[str]) -> dict[int, dict]:
    """Trials already logged for this length/seed/methods: trial index -> row."""
    import os

    done: dict[int, dict] = {}
    if log_path is None or not os.path.exists(log_path):
        return done
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that trial runs again
                continue
            if row.get("length") == length and row.get("seed") == seed and row.get("methods") == methods:
                done[row["trial"]] = row
    return done
