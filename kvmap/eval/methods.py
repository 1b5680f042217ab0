"""The methods compared on every task: baselines and kvmap variants, all on the same examples.

A method name is a base name with optional ``:KEY=VALUE`` options, e.g. ``kvmap:distance=64``,
``kvmap-block:n_blocks=16:neighbours=1``, ``rag-bm25:budget=2048``, ``streaming:window=4096``.

- ``oracle``: only the gold passage in the prompt (the ceiling); ``none``: the question alone;
- ``full``: the whole context (skipped where it does not fit the window); ``truncate``: the first
  and the last half-window of context tokens (head + tail, the standard truncation: a story at the
  start of the context survives); ``truncate-tail``: the last window of tokens only; ``streaming``: StreamingLLM — the context streamed through the model with a
  rolling window (kvmap's reader: 4 sinks + 512 previous tokens per chunk), answered from the
  prompt start (attention sinks) plus the last ``window`` tokens' K/V;
- ``yarn``: full attention over the whole context, RoPE stretched by YaRN (transformers'
  ``rope_type="yarn"``, factor = context / window), up to ``max_tokens`` (cost grows quadratically);
- ``rag-bm25`` / ``rag-embed``: the best passages (BM25 / MiniLM embeddings) up to ``budget`` tokens;
- ``kvmap*``: the context beyond what fits the window read into a memory; the prompt holds the instruction,
  the most recent context (``local``, see KVMAP_RUNNER_OPTIONS) and the question.
  ``kvmap`` (token-level, ordered placement), ``kvmap-fixed`` (the seed's placement),
  ``kvmap-block`` (InfLLM-style 64-token blocks chosen by the question, contiguous before the
  prompt), ``kvmap-block-fixed`` (the same blocks at position 0); options are ImportConfig fields.
"""
from __future__ import annotations

import contextlib
import copy

from kvmap.errors import InputError
from kvmap.config import parse_heads
from kvmap.ports import OPTION_NAMES, ImportConfig, parse_layers
from kvmap.presets import SPLICE, TOKEN_IMPORT

BASELINES = ("oracle", "none", "full", "truncate", "truncate-tail", "streaming", "yarn", "rag-bm25", "rag-embed")
KVMAP_PRESETS = {
    "kvmap": TOKEN_IMPORT,
    "kvmap-fixed": {**TOKEN_IMPORT, "placement": "fixed"},
    "kvmap-block": SPLICE,
    "kvmap-block-fixed": {**SPLICE, "placement": "fixed"},
    "kvmap-bm25": SPLICE,
    "kvmap-splice": SPLICE,
    "kvmap-splice-layerwise": SPLICE,
    "kvmap-splice-bm25": SPLICE,
}
"""``kvmap-bm25``: the same block import, blocks chosen by BM25 between the question and each block's
text instead of by attention scores: it separates "does retrieval find the passage" from "does
imported K/V carry it". ``kvmap-splice`` / ``kvmap-splice-bm25``: the chosen blocks' stored K/V are
spliced into the prompt where a text baseline puts its context (after the instruction, inside
``<context>``), at the positions the text would have, instead of before the prompt's first token;
the question is then read after them, like cached-document reuse. ``kvmap-splice``: one forward of
the prompt without context scores the blocks (softmax mass of the question tokens' queries only,
see :mod:`kvmap.splice`), summed over every layer and head, so all layers get the same blocks, as text
would give them; ``kvmap-splice-layerwise``: each (layer, KV head) keeps its own choice (all the
prompt's queries)."""
METHODS = BASELINES + tuple(KVMAP_PRESETS)
KVMAP_RUNNER_OPTIONS = {"local": None, "tail_import": 0, "splice_after_tail": 1, "in_view": 1, "bm25_blocks": 0,
                        "bm25_stride": 0, "tail_in_memory": 0,
                        "recompute": 0}
"""Options of every kvmap method that are not ImportConfig fields. ``local=N``: the most recent N context
tokens (as many as fit the window next to the prompt, the answer and any spliced blocks) stay in the prompt
as ordinary attention context, and only the context before them goes to memory; where the whole context
fits, nothing does, and the method reads the context as truncation does. The default (no ``local``): as
much as fits the window, so that memory only adds to what the model sees. ``local=0``: everything goes to
memory and the prompt holds only the instruction and question, the seed's setting (run files before
2026-12-01 were written with it and name it so). The recent context is read without memory, as truncation
reads it, and memories come in from the question on; ``tail_import=1`` (token-level methods): the recent
context imports memories too, as the first ``local`` rows did, at many times the cost. ``splice_after_tail``
(splice methods; on by default since the NIAH 16k dev rows, 7/10 against 2/10): the spliced blocks go after the
recent context, next to the question, and the recent context is prefilled once for the group without memory;
``splice_after_tail=0`` puts them before it, in reading order, and each question re-reads the recent context over
them, which made the answers degenerate. ``in_view`` (``kvmap-splice-bm25``; on by default since the dev rows
of NIAH 16k, 9/10 against 7/10, and FairytaleQA 16k, 17.1 against 14.3 ROUGE-L): the recent context's text is
ranked with the memory's blocks, and only memory blocks that rank above all of it are spliced (none, where the
answer is in view); ``in_view=0`` splices the best blocks whatever the recent context holds. Without a recent
context (``local=0``) there is nothing in view and the two are the same. ``bm25_blocks=N`` (token-level
``kvmap``): each question's token import searches only the tokens of the N memory blocks of 64 tokens that BM25
ranks best for it, gated like ``in_view`` (no import at all where the kept context ranks above every memory
block); the question-in-view selection of InfiniRetri, with BM25 in place of the model's attention. ``bm25_stride=S``
(with ``bm25_blocks`` or ``kvmap-splice-bm25``): the blocks BM25 ranks start every S tokens, so they overlap and
a sentence cut by one block's edge is whole in the next (0, the default: every 64 tokens, no overlap).
``tail_in_memory=1`` (token-level methods): the memory holds the whole context, the kept recent context too,
which is still read as ordinary context; so a fact in view can also come back next to the question, where a
small model reads it more surely than thousands of tokens back (the kept context's misses on NIAH and
passkey at 16k are such facts). With ``bm25_blocks`` there is then no gate: the kept context's blocks are
ranked as memory blocks. ``recompute=1`` (splice methods): the chosen blocks' tokens are read again in the
prompt, their K/V computed anew next to the question, instead of spliced as the memory stored them (the limit
of CacheBlend's partial recomputation where every spliced token is recomputed); the memory still chooses them."""
BASELINE_OPTIONS = {"streaming": {"window": 2048}, "yarn": {"max_tokens": 32768},
                     "rag-bm25": {"budget": 1024, "adapter": 0}, "rag-embed": {"budget": 1024, "adapter": 0},
                     "oracle": {"adapter": 0}, "none": {"adapter": 0}, "truncate": {"adapter": 0}}
"""``adapter=1`` (oracle, none, truncate, RAG): the model's memory adapter is on while the method answers, as it is
for a splice method with ``adapter=1``: the tuned model's own scores with the gold passage, with nothing, with
the truncated context and with retrieved text (issue 16: what the adapter changes outside memory)."""


def parse_method(name: str) -> tuple[str, dict]:
    """``"kvmap-block:n_blocks=16"`` -> ``("kvmap-block", {"n_blocks": 16})``; InputError if unknown."""
    base, *opts = name.split(":")
    if base not in METHODS:
        raise InputError(f"unknown method '{base}'; choose from {', '.join(METHODS)} (options as NAME:KEY=VALUE)")
    allowed = set(OPTION_NAMES) - {"layers", "fixed_blocks"} | set(KVMAP_RUNNER_OPTIONS) if base in KVMAP_PRESETS \
        else set(BASELINE_OPTIONS.get(base, {}))
    options: dict = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or key not in allowed | ({"layers"} if base in KVMAP_PRESETS else set()):
            raise InputError(f"method '{name}': unknown option '{opt}'; "
                             f"options of {base}: {', '.join(sorted(allowed)) or 'none'}")
        if key == "layers":  # e.g. layers=0-14, layers=0-28/2 or layers=3+7+9
            options[key] = parse_layers(value)
        elif key == "heads":  # e.g. heads=17.3+20.5
            options[key] = parse_heads(value)
        elif key == "placement":
            options[key] = value
        else:
            try:
                options[key] = int(value)
            except ValueError:
                raise InputError(f"method '{name}': option {key} takes an integer, not '{value}'") from None
    return base, options


def import_config(name: str, default: ImportConfig | None = None) -> ImportConfig:
    """The ImportConfig a kvmap method name stands for (its runner options, such as ``local``, left out).

    A method imports without the model's memory adapter unless its name says ``adapter=1``, so that one
    method name means one thing in every run folder, whatever model was loaded."""
    base, options = parse_method(name)
    options = {k: v for k, v in options.items() if k not in KVMAP_RUNNER_OPTIONS}
    return (default or ImportConfig(adapter=False)).with_options(**{**KVMAP_PRESETS[base], **options})


def uses_adapter(name: str) -> bool:
    """Whether a method answers with the memory adapter on (``kvmap:adapter=1``, ``oracle:adapter=1``)."""
    base, options = parse_method(name)
    return bool(options.get("adapter", 0))


def local_tokens(name: str) -> int | None:
    """A kvmap method's ``local`` option: how many of the most recent context tokens stay in the prompt at
    most (0: none; None, the default: as many as fit the window)."""
    local = parse_method(name)[1].get("local", KVMAP_RUNNER_OPTIONS["local"])
    if local is not None and local < 0:
        raise InputError(f"method '{name}': local takes a token count of 0 or more, not {local}")
    return local


def check_methods(names: list[str]) -> None:
    """InputError unless every name is a method (with valid options) and there is at least one."""
    if not names:
        raise InputError(f"no method given; choose from {', '.join(METHODS)}")
    for name in names:
        base, options = parse_method(name)
        if base in KVMAP_PRESETS:
            try:
                import_config(name)
                local_tokens(name)
                flags = [f for f in ("tail_import", "splice_after_tail", "in_view", "tail_in_memory", "recompute")
                         if options.get(f, 0) not in (0, 1)]
                if flags:
                    raise InputError(f"method '{name}': {flags[0]} is a switch; give {flags[0]}=1 or {flags[0]}=0")
                if base.startswith("kvmap-splice") and "tail_import" in options:
                    raise InputError(f"method '{name}': tail_import is an option of the import methods; a splice "
                                     "method reads its recent context as ordinary context already")
                for option in ("splice_after_tail", "recompute"):
                    if not base.startswith("kvmap-splice") and option in options:
                        raise InputError(f"method '{name}': {option} is an option of the kvmap-splice methods")
                if base == "kvmap-splice-layerwise" and options.get("recompute"):
                    raise InputError(f"method '{name}': recompute=1 needs one choice of memory tokens for all layers; "
                                     "use kvmap-splice-bm25 or kvmap-splice")
                if "bm25_blocks" in options and (base not in ("kvmap", "kvmap-fixed") or options["bm25_blocks"] < 1):
                    raise InputError(f"method '{name}': bm25_blocks=N (N >= 1) is an option of the token-level import "
                                     "(kvmap, kvmap-fixed)")
                if "bm25_stride" in options and not (base == "kvmap-splice-bm25" or "bm25_blocks" in options) \
                        or not 0 < options.get("bm25_stride", 1) <= SPLICE["block_size"]:
                    raise InputError(f"method '{name}': bm25_stride=S (1 <= S <= {SPLICE['block_size']}) is an option of kvmap-splice-bm25 "
                                     "and of bm25_blocks")
                if "tail_in_memory" in options and (base.startswith("kvmap-splice") or "tail_import" in options
                                                    or "in_view" in options):
                    raise InputError(f"method '{name}': tail_in_memory is an option of the token-level import, without "
                                     "tail_import or in_view (the kept context is then memory too, and nothing is gated)")
                if base != "kvmap-splice-bm25" and "in_view" in options and "bm25_blocks" not in options:
                    raise InputError(f"method '{name}': in_view is an option of kvmap-splice-bm25 and of bm25_blocks "
                                     "(BM25 ranks the kept context's text with the memory's)")
            except (ValueError, TypeError) as err:  # e.g. options of two retrieval modes at once
                raise InputError(f"method '{name}': {err}") from None
        elif options.get("adapter", 0) not in (0, 1):
            raise InputError(f"method '{name}': adapter is a switch; give adapter=1 or adapter=0")


@contextlib.contextmanager
def yarn_rope(model, factor: float):
    """Within the block, the model's RoPE is YaRN-scaled by ``factor`` (transformers' implementation)."""
    base = model.model
    old = base.rotary_emb
    if factor <= 1.0:
        yield
        return
    cfg = copy.deepcopy(base.config)
    original = cfg.max_position_embeddings
    cfg.rope_parameters = {**cfg.rope_parameters, "rope_type": "yarn", "factor": float(factor),
                           "original_max_position_embeddings": original}
    cfg.max_position_embeddings = int(original * factor)
    base.rotary_emb = type(old)(cfg).to(next(model.parameters()).dtype)
    try:
        yield
    finally:
        base.rotary_emb = old
