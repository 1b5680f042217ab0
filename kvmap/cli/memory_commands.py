"""``kvmap remember``, ``ask``, ``forget`` and ``info``: a memory folder's life."""
from __future__ import annotations

import json
import sys

from kvmap.cli import checks
from kvmap.cli.options import (BLOCK_FLAGS, REUSE_FLAGS, TOKEN_FLAGS, add_block_options, add_field_option,
                               add_import_options, at_least, given, import_config, store_choices)
from kvmap.errors import InputError, KVMapError
from kvmap.fileio import disk_usage

ASK_MODES = ("splice", "splice-attention", "recompute", "import", "import-bm25")
"""Kept equal to :data:`kvmap.answer.ASK_MODES` (a test checks), so ``kvmap --help`` needs no torch import."""


def load(model: str | None, adapter: str | None = None):
    from kvmap.models.loading import load_model

    return load_model(model, adapter=adapter)


def model_for_memory(memory, requested: str | None) -> str | None:
    """The model to load for a memory: the one asked for, else the built-in that made the memory."""
    from kvmap.models.loading import BUILTIN

    if requested:
        return requested
    for name, (model_id, _) in BUILTIN.items():
        if model_id == memory.model_id:
            return name
    raise KVMapError(f"memory {memory.path} was made by '{memory.model_id}'; pass that checkpoint with --model PATH")


# -- remember ------------------------------------------------------------------------------------

def _read_inputs(args) -> dict[str, tuple[str, str]]:
    """Every input read and checked (before the model loads): source name -> (path, text)."""
    from kvmap.textfiles import read_text

    if args.files.count("-") > 1:
        raise InputError("'-' (standard input) is given more than once; give it once")
    out: dict[str, tuple[str, str]] = {}
    for path in args.files:
        text = read_text(path, max_bytes=args.max_bytes)
        source = checks.source_name(path, text)
        if source in out:
            print(f"{source}: given twice, read once", file=sys.stderr)
            continue
        out[source] = (path, text)
    return out


def _plan(memory, inputs: dict, tokenizer, reader, replace: bool) -> list[str]:
    """The sources to read; one already in memory is skipped (same text) or needs ``--replace`` (another text)."""
    known = {s["source"] for s in memory.sources()}
    todo = []
    for source, (_, text) in inputs.items():
        if source in known and not replace:
            sinks = 0 if reader.remember_sinks else reader.sinks
            if not checks.same_text(memory, source, tokenizer, text, sinks):
                raise InputError(f"{source}: memory {memory.path} already holds a different text under this name "
                                 f"(another file of that name, or an older version); pass --replace to replace it, "
                                 f"or give this file another path")
            print(f"{source}: already in memory with the same text, skipped", file=sys.stderr)
            continue
        todo.append(source)
    return todo


def _check_chunk(reader, window: int | None) -> None:
    """A chunk read after its context and sinks must fit the model's window."""
    room = None if window is None else window - reader.context - reader.sinks
    if room is not None and room < 1:
        raise InputError(f"the model's window of {window} tokens leaves no room for the reader's "
                         f"{reader.context + reader.sinks} tokens of context; use a model with a longer window")
    if room is not None and reader.chunk_size > room:
        raise InputError(f"--chunk-size {reader.chunk_size} does not fit the model's window of {window} tokens with "
                         f"{reader.context + reader.sinks} tokens of context; give at most {room}")


def cmd_remember(args) -> int:
    from kvmap.reader import ReaderConfig, read_into
    from kvmap.stores import Memory

    at_least("--chunk-size", args.chunk_size, 1)  # bad sizes fail before the model loads
    reader = ReaderConfig(chunk_size=args.chunk_size)
    folder = checks.memory_folder(args.memory, create=True)
    inputs = _read_inputs(args)
    lm = load(args.model)
    _check_chunk(reader, lm.window)
    port = lm.port
    memory = Memory.open_or_create(folder, lm.model_id, port.layout, store=args.store)
    port.check_memory(memory)
    known = {s["source"] for s in memory.sources()}
    for source in _plan(memory, inputs, lm.tokenizer, reader, args.replace):
        # replace: the new copy is written first and swapped in by one manifest replace
        stats = read_into(port, lm.tokenizer, memory, source, [inputs[source][1]], reader,
                          progress=not args.quiet, replace=source in known)
        print(f"{source}: {stats.n_tokens} tokens in {stats.seconds:.1f}s ({stats.tokens_per_s:.0f} tok/s)"
              + (", replacing the old copy" if source in known else ""))
    print(f"memory {folder}: {memory.n_tokens} tokens from {len(memory.sources())} source(s)")
    return 0


def add_remember(sub) -> None:
    from kvmap.reader import ReaderConfig
    from kvmap.textfiles import MAX_BYTES

    r = sub.add_parser("remember", help="read text files into a memory folder")
    r.add_argument("files", nargs="+", help="UTF-8 (or UTF-16 with BOM) text files ('-' reads standard input, "
                                            "remembered as <stdin:HASH>)")
    r.add_argument("--memory", required=True, help="memory folder (created if missing)")
    r.add_argument("--model", help="built-in name (smollm2-135m, gemma3-270m) or local checkpoint folder")
    r.add_argument("--store", default=None, choices=store_choices(),
                   help="search structure for a new memory (exact); an existing memory keeps its own")
    add_field_option(r, "--chunk-size", ReaderConfig, "chunk_size", type=int,
                     default=ReaderConfig().chunk_size)
    r.add_argument("--max-bytes", type=int, default=MAX_BYTES,
                   help=f"largest file read (default {MAX_BYTES >> 20} MiB)")
    r.add_argument("--replace", action="store_true",
                   help="read files already in memory again; the old copy stays until the new one is complete")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_remember)


# -- ask -----------------------------------------------------------------------------------------

SPLICE_ALLOWS = {"splice": tuple(BLOCK_FLAGS), "splice-attention": (*BLOCK_FLAGS, "layers"),
                 "recompute": tuple(BLOCK_FLAGS)}
"""Import options that also apply in the splice modes (the others would be ignored there, so they are refused)."""


def ask_config(args):
    """The ImportConfig of ``kvmap ask`` (before the model loads): splice modes start from preset("splice")."""
    from kvmap.presets import PRESETS

    flags = {**TOKEN_FLAGS, **REUSE_FLAGS, **BLOCK_FLAGS}
    typed = given(args, flags)
    if getattr(args, "adapter", None) and getattr(args, "no_memory", False):
        raise InputError("--adapter acts only while the model answers from memory; with --no-memory it would "
                         "change nothing: drop one of them")
    if args.mode in SPLICE_ALLOWS:
        ignored = [name for name in typed if name not in SPLICE_ALLOWS[args.mode]]
        if ignored:
            names = ", ".join(flags[n] for n in ignored)
            one = len(ignored) == 1
            raise InputError(f"{names} {'applies' if one else 'apply'} to --mode import only, not --mode {args.mode}; "
                             f"drop {'it' if one else 'them'} or add --mode import")
        return import_config(args, base=PRESETS["splice"])
    if args.mode == "import-bm25":
        blocks = [flags[n] for n in typed if n in BLOCK_FLAGS]
        if blocks:
            raise InputError(f"{', '.join(blocks)} do not apply to --mode import-bm25 (it imports tokens from the "
                             "blocks of kvmap.presets.BM25_GATE that BM25 chooses): drop them or use --mode import")
        return import_config(args, base=PRESETS["bm25-import"])
    return import_config(args)


def _fit_memory(args, config, memory):
    """``config`` checked against the memory: not empty; a typed top-k within its size, the default capped."""
    if memory.n_tokens == 0:
        raise InputError(f"memory {memory.path} is empty; remember something first "
                         f"(kvmap remember FILE --memory {memory.path})")
    n = memory.n_tokens
    flags = {**TOKEN_FLAGS, **REUSE_FLAGS, **BLOCK_FLAGS}
    for name, value in given(args, {"top_k": "", **REUSE_FLAGS, "block_size": ""}).items():
        if value > n:  # a count beyond the memory would only size buffers (1e9: a 1.3 TB allocation)
            raise InputError(f"{flags[name]} {value} is more than the {n} tokens in memory {memory.path}; "
                             f"give at most {n}")
    if config.blocks is not None and args.n_blocks is not None:
        most = -(-n // config.blocks.size)
        if args.n_blocks > most:
            raise InputError(f"--n-blocks {args.n_blocks} is more than the {most} blocks of {config.blocks.size} "
                             f"tokens in memory {memory.path}; give at most {most}")
    if args.mode == "import" and config.top_k > n:  # the default, for a small memory: all of it
        config = config.with_options(top_k=n)
    return config


def _prompt_tokens(lm, args, config, memory) -> int:
    """Tokens of the prompt ``ask`` will run: the chat prompt, plus the spliced blocks in splice mode."""
    from kvmap.answer import chat_prompt, context_prompt

    if args.mode in SPLICE_ALLOWS and not args.no_memory:
        before, after = context_prompt(lm.tokenizer, args.question)
        return len(before) + len(after) + min(memory.n_tokens, config.blocks.size * config.blocks.n_blocks)
    return len(chat_prompt(lm.tokenizer, args.question))


def cmd_ask(args) -> int:
    from kvmap.answer import ask
    from kvmap.stores import Memory

    at_least("--max-new-tokens", args.max_new_tokens, 1)
    config = ask_config(args)  # bad options fail before the model loads
    memory = Memory.open(checks.memory_folder(args.memory, create=False))
    if not args.no_memory:
        config = _fit_memory(args, config, memory)
    lm = load(model_for_memory(memory, args.model), args.adapter)
    if not args.no_memory:
        lm.port.check_memory(memory)
    checks.check_window(lm.window, _prompt_tokens(lm, args, config, memory), args.max_new_tokens)
    answer = ask(lm, args.question, None if args.no_memory else memory, config,
                 max_new_tokens=args.max_new_tokens, mode=args.mode)
    if args.json:
        print(json.dumps({"answer": answer.text,
                          "memories": [{"source": m.source, "text": m.text, "score": m.score} for m in answer.memories],
                          "sources": answer.source_shares}))
        return 0
    print(answer.text)
    if answer.memories and args.mode.startswith("splice"):
        print("\nblocks spliced into the prompt, best retrieval score first (source, score, text):")
        for m in answer.memories:
            print(f"  {m.source:30.30s} {m.score:7.2f}  {m.text}")
    elif answer.memories:
        print("\nmemories that came back (source, hits, text):")
        for m in answer.memories:
            print(f"  {m.source:30.30s} {m.score:6.0f}  {m.text[:90]}")
    return 0


def add_ask(sub) -> None:
    a = sub.add_parser("ask", help="answer a question using a memory")
    a.add_argument("question")
    a.add_argument("--memory", required=True)
    a.add_argument("--model", help="defaults to the model that made the memory")
    a.add_argument("--adapter", help="a memory adapter folder (`kvmap finetune`), active while the model answers from memory "
                        "(imported, or spliced into the prompt)")
    a.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (64)")
    a.add_argument("--no-memory", action="store_true", help="answer without importing memories (baseline)")
    a.add_argument("--json", action="store_true", help="print one JSON object {answer, memories}")
    a.add_argument("--mode", default="splice", choices=ASK_MODES,
                   help="splice (default): the memory blocks BM25 ranks best for the question (preset 'splice'), "
                        "their stored K/V spliced into the prompt (--block-size, --n-blocks apply); "
                        "splice-attention: the question's queries pick the blocks (--layers applies too); "
                        "recompute: splice's blocks read again as tokens, their K/V computed anew next to the "
                        "question instead of spliced as stored (--block-size, --n-blocks apply); "
                        "import: every query's top-k memory tokens join attention (the seed's method; the "
                        "import options apply); import-bm25: the same among the tokens of the 2 overlapping "
                        "64-token blocks BM25 ranks best for the question, placed 256 positions back "
                        "(preset 'bm25-import'; the token import options apply)")
    from kvmap.presets import PRESETS

    add_block_options(a, PRESETS["splice"])
    add_import_options(a)
    a.set_defaults(func=cmd_ask)


# -- forget, info --------------------------------------------------------------------------------

def cmd_forget(args) -> int:
    from kvmap.stores import Memory

    memory = Memory.open(checks.memory_folder(args.memory, create=False))
    removed = memory.forget(args.source)
    print(f"forgot {args.source}: {removed} tokens; {memory.n_tokens} remain")
    return 0


def cmd_info(args) -> int:
    from kvmap.stores import Memory

    memory = Memory.open(checks.memory_folder(args.dir, create=False, flag="memory"), verify=args.verify)
    disk = disk_usage(memory.path)
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


def cmd_index(args) -> int:
    import time

    from kvmap.reader import sample_query_moments
    from kvmap.stores import Memory
    from kvmap.stores.clusters import Probe

    at_least("--distance", args.distance, 1)
    memory = Memory.open(checks.memory_folder(args.memory, create=False), verify=False)
    lm = load(model_for_memory(memory, args.model))
    lm.port.check_memory(memory)
    began = time.perf_counter()
    indexed = memory.query_index(Probe(clusters=1, distance=args.distance),
                                 moments=lambda ids: sample_query_moments(lm.port, ids))
    print(f"memory {memory.path}: {indexed} of {memory.n_segments} segment(s) indexed for distance "
          f"{args.distance} in {time.perf_counter() - began:.1f}s; search them with --reuse-probe N")
    return 0


def add_forget_info(sub) -> None:
    x = sub.add_parser("index", help="build a memory's query-aware cluster index now (remember builds it for the "
                                     "default distance; this one also indexes memories remembered without it)")
    x.add_argument("--memory", required=True)
    x.add_argument("--model", help="the model that made the memory (default: the built-in that did)")
    x.add_argument("--distance", type=int, default=4096, help="import distance the index serves (default 4096)")
    x.set_defaults(func=cmd_index)

    f = sub.add_parser("forget", help="remove one source from a memory")
    f.add_argument("source")
    f.add_argument("--memory", required=True)
    f.set_defaults(func=cmd_forget)

    i = sub.add_parser("info", help="describe a memory folder")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.add_argument("--no-verify", dest="verify", action="store_false", help="skip checksum verification")
    i.set_defaults(func=cmd_info)


# -- explore -------------------------------------------------------------------------------------

def cmd_explore(args) -> int:
    from kvmap.explore import Explorer, check_address, serve
    from kvmap.stores import Memory

    at_least("--max-bytes", args.max_bytes, 1)
    check_address(args.host, args.port)
    folder = checks.memory_folder(args.memory, create=True)
    model = args.model
    if model is None and (folder / "manifest.json").exists():
        model = model_for_memory(Memory.open(folder, verify=False), None)
    explorer = Explorer(load(model, args.adapter), folder, max_bytes=args.max_bytes)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"kvmap explore: serving on {args.host}: anyone who can reach it may read and change the memory",
              file=sys.stderr)
    serve(explorer, args.host, args.port)
    return 0


def add_explore(sub) -> None:
    from kvmap.explore import UPLOAD_LIMIT

    e = sub.add_parser("explore", help="a local web page to ask a memory questions and see what came back "
                                       "(layer x head map, memories in their documents), add and forget documents")
    e.add_argument("--memory", required=True, help="memory folder (created if missing)")
    e.add_argument("--model", help="built-in name or local checkpoint folder (default: the one that made the memory)")
    e.add_argument("--adapter", help="a memory adapter folder (kvmap finetune)")
    e.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    e.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    e.add_argument("--max-bytes", type=int, default=UPLOAD_LIMIT,
                   help=f"largest upload (default {UPLOAD_LIMIT >> 20} MiB)")
    e.set_defaults(func=cmd_explore)


def add_parsers(sub) -> None:
    add_remember(sub)
    add_ask(sub)
    add_forget_info(sub)
    add_explore(sub)
