"""Passkey retrieval (Landmark Attention's template): a number hidden in repeated filler text.

Lengths are given in tokens; the filler is cut in characters (as in the template) to reach them.
Trials are spread evenly over depths 0..1, and each example is generated from its seed alone.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from kvmap.data import passkey_template
from kvmap.errors import InputError


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
# Running the task: every method on the same examples, side by side (``kvmap eval passkey``; the
# generic harness, :mod:`kvmap.eval.runner`, runs the same examples as its ``passkey`` task).

METHODS = ("kvmap", "kvmap-fixed", "truncate", "full", "none")
"""``kvmap``: memories imported with the given ImportConfig (default: ordered placement);
``kvmap-fixed``: the same memory, every memory at position 0 (the seed's placement);
``kvmap:KEY=VALUE[:KEY=VALUE...]``: the same memory with ImportConfig options changed, e.g.
``kvmap:distance=64:top_k=32`` (parsed as :func:`kvmap.eval.methods.parse_method` does; every kvmap
variant of a trial shares one read)."""
SPEED_KEYS = ("ingest_tok_s", "decode_ms_memory", "decode_ms_no_memory", "truncate_prefill_tok_s")
"""Per-trial speed figures (a trial row's ``speed``); the result's ``speed`` holds their medians."""


def check_methods(methods: list[str]) -> None:
    """Raise InputError naming any method that is neither in METHODS nor a valid kvmap variant."""
    from kvmap.eval.methods import check_methods as check_harness_methods

    if not methods:
        raise InputError(f"no method given; choose from {', '.join(METHODS)}")
    for method in methods:
        base = method.split(":")[0]
        if base not in METHODS or (method != base and not base.startswith("kvmap")):
            raise InputError(f"unknown passkey method '{method}'; choose from {', '.join(METHODS)} or kvmap:KEY=VALUE")
    check_harness_methods(methods)  # InputError naming a bad option or value


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

    from kvmap.eval.runfiles import append_jsonl
    from kvmap.ports import ImportConfig
    from kvmap.reader import ChunkCache, ReaderConfig

    check_methods(methods)
    config = config or ImportConfig()
    reader_config = reader_config or ReaderConfig()
    window = lm.model.config.max_position_embeddings - max_new_tokens
    trial = _Trial(lm, methods, config, reader_config, store, max_new_tokens, window,
                   ChunkCache() if reuse_chunks else None)
    done = _load_log(log_path, length, seed, methods)
    rows = list(done.values())
    root = Path(tempfile.mkdtemp(prefix="kvmap-passkey-", dir=workdir))
    try:
        for i, depth in enumerate(tqdm(depths(trials), desc=f"passkey {length} tokens", disable=not progress)):
            if i in done:
                continue
            row = trial.run(i, length, depth, seed, root / f"m{i}")
            rows.append(row)
            if log_path is not None:
                append_jsonl(log_path, [row])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return _result(lm, rows, length, trials, seed, methods, config, reader_config, store, window, reuse_chunks)


class _Trial:
    """Runs every method on one passkey example; the kvmap variants share one read of its context."""

    def __init__(self, lm, methods, config, reader_config, store, max_new_tokens, window, chunk_cache):
        self.lm, self.tok, self.port = lm, lm.tokenizer, lm.port
        self.methods, self.config, self.reader_config, self.store = methods, config, reader_config, store
        self.max_new_tokens, self.window, self.chunk_cache = max_new_tokens, window, chunk_cache

    def _enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def run(self, i: int, length: int, depth: float, seed: int, memory_path) -> dict:
        """The trial's row: its example, each method's output and correctness, its speed figures."""
        import shutil

        ex = make_example(self.tok, length, depth, seed=seed * 100003 + i)
        q_ids, ctx_ids = self._enc("\n" + ex.question), self._enc(ex.context)
        row = {"trial": i, "seed": seed, "length": length, "depth": depth, "passkey": ex.passkey,
               "context_tokens": len(ctx_ids), "methods": self.methods, "speed": {}}
        memory = None
        try:
            for method in self.methods:
                if method.startswith("kvmap"):
                    if memory is None:  # one read serves every kvmap variant
                        memory = self._read(ex.context, memory_path, row)
                    gen = self._kvmap(method, memory, self._enc(ex.instruction) + q_ids, row)
                elif method == "truncate":
                    gen = self._greedy((ctx_ids + q_ids)[-self.window:])
                    row["speed"]["truncate_prefill_tok_s"] = gen.prefill_tokens_per_s
                elif method == "full":
                    if len(ctx_ids) + len(q_ids) > self.window:
                        row[method] = {"skipped": f"{len(ctx_ids) + len(q_ids)} tokens exceed the "
                                                  f"{self.window}-token window"}
                        continue
                    gen = self._greedy(ctx_ids + q_ids)
                else:  # none: the question and the instruction only
                    gen = self._greedy(self._enc(ex.instruction) + q_ids)
                row[method] = {"output": gen.text, "correct": score(gen.text, ex.passkey)}
        finally:
            if memory is not None:
                shutil.rmtree(memory.path)
        return row

    def _greedy(self, ids: list[int], memory=None, config=None):
        from kvmap.timing import timed_greedy

        return timed_greedy(self.port, self.tok, ids, self.max_new_tokens, memory, config)

    def _read(self, context: str, path, row: dict):
        """The example's context read into a new memory; reuse and (fresh reads only) ingest speed go into ``row``."""
        from kvmap.eval.methods import read_memory

        memory, ingest = read_memory(self.lm, path, "passkey", [context], self.store, self.reader_config,
                                     self.chunk_cache)
        row["reused_tokens"] = ingest["reused_tokens"]
        if "ingest_tok_s" in ingest:
            row["speed"]["ingest_tok_s"] = ingest["ingest_tok_s"]
        return memory

    def _kvmap(self, method: str, memory, prompt: list[int], row: dict):
        """A kvmap variant's answer; plain ``kvmap`` also times the same prompt without memory."""
        from kvmap.eval.methods import import_config

        gen = self._greedy(prompt, memory, import_config(method, self.config))
        if method == "kvmap":
            base = self._greedy(prompt)  # same prompt, no memory
            row["speed"].update(decode_ms_memory=gen.decode_ms_per_token, decode_ms_no_memory=base.decode_ms_per_token)
        return gen


def _result(lm, rows, length, trials, seed, methods, config, reader_config, store, window, reuse_chunks) -> dict:
    """passkey.json's entry for one length: settings, per-method accuracy, median speed, every trial."""
    from kvmap.stats import median

    speed = {k: [r["speed"][k] for r in rows if k in r.get("speed", {})] for k in SPEED_KEYS}
    if "kvmap" in methods and rows:
        sample = lm.tokenizer(make_example(lm.tokenizer, length, 0.5, seed).context, add_special_tokens=False)["input_ids"]
        speed["plain_prefill_tok_s"] = [_timed_plain_prefill(lm.model, sample[:reader_config.chunk_size * 2])]
    return {
        "task": "passkey", "model": lm.model_id, "length": length, "trials": trials, "seed": seed,
        "settings": {"top_k": config.top_k, "distance": config.distance, "layers": config.layers,
                     "placement": config.placement,
                     "store": store, "chunk_size": reader_config.chunk_size, "context": reader_config.context,
                     "sinks": reader_config.sinks, "window": window, "reuse_chunks": reuse_chunks,
                     "reused_token_share": sum(r.get("reused_tokens", 0) for r in rows)
                     / max(1, sum(r["context_tokens"] for r in rows))},
        "methods": summarize(rows, methods),
        "speed": {k: median(v) for k, v in speed.items() if v},
        "examples": sorted(rows, key=lambda r: r["trial"]),
    }


def summarize(rows: list[dict], methods: list[str]) -> dict:
    """Per-method accuracy with its 95% Wilson interval over trial rows (as logged)."""
    from kvmap.stats import wilson

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
    from kvmap.eval.runfiles import read_jsonl
    from kvmap.stats import median

    rows = read_jsonl(log_path)
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
    from kvmap.eval.runfiles import read_jsonl

    if log_path is None:
        return {}
    return {row["trial"]: row for row in read_jsonl(log_path)
            if row.get("length") == length and row.get("seed") == seed and row.get("methods") == methods}
