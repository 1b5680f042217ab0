"""``kvmap eval``, ``kvmap bench scale`` and ``kvmap report``: measurements into run folders.

The command line finds these commands through the ``kvmap.commands`` entry point that this package
declares in pyproject.toml (:data:`kvmap.cli.COMMAND_PLUGINS`), so the command line's core and the
library never import the experiments.
"""
from __future__ import annotations

import json

from kvmap.cli import checks
from kvmap.cli.memory_commands import load
from kvmap.cli.options import add_block_options, add_import_options, at_least, comma_ints, import_config, store_choices
from kvmap.errors import KVMapError
from kvmap.fileio import write_json_atomic


def cmd_eval(args) -> int:
    """Any task through the generic runner: run folder with config.yaml, predictions.jsonl, metrics.json."""
    from kvmap.eval.methods import check_methods
    from kvmap.eval.runner import run_eval

    methods = [m for m in args.methods.split(",") if m]
    check_methods(methods)  # before the model loads
    at_least("--limit", args.limit, 1)
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    task = "passkey" if args.task == "passkey-grid" else args.task  # the old name still works
    options = {"passkey": {}, "niah": {"variant": getattr(args, "variant", None)},
               "fairytaleqa": {"data": getattr(args, "data", None), "split": getattr(args, "split", None),
                               "per_story": getattr(args, "per_story", None)},
               "babi": {"qa": getattr(args, "qa", None)}}[task]
    options = {k: v for k, v in options.items() if v is not None}
    if args.part == "test":  # a run without a part is dev (every run before the split was)
        options["part"] = "test"
    if task == "fairytaleqa":  # a bad --data file fails here, before the model loads
        from kvmap.data import fairytaleqa

        fairytaleqa(options.get("split", "val"), path=options.get("data"))
    lm = load(args.model, args.adapter)
    metrics = run_eval(lm, task, methods, args.lengths, args.limit, args.out, seed=args.seed,
                       task_options=options, store=args.store, max_new_tokens=args.max_new_tokens,
                       progress=not args.json)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{task}, model {metrics['model']}, run folder {args.out}")
    for length, cells in metrics["metrics"].items():
        print(f"  {length} tokens")
        for method, c in cells.items():
            if c["n"]:
                extra = f", contains {c['contains']:.0%}" if "contains" in c else ""
                print(f"    {method:24s} score {c['score']:6.1%}  (n={c['n']}, 95% CI {c['ci95'][0]:.0%}-{c['ci95'][1]:.0%}"
                      f"{extra}, {c.get('answer_s_median', c.get('latency_s_median', 0)):.1f} s/answer)")
            else:
                print(f"    {method:24s} skipped: {c['skipped']}")
    return 0


def cmd_bench_scale(args) -> int:
    """Build a corpus memory of --tokens tokens (resumable), then run --task trials against it."""
    import time
    from pathlib import Path

    from kvmap.eval.corpus import build_corpus_memory
    from kvmap.eval.scale import needle_at_scale
    from kvmap.models.loading import cache_dir
    from kvmap.presets import PRESETS

    config = import_config(args, base=PRESETS["scale-1m"])  # bad options fail before the model loads
    at_least("--trials", args.trials, 1)
    tokens = args.tokens[0]
    at_least("--tokens", tokens, 1)
    name = f"{tokens // 1_000_000}m" if tokens % 1_000_000 == 0 else f"{tokens // 1000}k"
    memory = (checks.memory_folder(args.memory, create=True) if args.memory
              else cache_dir() / "scale" / f"{args.corpus}-{name}")
    out = Path(args.out or f"runs/scale/{args.corpus}-{name}")
    out.mkdir(parents=True, exist_ok=True)
    lm = load(args.model)
    build = build_corpus_memory(lm, memory, tokens, corpus=args.corpus, progress=not args.quiet)
    build["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if build["parts_read"]:
        with open(out / "build.jsonl", "a", encoding="utf-8") as f:  # one line per (resumed) build call
            f.write(json.dumps(build) + "\n")
    print(f"memory {memory}: {build['n_tokens']} tokens in {build['n_segments']} segments"
          + (f"; read {build['tokens_read']} tokens at {build['ingest_tok_s']:.0f} tok/s" if build["parts_read"] else ""))
    if args.build_only:
        return 0
    stem = "" if args.task == "passkey" and args.part == "dev" else f"{args.task}-{args.part}-"
    result = needle_at_scale(lm, memory, args.trials, config, seed=args.seed, log_path=out / f"{stem}trials.jsonl",
                             progress=not args.quiet, task=args.task, part=args.part)
    result["built_in_this_process"] = bool(build["parts_read"])  # then peak RSS includes the build
    result["corpus"] = args.corpus
    result_path = out / f"{stem or 'passkey-'}scale.json"
    write_json_atomic(result_path, result, indent=1)
    sp = result["speed"]
    print(f"{args.task} in {result['haystack_tokens']} tokens of {args.corpus}: kvmap {result['methods']['kvmap']['correct']}"
          f"/{result['trials']}, none {result['methods']['none']['correct']}/{result['trials']}; decode "
          f"{sp['decode_ms_memory']:.0f} vs {sp['decode_ms_no_memory']:.0f} ms/token ({sp['decode_ratio']:.2f}x); "
          f"first forward {sp['prefill_s_memory']:.1f} s; peak RSS {result['peak_rss_mb'] / 1024:.2f} GiB; "
          f"{result['disk_bytes_per_token'] / 1024:.1f} KiB/token on disk; wrote {result_path}")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from kvmap.eval.report import build_report

    runs = Path(args.runs)
    if not runs.is_dir():
        raise KVMapError(f"{runs}: no such runs folder; run `kvmap eval passkey --out {runs}/NAME` first")
    build_report(runs, Path(args.output))
    print(f"wrote {args.output}")
    return 0


def _add_generic(esub, name: str, help: str, lengths: str, methods: str = "oracle,none,truncate,rag-bm25,kvmap",
                 aliases: tuple[str, ...] = ()):
    from kvmap.eval.methods import METHODS

    g = esub.add_parser(name, help=help, aliases=list(aliases))
    g.add_argument("--methods", default=methods,
                   help=f"comma list of {','.join(METHODS)}; options as NAME:KEY=VALUE, e.g. kvmap:distance=64")
    g.add_argument("--lengths", "--length", type=comma_ints, default=comma_ints(lengths), help=f"context lengths in tokens (default {lengths})")
    g.add_argument("--limit", "--trials", type=int, default=50, help="examples per length")
    g.add_argument("--out", required=True, help="run folder (config.yaml, predictions.jsonl, metrics.json); resumable")
    g.add_argument("--model")
    g.add_argument("--adapter", help="a memory adapter folder (`kvmap finetune`): active in the kvmap methods' "
                                     "imports (kvmap:adapter=0 imports without it in the same run); other methods "
                                     "never import, so they are unchanged")
    g.add_argument("--store", default="exact", choices=store_choices())
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--part", choices=["dev", "test"], default="dev",
                   help="dev: where variants and defaults are chosen (default); test: reported once, chosen on never")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_eval)
    return g


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="evaluation tasks")
    esub = e.add_subparsers(dest="task", required=True)
    _add_generic(esub, "passkey", "passkey retrieval (Landmark Attention template), every method on the same trials",
                 "16k", methods="none,truncate,kvmap", aliases=("passkey-grid",))
    _add_generic(esub, "niah", "RULER-style needles in a haystack of tales", "4k,16k").add_argument(
        "--variant", choices=["single", "multikey", "multivalue", "multiquery"], default="single")
    fq = _add_generic(esub, "fairytaleqa", "FairytaleQA story + distractor tales, then a question", "0,4k,16k")
    fq.add_argument("--data", help="a FairytaleQA-format jsonl file (default: the shipped val split)")
    fq.add_argument("--split", choices=["val", "train"])
    fq.add_argument("--per-story", type=int, help="questions per story (default 5)")
    _add_generic(esub, "babi", "bAbI facts spread through tales (BABILong style)", "4k,16k").add_argument(
        "--qa", type=int, choices=[1, 2, 3], default=1)


def _add_bench(sub) -> None:
    from kvmap.presets import PRESETS

    bn = sub.add_parser("bench", help="long benchmarks")
    bnsub = bn.add_subparsers(dest="bench_command", required=True)
    sc = bnsub.add_parser("scale", help="passkey from a very large memory: build it (resumable), then ask with "
                                        "memory and without, side by side (import settings: preset 'scale-1m')")
    sc.add_argument("--tokens", type=comma_ints, default=[1_000_000], help="memory size, e.g. 1M or 100k (1M)")
    sc.add_argument("--corpus", default="filler", choices=["filler", "tales"],
                    help="filler: the passkey template's haystack (default); tales: the bundled tales, repeated")
    sc.add_argument("--memory", help="memory folder (default $KVMAP_CACHE/scale/CORPUS-SIZE; 23 KB per token)")
    sc.add_argument("--trials", type=int, default=10)
    sc.add_argument("--task", default="passkey", choices=["passkey", "niah-single", "niah-multikey"],
                    help="the needle each trial adds: a passkey line (default) or RULER needle sentence(s) in tale text")
    sc.add_argument("--part", default="dev", choices=["dev", "test"], help="which stream of needles (see kvmap eval --part)")
    add_import_options(sc, defaults=PRESETS["scale-1m"])
    add_block_options(sc, {"block_size": "off", "n_blocks": 8})  # with --reuse 0: the InfLLM-style block import
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--model")
    sc.add_argument("--out", help="run folder (runs/scale/CORPUS-SIZE): passkey-scale.json, trials.jsonl (resumable), build.jsonl")
    sc.add_argument("--build-only", action="store_true", help="only build (or finish building) the memory")
    sc.add_argument("--quiet", action="store_true")
    sc.set_defaults(func=cmd_bench_scale)


def add_parsers(sub) -> None:
    _add_eval(sub)
    _add_bench(sub)
    rp = sub.add_parser("report", help="build RESULTS.md from run files")
    rp.add_argument("runs", help="folder holding run folders (config.yaml + predictions.jsonl, sweep.json, bridges/, scale/)")
    rp.add_argument("-o", "--output", default="RESULTS.md")
    rp.set_defaults(func=cmd_report)
