"""Needles in a very large memory (passkey, NIAH single or multikey), with decode speed and peak RSS
measured side by side.

The haystack is a corpus memory (:mod:`kvmap.eval.corpus`: a million tokens of the passkey filler, or
of the bundled tales) built once. Each trial reads one needle document into it (a short example of
the task, the harness's own: for passkey the task description, filler and the information line; for
NIAH tale sentences with the needle sentence(s); the needle at the trial's depth, spread over 0..1),
asks the question with the memory and without it (same prompt, same process, one after the other),
then forgets the needle again. The needle is the memory's newest source; with memories placed by the
query (``fixed``/``ordered`` placement) and an exact first search, where a memory sits in the folder
does not change what the model sees, so the depth that varies is the needle's within its document.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

NEEDLE_PREFIX = "needle/"


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


SCALE_TASKS = {"passkey": ("passkey", {}), "niah-single": ("niah", {"variant": "single"}),
               "niah-multikey": ("niah", {"variant": "multikey"})}
"""``kvmap bench scale --task`` names -> (harness task, its options)."""


def needle_at_scale(lm, memory_path: str | Path, trials: int, config, needle_tokens: int = 256,
                    seed: int = 0, max_new_tokens: int = 16, log_path=None, progress: bool = True,
                    task: str = "passkey", part: str = "dev") -> dict:
    """Run ``trials`` trials of ``task`` against the memory at ``memory_path`` (see module docstring).

    Returns accuracy with and without memory, median decode ms/token of both and their ratio,
    median prefill seconds, and the process's peak RSS. With ``log_path``, each trial is appended
    to that JSONL file and trials already there are skipped (resumable).
    """
    from tqdm.auto import tqdm

    from kvmap.eval.runfiles import append_jsonl, read_jsonl
    from kvmap.eval.tasks import make_examples
    from kvmap.stores import Memory

    memory = Memory.open(memory_path, expect_model_id=lm.model_id, expect_layout=lm.port.layout, verify=False)
    for source in [s["source"] for s in memory.sources() if s["source"].startswith(NEEDLE_PREFIX)]:
        memory.forget(source)  # left by a killed run
    haystack_tokens = memory.n_tokens
    done = {row["trial"]: row for row in (read_jsonl(log_path) if log_path is not None else [])
            if row["haystack_tokens"] == haystack_tokens and row["seed"] == seed and row.get("config") == config.options()
            and row.get("task", "passkey") == task and row.get("part", "dev") == part}
    rows = list(done.values())
    rss_start = peak_rss_mb()
    name, options = SCALE_TASKS[task]
    needles = make_examples(name, lm.tokenizer, needle_tokens, trials, seed, part=part, **options)
    for i, ex in enumerate(tqdm(needles, desc=f"{task} in {haystack_tokens} tokens", disable=not progress)):
        if i in done:
            continue
        row = _trial(lm, memory, config, i, ex, seed, max_new_tokens, haystack_tokens, task)
        if part != "dev":
            row["part"] = part
        rows.append(row)
        if log_path is not None:
            append_jsonl(log_path, [row])
    result = _summary(lm, rows, memory_path, haystack_tokens, seed, needle_tokens, config, rss_start, task)
    return {**result, "part": part}


def _trial(lm, memory, config, i: int, ex, seed: int, max_new_tokens: int, haystack_tokens: int, task: str) -> dict:
    """One trial: the needle document read in, the question asked with the memory and without, the needle forgotten."""
    from kvmap.eval.scoring import score
    from kvmap.reader import ReaderConfig, read_into
    from kvmap.timing import timed_greedy

    tok, port = lm.tokenizer, lm.port
    source = f"{NEEDLE_PREFIX}{i}"
    read_into(port, tok, memory, source, ex.docs(), ReaderConfig(), progress=False)
    memory_tokens = memory.n_tokens
    try:
        prompt = tok(ex.instruction + "\n" + ex.question, add_special_tokens=False)["input_ids"]
        began = time.perf_counter()
        with_memory = timed_greedy(port, tok, prompt, max_new_tokens, memory, config)
        answer_s = time.perf_counter() - began
        without = timed_greedy(port, tok, prompt, max_new_tokens)
    finally:
        memory.forget(source)
    correct = lambda text: score(ex.scorer, text, ex.answers)["score"] == 1.0  # noqa: E731
    row = {"trial": i, "seed": seed, "depth": ex.depth, "haystack_tokens": haystack_tokens,
           "config": config.options(), "memory_tokens": memory_tokens,
           "kvmap": {"output": with_memory.text, "correct": correct(with_memory.text),
                     "decode_ms": with_memory.decode_ms_per_token, "prefill_s": with_memory.prefill_s,
                     "answer_s": answer_s},
           "none": {"output": without.text, "correct": correct(without.text),
                    "decode_ms": without.decode_ms_per_token, "prefill_s": without.prefill_s}}
    if task == "passkey":
        row["passkey"] = int(ex.answers[0])
    else:
        row.update(task=task, answers=ex.answers)
    return row


def _summary(lm, rows: list[dict], memory_path, haystack_tokens: int, seed: int, needle_tokens: int, config,
             rss_start: float, task: str) -> dict:
    """TASK-scale.json: accuracy with and without memory, median speeds, disk use and peak RSS."""
    from kvmap.fileio import disk_usage
    from kvmap.models.kernel import decode_kernel
    from kvmap.stats import median, wilson

    def acc(method: str) -> dict:
        correct = sum(r[method]["correct"] for r in rows)
        lo, hi = wilson(correct, len(rows))
        return {"accuracy": correct / max(1, len(rows)), "correct": correct, "n": len(rows), "ci95": [lo, hi]}

    decode_memory = median([r["kvmap"]["decode_ms"] for r in rows])
    decode_none = median([r["none"]["decode_ms"] for r in rows])
    return {
        "task": f"{task}-scale", "model": lm.model_id, "memory": str(memory_path), "haystack_tokens": haystack_tokens,
        "trials": len(rows), "seed": seed, "needle_tokens": needle_tokens, "config": config.options(),
        "disk_bytes_per_token": disk_usage(memory_path) / max(1, haystack_tokens),
        "methods": {"kvmap": acc("kvmap"), "none": acc("none")},
        "speed": {"decode_ms_memory": decode_memory, "decode_ms_no_memory": decode_none,
                  "decode_ratio": decode_memory / decode_none,  # ratio of medians, as RESULTS.md shows it
                  "prefill_s_memory": median([r["kvmap"]["prefill_s"] for r in rows]),
                  "prefill_s_no_memory": median([r["none"]["prefill_s"] for r in rows])},
        "decode_path": "fused C kernel" if decode_kernel() is not None else "PyTorch",
        "peak_rss_mb": peak_rss_mb(), "peak_rss_mb_before_trials": rss_start,
        "examples": sorted(rows, key=lambda r: r["trial"]),
    }
