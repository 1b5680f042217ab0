"""The benchmark grid behind RESULTS.md (``make bench``): every task x length x method on the test part,
in slices that each fit in about two hours on a 2-core CPU and commit their run files when done.

A slice is a list of cells (task, options, lengths, n); every cell runs all of :data:`METHODS` on the
same examples through :func:`kvmap.eval.runner.run_eval`, into ``runs/grid/<cell>``. Everything is
resumable: a slice that was stopped continues where its ``predictions.jsonl`` ends, and a finished
one costs nothing to run again. ``timing.jsonl`` records each slice's wall and CPU time, so that
the CPU-hours the grid took are measured, not estimated.

Sizes were chosen from one timed cell (see :data:`ESTIMATE_S_PER_EXAMPLE` and the Makefile): n >= 50
for FairytaleQA and NIAH single at 4k and 16k, n = 30 for NIAH single at 64k, n >= 10 everywhere else.
"""
from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmap.cli.options import comma_ints

METHODS = ("oracle", "none", "full", "truncate", "streaming", "yarn:max_tokens=12000", "rag-bm25", "rag-embed",
           "kvmap", "kvmap-block", "kvmap-splice", "kvmap-splice-bm25")
"""The issue's method list; ``full`` and ``yarn`` are skipped (at no cost) where they do not fit."""


@dataclass(frozen=True)
class Cell:
    """One run folder of the grid: a task (with its options) at some lengths, n examples each."""

    name: str
    task: str
    lengths: tuple[int, ...]
    n: int
    options: dict = field(default_factory=dict)


ESTIMATE_S_PER_EXAMPLE = {4_000: 43, 16_000: 68, 64_000: 140, 128_000: 230}
"""Seconds per example, all methods, by length, on this 2-core CPU. 4k and 16k measured on 2 NIAH single
examples of the test part each (2026-12-01: 43 and 68 s; the second example reused the shared haystack's
prefix); 64k and 128k extrapolated from the reader's ingest (about 600 tok/s fresh) and the kvmap
decode's growth with memory size. FairytaleQA measured at 16k: 30 s per question, the story's ingest
and prefills shared by its 4 questions (:data:`SHARED_CONTEXT_SHARE`)."""
# Measured before kvmap methods kept the recent context by default (:data:`kvmap.eval.methods.KVMAP_RUNNER_OPTIONS`).
# Since then, past the window, each kvmap method prefills its kept context and reads a memory of what lies
# before it (the splice methods a second one, their kept context leaving room for the spliced blocks), so a
# 16k example costs more than the 68 s above: re-time one cell before budgeting the slices still to run
# (runs/grid/timing.jsonl and each row's context_s_per_example and answer_s hold what was measured).
SHARED_CONTEXT_SHARE = 0.45
"""FairytaleQA's cost per question over a NIAH example's at the same length (measured at 16k: 30 / 68)."""

SLICES: dict[str, list[Cell]] = {
    "1-fairytaleqa": [Cell("fairytaleqa", "fairytaleqa", (4_000, 16_000), 52, {"per_story": 4}),
                      Cell("fairytaleqa-64k", "fairytaleqa", (64_000,), 20, {"per_story": 4})],
    "2-niah-single-4k": [Cell("niah-single-4k", "niah", (4_000,), 50, {"variant": "single"})],
    "3-niah-single-16k": [Cell("niah-single-16k", "niah", (16_000,), 50, {"variant": "single"})],
    # 64k with n=30: issue 16 judges NIAH single at 16k and 64k on n >= 30
    "4-niah-single-long": [Cell("niah-single-64k", "niah", (64_000,), 30, {"variant": "single"}),
                           Cell("niah-single-128k", "niah", (128_000,), 10, {"variant": "single"})],
    "5-niah-multikey": [Cell("niah-multikey", "niah", (4_000, 16_000, 64_000), 10, {"variant": "multikey"})],
    "6-babi-qa1": [Cell("babi-qa1", "babi", (4_000, 16_000, 64_000), 10, {"qa": 1})],
    "7-babi-qa2": [Cell("babi-qa2", "babi", (4_000, 16_000, 64_000), 10, {"qa": 2})],
    "8-passkey": [Cell("passkey", "passkey", (4_000, 16_000, 64_000), 10)],
}


def estimate_s(cell: Cell) -> float:
    share = SHARED_CONTEXT_SHARE if cell.task == "fairytaleqa" else 1.0  # 4 questions share a story's context
    return sum(cell.n * ESTIMATE_S_PER_EXAMPLE[x] * share for x in cell.lengths)


def plan() -> list[str]:
    """One line per slice: its cells and its estimated hours; then the total."""
    lines, total = [], 0.0
    for name, cells in SLICES.items():
        s = sum(estimate_s(c) for c in cells)
        total += s
        lines.append(f"{name:20s} {s / 3600:4.1f} h  " + "; ".join(
            f"{c.name} n={c.n} at {','.join(f'{x // 1000}k' for x in c.lengths)}" for c in cells))
    return lines + [f"{'total':20s} {total / 3600:4.1f} h"]


def run_slice(name: str, runs: Path, commit: bool, lm=None, lengths: tuple[int, ...] | None = None) -> dict:
    """Run (or finish) one slice into ``runs/grid``; append its timing; commit its files if asked.

    ``lengths`` runs only those of each cell's lengths (the short ones first, when the time left is short):
    the cell's folder then holds the other lengths later, the resumed run adding them to its config."""
    from kvmap.eval.runner import run_eval
    from kvmap.models.loading import load_model

    lm = lm or load_model()
    began, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    stopped = False
    try:
        for cell in SLICES[name]:
            chosen = [x for x in cell.lengths if lengths is None or x in lengths]
            if chosen:
                run_eval(lm, cell.task, list(METHODS), chosen, cell.n, runs / "grid" / cell.name,
                         task_options={**cell.options, "part": "test"})
    except KeyboardInterrupt:  # Ctrl-C (or SIGINT at a session's end): the rows so far are kept, and so is their cost
        stopped = True
    now = resource.getrusage(resource.RUSAGE_SELF)
    timing = {"slice": name if lengths is None else f"{name}@{','.join(f'{x // 1000}k' for x in lengths)}",
              "wall_s": round(time.perf_counter() - began, 1),
              "cpu_s": round(now.ru_utime + now.ru_stime - cpu.ru_utime - cpu.ru_stime, 1),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if stopped:
        timing["note"] = "stopped before the end; a later run finishes it and adds its own line"
    with open(runs / "grid" / "timing.jsonl", "a") as f:
        f.write(json.dumps(timing) + "\n")
    if stopped:
        raise KeyboardInterrupt
    if commit:
        _commit(name, runs)
    return timing


def _commit(name: str, runs: Path) -> None:
    """Regenerate RESULTS.md and commit the slice's run files with it (nothing else that is staged)."""
    from kvmap.eval.report import build_report

    build_report(runs, Path("RESULTS.md"))
    paths = [str(runs / "grid"), "RESULTS.md", "docs/plots"]
    subprocess.run(["git", "add", "--", *paths], check=True)
    subprocess.run(["git", "commit", "-q", "-m", f"bench grid: slice {name} finished", "--", *paths], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmap.eval.grid", description=__doc__.split("\n")[0])
    parser.add_argument("slices", nargs="*", help=f"slices to run, in order (default: all): {', '.join(SLICES)}")
    parser.add_argument("--runs", default="runs", help="the runs folder (cells go to RUNS/grid/)")
    parser.add_argument("--commit", action="store_true", help="after each slice, regenerate RESULTS.md and git commit")
    parser.add_argument("--plan", action="store_true", help="print the slices and their estimated hours, run nothing")
    parser.add_argument("--lengths", type=comma_ints, help="only these lengths of each slice's cells, e.g. 4k,16k (default: all)")
    args = parser.parse_args(argv)
    # A shell starts a background job with SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # restore it, so that `kill -INT` stops a background slice the way Ctrl-C does (rows and cost kept).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.plan:
        print("\n".join(plan()))
        return 0
    unknown = [s for s in args.slices if s not in SLICES]
    if unknown:
        print(f"grid: error: unknown slice {unknown[0]!r}; choose from {', '.join(SLICES)}", file=sys.stderr)
        return 1
    lengths = tuple(args.lengths) if args.lengths else None
    from kvmap.models.loading import load_model

    lm = load_model()
    for name in args.slices or list(SLICES):
        timing = run_slice(name, Path(args.runs), args.commit, lm, lengths)
        print(f"slice {name}: {timing['wall_s'] / 3600:.2f} h wall, {timing['cpu_s'] / 3600:.2f} CPU-h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
