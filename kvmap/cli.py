"""The ``kvmap`` command line: remember, ask, forget, info, eval, report, limb, bridge, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys

from kvmap.errors import InputError, KVMapError


STORE_CHOICES = ["exact", "faiss-flat", "faiss-hnsw", "faiss-ivfpq", "lsh"]


def _comma_ints(text: str) -> list[int]:
    try:
        return [int(x.replace("_", "").lower().replace("k", "000").replace("m", "000000")) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers (e.g. 16000,64k)")


def _import_config(args):
    from kvmap.ports import ImportConfig

    return ImportConfig.from_options(top_k=args.top_k, distance=args.distance, placement=args.placement,
                        reuse=getattr(args, "reuse", 0), reuse_next=getattr(args, "reuse_next", 0),
                        reuse_next_best=getattr(args, "reuse_next_best", 0), layers=_layers(args))


def _layers(args) -> tuple[int, ...] | None:
    """``--layers`` parsed (None: every layer imports)."""
    from kvmap.ports import parse_layers

    return parse_layers(args.layers) if getattr(args, "layers", None) else None


def _load(model: str | None):
    from kvmap.models.loading import load_model

    return load_model(model)


def _model_for_memory(memory, requested: str | None) -> str | None:
    """The model to load for a memory: the one asked for, else the built-in that made the memory."""
    from kvmap.models.loading import BUILTIN

    if requested:
        return requested
    for name, (model_id, _) in BUILTIN.items():
        if model_id == memory.model_id:
            return name
    raise KVMapError(f"memory {memory.path} was made by '{memory.model_id}'; pass that checkpoint with --model PATH")


def cmd_remember(args) -> int:
    from kvmap.reader import ReaderConfig, read_into
    from kvmap.stores import Memory
    from kvmap.textfiles import read_text

    texts = {path: read_text(path) for path in args.files}  # fail fast, before loading the model
    lm = _load(args.model)
    port = lm.port
    memory = Memory.open_or_create(args.memory, lm.model_id, port.layout, store=args.store)
    port.check_memory(memory)
    known = {s["source"] for s in memory.sources()}
    reader = ReaderConfig(chunk_size=args.chunk_size)
    for path, text in texts.items():
        source = "<stdin>" if path == "-" else path
        if source in known and not args.replace:
            print(f"{source}: already in memory, skipped (use --replace to read it again)", file=sys.stderr)
            continue
        if source in known:
            memory.forget(source)
        stats = read_into(port, lm.tokenizer, memory, source, [text], reader, progress=not args.quiet)
        print(f"{source}: {stats.n_tokens} tokens in {stats.seconds:.1f}s ({stats.tokens_per_s:.0f} tok/s)")
    print(f"memory {args.memory}: {memory.n_tokens} tokens from {len(memory.sources())} source(s)")
    return 0


def cmd_ask(args) -> int:
    from kvmap.answer import ask
    from kvmap.stores import Memory

    config = _import_config(args)  # bad options fail before the model loads
    memory = Memory.open(args.memory)
    lm = _load(_model_for_memory(memory, args.model))
    answer = ask(lm, args.question, None if args.no_memory else memory, config,
                 max_new_tokens=args.max_new_tokens, mode=args.mode)
    if args.json:
        print(json.dumps({"answer": answer.text,
                          "memories": [{"source": m.source, "text": m.text, "score": m.score} for m in answer.memories],
                          "sources": answer.source_shares}))
        return 0
    print(answer.text)
    if answer.memories:
        print("\nmemories that came back (source, hits, text):")
        for m in answer.memories:
            print(f"  {m.source:30.30s} {m.score:6.0f}  {m.text[:90]}")
    return 0


def cmd_forget(args) -> int:
    from kvmap.stores import Memory

    memory = Memory.open(args.memory)
    removed = memory.forget(args.source)
    print(f"forgot {args.source}: {removed} tokens; {memory.n_tokens} remain")
    return 0


def cmd_info(args) -> int:
    from kvmap.stores import Memory

    memory = Memory.open(args.dir, verify=args.verify)
    disk = sum(f.stat().st_size for f in memory.path.rglob("*") if f.is_file())
    info = {"path": str(memory.path), "model": memory.model_id, "n_tokens": memory.n_tokens,
            "store": memory.store_kind, "layout": memory.layout.as_dict(), "disk_bytes": disk,
            "sources": memory.sources()}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"memory {info['path']}\n  model   {info['model']}\n  store   {info['store']}\n"
          f"  tokens  {info['n_tokens']}\n  disk    {disk / 2**20:.1f} MiB "
          f"({disk / max(1, memory.n_tokens):.0f} bytes/token)")
    for s in info["sources"]:
        print(f"  - {s['source']}: {s['n_tokens']} tokens")
    return 0


def cmd_eval_passkey(args) -> int:
    from kvmap.eval.passkey import check_methods, run_passkey
    from kvmap.reader import ReaderConfig

    methods = [m for m in args.methods.split(",") if m]
    check_methods(methods)  # before the model loads
    lm = _load(args.model)
    log = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        log = os.path.join(args.out, "predictions.jsonl")  # resumable: finished trials are skipped
    results = [run_passkey(lm, length, args.trials, methods, _import_config(args), ReaderConfig(),
                           store=args.store, seed=args.seed, progress=not args.json, log_path=log,
                           reuse_chunks=args.reuse_chunks)
               for length in args.length]
    if args.out:
        with open(os.path.join(args.out, "passkey.json"), "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "examples"} for r in results], f, indent=1)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "examples"} for r in results]))
        return 0
    for r in results:
        print(f"passkey, {r['length']} tokens, {r['trials']} trials, model {r['model']}")
        for method, m in r["methods"].items():
            if m["n"]:
                print(f"  {method:11s} {m['accuracy']:6.1%}  ({m['correct']}/{m['n']}, 95% CI {m['ci95'][0]:.0%}-{m['ci95'][1]:.0%})")
            else:
                print(f"  {method:11s} skipped: {m['skipped']}")
        for key, value in r["speed"].items():
            print(f"  {key:24s} {value:8.1f}")
    return 0


def cmd_eval(args) -> int:
    """Any task through the generic runner: run folder with config.yaml, predictions.jsonl, metrics.json."""
    from kvmap.eval.methods import check_methods
    from kvmap.eval.runner import run_eval

    methods = [m for m in args.methods.split(",") if m]
    check_methods(methods)  # before the model loads
    task = "passkey" if args.task == "passkey-grid" else args.task
    options = {"passkey": {}, "niah": {"variant": getattr(args, "variant", None)},
               "fairytaleqa": {"data": getattr(args, "data", None), "split": getattr(args, "split", None),
                               "per_story": getattr(args, "per_story", None)},
               "babi": {"qa": getattr(args, "qa", None)}}[task]
    options = {k: v for k, v in options.items() if v is not None}
    if task == "fairytaleqa":  # a bad --data file fails here, before the model loads
        from kvmap.data import fairytaleqa

        fairytaleqa(options.get("split", "val"), path=options.get("data"))
    lm = _load(args.model)
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
                      f"{extra}, {c['latency_s_median']:.1f} s/question)")
            else:
                print(f"    {method:24s} skipped: {c['skipped']}")
    return 0


def cmd_bench_scale(args) -> int:
    """Build a corpus memory of --tokens tokens (resumable), then run passkey trials against it."""
    import time
    from pathlib import Path

    from kvmap.eval.corpus import build_corpus_memory
    from kvmap.eval.scale import passkey_at_scale
    from kvmap.models.loading import cache_dir
    from kvmap.ports import ImportConfig

    tokens = args.tokens[0]
    name = f"{tokens // 1_000_000}m" if tokens % 1_000_000 == 0 else f"{tokens // 1000}k"
    memory = Path(args.memory).expanduser() if args.memory else cache_dir() / "scale" / f"{args.corpus}-{name}"
    out = Path(args.out or f"runs/scale/{args.corpus}-{name}")
    out.mkdir(parents=True, exist_ok=True)
    lm = _load(args.model)
    build = build_corpus_memory(lm, memory, tokens, corpus=args.corpus, progress=not args.quiet)
    build["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if build["parts_read"]:
        with open(out / "build.jsonl", "a", encoding="utf-8") as f:  # one line per (resumed) build call
            f.write(json.dumps(build) + "\n")
    print(f"memory {memory}: {build['n_tokens']} tokens in {build['n_segments']} segments"
          + (f"; read {build['tokens_read']} tokens at {build['ingest_tok_s']:.0f} tok/s" if build["parts_read"] else ""))
    if args.build_only:
        return 0
    config = ImportConfig.from_options(top_k=args.top_k, reuse=args.reuse, reuse_next=args.reuse_next,
                          reuse_next_best=args.reuse_next_best, layers=_layers(args))
    result = passkey_at_scale(lm, memory, args.trials, config, seed=args.seed, log_path=out / "trials.jsonl",
                              progress=not args.quiet)
    result["built_in_this_process"] = bool(build["parts_read"])  # then peak RSS includes the build
    result["corpus"] = args.corpus
    tmp = out / "passkey-scale.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "passkey-scale.json")
    sp = result["speed"]
    print(f"passkey in {result['haystack_tokens']} tokens of {args.corpus}: kvmap {result['methods']['kvmap']['correct']}"
          f"/{result['trials']}, none {result['methods']['none']['correct']}/{result['trials']}; decode "
          f"{sp['decode_ms_memory']:.0f} vs {sp['decode_ms_no_memory']:.0f} ms/token ({sp['decode_ratio']:.2f}x); "
          f"first forward {sp['prefill_s_memory']:.1f} s; peak RSS {result['peak_rss_mb'] / 1024:.2f} GiB; "
          f"{result['disk_bytes_per_token'] / 1024:.1f} KiB/token on disk; wrote {out / 'passkey-scale.json'}")
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


def cmd_limb_train(args) -> int:
    from pathlib import Path

    from kvmap.training.limb import train_limb

    path = train_limb(Path(args.out).expanduser(), max_steps=args.steps)
    print(f"wrote {path}")
    return 0


def _bridge_parts(args):
    from kvmap.training.bridge import BridgeDataModule, BridgeModule

    for name in ("n_train", "n_val", "n_test", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    module = BridgeModule(task=args.task, text_model=args.model, target_text_model=args.target_model,
                          limb_checkpoint=args.limb, lr=args.lr, seed=args.seed)
    data = BridgeDataModule(task=args.task, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                            batch_size=args.batch_size, seed=args.seed)
    return module, data


def _print_bridge(metrics: dict) -> None:
    print(f"{metrics['task']}: {metrics['source']} -> {metrics['target']} (chance: {metrics['chance']})")
    for condition, r in metrics["results"].items():
        low, high = r["ci95"]
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in r["by_kind"].items())
        print(f"  {condition:8s} {r['accuracy']:6.1%} [{low:.0%}-{high:.0%}] n={r['n']}  ({kinds})")


def cmd_bridge_train(args) -> int:
    from pathlib import Path

    from kvmap.training.run import evaluate_bridge, train_bridge

    out = Path(args.out or f"runs/bridges/{args.task}")
    module, data = _bridge_parts(args)
    adapter = train_bridge(module, data, out, max_steps=args.steps, val_every=args.val_every)
    module, data = _bridge_parts(args)  # a fresh module: the `random` baseline is the untrained initialisation
    _print_bridge(evaluate_bridge(module, data, adapter, out))
    print(f"wrote {out}/metrics.json, {out}/training.png, {adapter}")
    return 0


def cmd_bridge_eval(args) -> int:
    from pathlib import Path

    from kvmap.training.run import evaluate_bridge

    out = Path(args.out or f"runs/bridges/{args.task}")
    adapter = Path(args.adapter) if args.adapter else out / "adapter.safetensors"
    if not adapter.is_file():  # checked before loading models: a missing adapter must not score the untrained one
        raise InputError(f"no adapter at {adapter}; run `kvmap bridge train --task {args.task}` or pass --adapter FILE")
    module, data = _bridge_parts(args)
    _print_bridge(evaluate_bridge(module, data, adapter, out))
    return 0


def cmd_demo(args) -> int:
    from kvmap.demo import run_demo

    return run_demo(memory_dir=args.memory, n_tales=args.tales, rebuild=args.rebuild)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmap", description="Memory-mapped key/value memory for transformers.")
    sub = p.add_subparsers(dest="command", required=True)

    def import_options(sp):
        sp.add_argument("--top-k", type=int, default=16, help="memories per layer, query head and token (16)")
        sp.add_argument("--distance", type=int, default=4096, help="how far behind the query memories sit (4096)")
        sp.add_argument("--placement", default="ordered", choices=["ordered", "fixed"],
                        help="ordered: a query's memories keep reading order behind it (default); "
                             "fixed: all at position 0 (the seed's)")
        sp.add_argument("--reuse", type=int, default=0,
                        help="search the memory once, for the prompt (this many candidates per query, streamed "
                             "from disk), and decode among those candidates: for memories too large to search "
                             "per token, e.g. 256 (default 0: search at every token)")
        sp.add_argument("--reuse-next", type=int, default=0,
                        help="with --reuse: also keep the N memories after each candidate, e.g. 8 (what followed "
                             "a match, such as a passkey's digits)")
        sp.add_argument("--reuse-next-best", type=int, default=0,
                        help="with --reuse-next: only after each query's N best candidates, e.g. 16 (default 0: all)")
        sp.add_argument("--layers", help="layers that import memories, e.g. 0-14, 0-28/2 or 3+7+20-29 (default: all)")

    r = sub.add_parser("remember", help="read text files into a memory folder")
    r.add_argument("files", nargs="+", help="UTF-8 text files ('-' reads standard input)")
    r.add_argument("--memory", required=True, help="memory folder (created if missing)")
    r.add_argument("--model", help="built-in name (smollm2-135m, gemma3-270m) or local checkpoint folder")
    r.add_argument("--store", default=None, choices=STORE_CHOICES,
                   help="search structure for a new memory (exact); an existing memory keeps its own")
    r.add_argument("--chunk-size", type=int, default=512, help="tokens per forward pass (512)")
    r.add_argument("--replace", action="store_true", help="read files already in memory again")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_remember)

    a = sub.add_parser("ask", help="answer a question using a memory")
    a.add_argument("question")
    a.add_argument("--memory", required=True)
    a.add_argument("--model", help="defaults to the model that made the memory")
    a.add_argument("--max-new-tokens", type=int, default=64)
    a.add_argument("--no-memory", action="store_true", help="answer without importing memories (baseline)")
    a.add_argument("--json", action="store_true", help="print one JSON object {answer, memories}")
    a.add_argument("--mode", default="splice", choices=["splice", "splice-attention", "import"],
                   help="splice (default): the 8 memory blocks of 64 tokens BM25 ranks best for the question, their "
                        "stored K/V spliced into the prompt; splice-attention: the question's queries pick the "
                        "blocks; import: every query's top-k memory tokens join attention (the seed's method; "
                        "--top-k/--distance/--placement apply)")
    import_options(a)
    a.set_defaults(func=cmd_ask)

    f = sub.add_parser("forget", help="remove one source from a memory")
    f.add_argument("source")
    f.add_argument("--memory", required=True)
    f.set_defaults(func=cmd_forget)

    i = sub.add_parser("info", help="describe a memory folder")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.add_argument("--no-verify", dest="verify", action="store_false", help="skip checksum verification")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("eval", help="evaluation tasks")
    esub = e.add_subparsers(dest="task", required=True)
    pk = esub.add_parser("passkey", help="passkey retrieval (Landmark Attention template)")
    pk.add_argument("--length", type=_comma_ints, default=[16000], help="context length(s) in tokens, e.g. 16000,64k")
    pk.add_argument("--trials", type=int, default=20)
    pk.add_argument("--methods", default="kvmap,truncate", help="comma list of kvmap,kvmap-fixed,truncate,full,none")
    pk.add_argument("--model")
    pk.add_argument("--store", default="exact", choices=STORE_CHOICES)
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--out", help="run folder: passkey.json (metrics) and predictions.jsonl (every trial; resumable)")
    pk.add_argument("--json", action="store_true")
    pk.add_argument("--no-reuse-chunks", dest="reuse_chunks", action="store_false",
                    help="read every haystack from scratch (by default chunks with an identical token prefix "
                         "are computed once; the memories are the same)")
    import_options(pk)
    pk.set_defaults(func=cmd_eval_passkey)

    def generic(name: str, help: str, lengths: str, methods: str = "oracle,none,truncate,rag-bm25,kvmap"):
        from kvmap.eval.methods import METHODS

        g = esub.add_parser(name, help=help)
        g.add_argument("--methods", default=methods,
                       help=f"comma list of {','.join(METHODS)}; options as NAME:KEY=VALUE, e.g. kvmap:distance=64")
        g.add_argument("--lengths", type=_comma_ints, default=_comma_ints(lengths), help=f"context lengths in tokens (default {lengths})")
        g.add_argument("--limit", type=int, default=50, help="examples per length")
        g.add_argument("--out", required=True, help="run folder (config.yaml, predictions.jsonl, metrics.json); resumable")
        g.add_argument("--model")
        g.add_argument("--store", default="exact", choices=STORE_CHOICES)
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--max-new-tokens", type=int)
        g.add_argument("--json", action="store_true")
        g.set_defaults(func=cmd_eval)
        return g

    generic("niah", "RULER-style needles in a haystack of tales", "4k,16k").add_argument(
        "--variant", choices=["single", "multikey", "multivalue", "multiquery"], default="single")
    fq = generic("fairytaleqa", "FairytaleQA story + distractor tales, then a question", "0,4k,16k")
    fq.add_argument("--data", help="a FairytaleQA-format jsonl file (default: the shipped val split)")
    fq.add_argument("--split", choices=["val", "train"])
    fq.add_argument("--per-story", type=int, help="questions per story (default 5)")
    generic("babi", "bAbI facts spread through tales (BABILong style)", "4k,16k").add_argument(
        "--qa", type=int, choices=[1, 2, 3], default=1)
    generic("passkey-grid", "passkey through the generic runner (all baselines)", "16k")

    bn = sub.add_parser("bench", help="long benchmarks")
    bnsub = bn.add_subparsers(dest="bench_command", required=True)
    sc = bnsub.add_parser("scale", help="passkey from a very large memory: build it (resumable), then ask with "
                                        "memory and without, side by side")
    sc.add_argument("--tokens", type=_comma_ints, default=[1_000_000], help="memory size, e.g. 1M or 100k (1M)")
    sc.add_argument("--corpus", default="filler", choices=["filler", "tales"],
                    help="filler: the passkey template's haystack (default); tales: the bundled tales, repeated")
    sc.add_argument("--memory", help="memory folder (default $KVMAP_CACHE/scale/CORPUS-SIZE; 23 KB per token)")
    sc.add_argument("--trials", type=int, default=10)
    sc.add_argument("--reuse", type=int, default=256,
                    help="candidates per query kept from the prompt's exact search and reused while decoding (256)")
    sc.add_argument("--reuse-next", type=int, default=8,
                    help="also keep the 8 memories after each candidate (what followed a match, e.g. a passkey's digits)")
    sc.add_argument("--reuse-next-best", type=int, default=16,
                    help="only each query's N best candidates bring their followers (16; 0: all)")
    sc.add_argument("--top-k", type=int, default=16)
    sc.add_argument("--layers", help="layers that import memories, e.g. 0-28/2 (default: all 30)")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--model")
    sc.add_argument("--out", help="run folder (runs/scale/CORPUS-SIZE): passkey-scale.json, trials.jsonl (resumable), build.jsonl")
    sc.add_argument("--build-only", action="store_true", help="only build (or finish building) the memory")
    sc.add_argument("--quiet", action="store_true")
    sc.set_defaults(func=cmd_bench_scale)

    rp = sub.add_parser("report", help="build RESULTS.md from run files")
    rp.add_argument("runs", help="folder holding run folders (passkey.json, sweep.json)")
    rp.add_argument("-o", "--output", default="RESULTS.md")
    rp.set_defaults(func=cmd_report)

    lb = sub.add_parser("limb", help="the vision/limb-control policy (a timm ViT on a synthetic arm world)")
    lbsub = lb.add_subparsers(dest="limb_command", required=True)
    lt = lbsub.add_parser("train", help="train the limb policy with Lightning on this CPU")
    lt.add_argument("--out", default="~/.cache/kvmap/limb", help="folder for limb.ckpt and logs (~/.cache/kvmap/limb)")
    lt.add_argument("--steps", type=int, default=700, help="optimizer steps (700: ~97%% reach accuracy, ~10 min on one CPU core)")
    lt.set_defaults(func=cmd_limb_train)

    br = sub.add_parser("bridge", help="cross-model memory: train and evaluate adapters between two models")
    brsub = br.add_subparsers(dest="bridge_command", required=True)
    for name, func, help in (("train", cmd_bridge_train, "train an adapter, then evaluate it against its baselines"),
                             ("eval", cmd_bridge_eval, "evaluate a trained adapter against its baselines")):
        bp = brsub.add_parser(name, help=help)
        bp.add_argument("--task", required=True, choices=["vision-text", "text-limb", "text-text"])
        bp.add_argument("--out", help="run folder (runs/bridges/TASK)")
        bp.add_argument("--model", default="smollm2-135m", help="the text model (smollm2-135m)")
        bp.add_argument("--target-model", default="gemma3-270m", help="text-text: the importing model (gemma3-270m)")
        bp.add_argument("--limb", default="~/.cache/kvmap/limb/limb.ckpt", help="limb policy checkpoint")
        bp.add_argument("--n-train", type=int, default=1200)
        bp.add_argument("--n-val", type=int, default=48)
        bp.add_argument("--n-test", type=int, default=200)
        bp.add_argument("--batch-size", type=int, default=8)
        bp.add_argument("--lr", type=float, default=1e-3)
        bp.add_argument("--seed", type=int, default=0)
        if name == "train":
            bp.add_argument("--steps", type=int, default=150, help="optimizer steps (150)")
            bp.add_argument("--val-every", type=int, default=50)
        else:
            bp.add_argument("--adapter", help="adapter file (default: OUT/adapter.safetensors)")
        bp.set_defaults(func=func)

    d = sub.add_parser("demo", help="fairy tales into memory, questions answered from it")
    d.add_argument("--memory", help="memory folder (default: $KVMAP_CACHE/demo-memory)")
    d.add_argument("--tales", type=int, default=28, help="how many Grimm tales to remember (28, about 63k tokens)")
    d.add_argument("--rebuild", action="store_true", help="read the tales again")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KVMapError as err:
        print(f"kvmap: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvmap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
