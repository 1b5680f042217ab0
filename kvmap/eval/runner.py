"""Run a task x methods x lengths grid into a run folder; resumable, every method on the same examples.

A run folder holds ``config.yaml`` (what was asked), ``predictions.jsonl`` (one line per example
and method, appended as soon as it is done) and ``metrics.json`` (rebuilt from the predictions
after every group). Re-running the same command skips what ``predictions.jsonl`` already has.
"""
from __future__ import annotations

import resource
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from kvmap.errors import InputError
from kvmap.eval.group import GroupRunner
from kvmap.eval.methods import check_methods, uses_adapter
from kvmap.eval.runfiles import append_jsonl, read_jsonl
from kvmap.eval.scoring import score
from kvmap.eval.tasks import make_examples
from kvmap.stats import mean_ci, median, wilson

MAX_NEW_TOKENS = {"passkey": 10, "niah": 40, "fairytaleqa": 32, "babi": 24}


def _rss_mb() -> float:
    """Resident memory of this process now (MB)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # not Linux: the peak so far is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_eval(lm, task: str, methods: list[str], lengths: list[int], limit: int, out: str | Path,
             seed: int = 0, task_options: dict | None = None, store: str = "exact", reader_config=None,
             max_new_tokens: int | None = None, progress: bool = True) -> dict:
    """Evaluate ``methods`` on ``limit`` examples of ``task`` at each length; returns metrics.json's dict."""
    import yaml
    from tqdm.auto import tqdm

    from kvmap.reader import ChunkCache

    check_methods(methods)
    if limit < 1:
        raise InputError("--limit must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task_options = task_options or {}
    max_new = max_new_tokens or MAX_NEW_TOKENS[task]
    config = {"task": task, "model": lm.model_id, "methods": methods, "lengths": lengths, "limit": limit,
              "seed": seed, "task_options": task_options, "store": store, "max_new_tokens": max_new}
    if getattr(lm, "adapter", None):  # the memory adapter the kvmap methods import with (not written when none)
        config["adapter"] = lm.adapter
    tuned = [m for m in methods if uses_adapter(m)]
    if tuned and not getattr(lm, "adapter", None):
        raise InputError(f"method {tuned[0]} imports with a memory adapter; load one with --adapter DIR "
                         "(`kvmap finetune` writes it)")
    if (out / "config.yaml").exists():
        old = yaml.safe_load((out / "config.yaml").read_text())
        for key in ("task", "model", "seed", "task_options"):
            if old.get(key) != config.get(key):
                raise InputError(f"{out} holds a run with {key}={old.get(key)!r}, not {config.get(key)!r}; "
                                 f"use another --out folder")
        # only adapter=1 rows depend on the adapter: a run without one may get one, never another one
        if old.get("adapter") and config.get("adapter") and old["adapter"] != config["adapter"]:
            raise InputError(f"{out} holds a run with adapter={old['adapter']!r}, not {config['adapter']!r}; "
                             "use another --out folder")
        if old.get("adapter"):
            config["adapter"] = old["adapter"]
        config["methods"] = list(dict.fromkeys(old["methods"] + methods))
        config["lengths"] = sorted(set(old["lengths"]) | set(lengths))
        config["limit"] = max(old["limit"], limit)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    log = out / "predictions.jsonl"
    done = {(r["id"], r["method"]) for r in read_jsonl(log)}
    chunk_cache = ChunkCache()
    work = Path(tempfile.mkdtemp(prefix="kvmap-eval-"))
    try:
        for length in lengths:
            examples = make_examples(task, lm.tokenizer, length, limit, seed, **task_options)
            groups: dict[str, list] = defaultdict(list)
            for ex in examples:
                groups[ex.group].append(ex)
            bar = tqdm(total=len(examples) * len(methods), desc=f"{task} {length} tokens", disable=not progress,
                       initial=sum((ex.id, m) in done for ex in examples for m in methods))
            for group in groups.values():
                todo = [m for m in methods if any((ex.id, m) not in done for ex in group)]
                if not todo:
                    continue
                runner = GroupRunner(lm, group, work, reader_config, chunk_cache, store, max_new)
                try:
                    for method in todo:
                        answers = runner.answer(method)
                        rows = [_row(ex, method, a, runner) for ex, a in zip(group, answers) if (ex.id, method) not in done]
                        append_jsonl(log, rows)
                        done |= {(r["id"], method) for r in rows}
                        bar.update(len(rows))
                finally:
                    runner.close()
                write_metrics(out)
            bar.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_metrics(out)


def _row(ex, method: str, answer, runner: GroupRunner) -> dict:
    row = {"id": ex.id, "group": ex.group, "task": ex.task, "length": ex.length, "depth": ex.depth,
           "method": method, "question": ex.question, "answers": ex.answers, "meta": ex.meta}
    if isinstance(answer, str):
        return {**row, "skipped": answer}
    extra = dict(answer.extra)
    context_s = extra.pop("context_s", 0.0)  # a prefill of the shared context
    if method.startswith(("kvmap", "streaming")) and runner.ingest:
        row["ingest"] = runner.ingest
        # kvmap's context cost is its ingest, as measured (less where chunks of a shared haystack were reused),
        # plus the shared prefill of the recent context it keeps in the prompt, if any
        context_s = runner.ingest["seconds"] + context_s
    row.update(output=answer.text, **score(ex.scorer, answer.text, ex.answers), answer_s=answer.seconds,
               context_s_per_example=None if context_s is None else context_s / runner.group_size,
               decode_ms_per_token=answer.decode_ms_per_token, prompt_tokens=answer.prefill_tokens,
               rss_mb=_rss_mb(), context_tokens=len(runner.context_ids), **extra)
    return row


def summarize(rows: list[dict]) -> dict:
    """Per length and method: n, score (+95% CI), contains rate, latency, decode speed, ingest, RSS."""
    cells: dict = defaultdict(list)
    for r in rows:
        cells[(r["length"], r["method"])].append(r)
    out: dict = {}
    for (length, method), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        ran = [r for r in rs if "score" in r]
        cell: dict = {"n": len(ran)}
        if not ran:
            cell["skipped"] = rs[0].get("skipped", "")
        else:
            scores = [r["score"] for r in ran]
            cell["score"] = sum(scores) / len(scores)
            if all(s in (0.0, 1.0) for s in scores):
                cell["ci95"] = list(wilson(int(sum(scores)), len(scores)))
            else:
                cell["ci95"] = list(mean_ci(scores))
            if "contains" in ran[0]:
                hits = int(sum(r["contains"] for r in ran))
                cell["contains"] = hits / len(ran)
                cell["contains_ci95"] = list(wilson(hits, len(ran)))
            answer_s = [r["answer_s"] for r in ran if "answer_s" in r]
            if answer_s:  # from the question on; the context's cost is the next column
                cell["answer_s_median"] = median(answer_s)
            context_s = [r["context_s_per_example"] for r in ran if r.get("context_s_per_example") is not None]
            if context_s:  # ingest or prefill of the context, divided over the questions that share it
                cell["context_s_per_example_median"] = median(context_s)
            old = [r["seconds"] for r in ran if "seconds" in r]
            if old:  # rows written before the two columns: shared prefills charged to every question
                cell["latency_s_median"] = median(old)
            cell["decode_ms_per_token"] = median([r["decode_ms_per_token"] for r in ran])
            ingest = [r["ingest"]["ingest_tok_s"] for r in ran if "ingest_tok_s" in r.get("ingest", {})]
            if ingest:
                cell["ingest_tok_s"] = median(ingest)
            disk = [r["ingest"]["disk_bytes_per_token"] for r in ran if "disk_bytes_per_token" in r.get("ingest", {})]
            if disk:
                cell["disk_bytes_per_token"] = median(disk)
            cell["peak_rss_mb"] = max(r["rss_mb"] for r in ran)
            retrieved = [r["retrieved_answer"] for r in ran if "retrieved_answer" in r]
            if retrieved:  # did the retrieved text / blocks hold a reference answer at all?
                cell["retrieved_answer"] = sum(retrieved) / len(retrieved)
            cell["context_tokens_median"] = median([r["context_tokens"] for r in ran])
        out.setdefault(str(length), {})[method] = cell
    return out


def write_metrics(out: Path) -> dict:
    """Rebuild ``metrics.json`` from ``predictions.jsonl`` (atomically) and return it."""
    import yaml

    from kvmap.fileio import write_json_atomic

    out = Path(out)
    config = yaml.safe_load((out / "config.yaml").read_text())
    metrics = {"task": config["task"], "model": config["model"], "config": config,
               "metrics": summarize(read_jsonl(out / "predictions.jsonl"))}
    write_json_atomic(out / "metrics.json", metrics, indent=1)
    return metrics
