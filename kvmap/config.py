"""Import settings: :class:`ImportConfig` and its two retrieval modes, validated when built.

Token retrieval (the seed's method), block retrieval and retrieval reuse are separate settings, so the
attention path is decided once, when a port attaches, not re-derived from a bag of flags per layer and
token. Flat option names (``kvmap:reuse=256:reuse_next=8``) stay the vocabulary of method strings, the
CLI and run files: :meth:`ImportConfig.from_options` and :meth:`ImportConfig.options` convert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvmap.errors import InputError


PLACEMENTS = ("fixed", "ordered", "true", "contiguous")


def _at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if value < low:
        raise InputError(f"{name} must be {low} or more, got {value}")


@dataclass(frozen=True)
class BlockRetrieval:
    """Block retrieval (InfLLM-style): blocks of consecutive memory tokens, represented by their mean key,
    chosen per (layer, KV head) by the prompt's queries and kept while the answer is decoded; every query
    then attends to all tokens of the chosen blocks."""

    size: int = 64
    """Memory tokens per block."""
    n_blocks: int = 8
    """Blocks chosen per (layer, KV head)."""
    neighbours: int = 0
    """Also import this many blocks either side of each chosen one (EM-LLM's contiguity buffer); the
    total stays ``n_blocks * (1 + 2 * neighbours + following)`` blocks."""
    following: int = 0
    """Also import this many blocks *after* each chosen one: text read on from where the best match starts
    (a tale from the block holding its title), where ``neighbours`` centres on the match."""
    select_last: int = 0
    """Only the queries of the prompt's last ``select_last`` tokens choose (e.g. the question's); 0: all."""
    fixed: tuple[int, ...] | None = None
    """Blocks chosen outside attention (e.g. by BM25 on the blocks' text): these block indices, for every
    layer and KV head, instead of the attention-score choice."""

    def __post_init__(self) -> None:
        _at_least("block_size", self.size, 1)
        _at_least("n_blocks", self.n_blocks, 1)
        _at_least("neighbours", self.neighbours, 0)
        _at_least("following", self.following, 0)
        _at_least("select_last", self.select_last, 0)
        if self.fixed is not None:
            object.__setattr__(self, "fixed", tuple(self.fixed))
            if not self.fixed:
                        raise InputError("fixed_blocks names no block; give at least one block index or None")
            for b in self.fixed:
                _at_least("fixed_blocks entries", b, 0)


@dataclass(frozen=True)
class RetrievalReuse:
    """Retrieval reuse, for large memories: the prompt's queries each find their ``candidates`` best memories
    by exact search streamed over the whole memory (:mod:`kvmap.stores.candidates`); the union per (layer,
    KV head) is kept, and every later forward takes its exact top-k among it. Decode cost then no longer
    grows with the memory; the prompt's forward reads every key once."""

    candidates: int = 256
    """Memories per choosing query kept as candidates (``reuse=`` in method strings)."""
    next: int = 0
    """Also keep the memories that follow each candidate in reading order (what came right after a match,
    e.g. the digits after "the pass key is")."""
    next_best: int = 0
    """With ``next``: only each query's ``next_best`` best candidates bring their followers (0: all)."""
    blocks: int = 0
    """0: candidates by exact search. > 0: instead the tokens of this many blocks per (layer, KV head),
    ranked by block key bounds (Quest-style): reads far less, but measured recall is much lower."""
    block_size: int = 32
    """Tokens per block for ``blocks``."""
    select_last: int = 0
    """Only the queries of the prompt's last ``select_last`` tokens choose the candidates; 0: all."""
    probe: int = 0
    """0: exact candidates read every key. > 0: in segments with a query-aware cluster index
    (:mod:`kvmap.stores.clusters`), only the keys of each choosing query's ``probe`` best clusters are
    read and scored exactly (``reuse_probe=``): the prompt's search no longer reads the whole memory."""

    def __post_init__(self) -> None:
        _at_least("reuse", self.candidates, 1)
        for name, value in (("reuse_next", self.next), ("reuse_next_best", self.next_best),
                            ("reuse_blocks", self.blocks), ("select_last", self.select_last),
                            ("reuse_probe", self.probe)):
            _at_least(name, value, 0)
        _at_least("reuse_block_size", self.block_size, 1)


_TOKEN_OPTIONS = ("top_k", "distance", "layers", "placement", "search_chunk", "memory_cap", "heads", "adapter")
_BLOCK_OPTIONS = {"block_size": "size", "n_blocks": "n_blocks", "neighbours": "neighbours",
                  "following": "following", "fixed_blocks": "fixed"}
_REUSE_OPTIONS = {"reuse": "candidates", "reuse_next": "next", "reuse_next_best": "next_best",
                  "reuse_blocks": "blocks", "reuse_block_size": "block_size", "reuse_probe": "probe"}
OPTION_NAMES = (*_TOKEN_OPTIONS, *_BLOCK_OPTIONS, "select_last", *_REUSE_OPTIONS)
"""The flat option names of :meth:`ImportConfig.from_options` (method strings ``kvmap:KEY=VALUE``, run files)."""


@dataclass(frozen=True)
class ImportConfig:
    """How memories are imported into attention: one of three retrieval modes, chosen once per attach.

    - token retrieval (``blocks`` and ``reuse`` both None, the seed's method): every query's top-k memory
      tokens, searched in the memory's store at every forward;
    - block retrieval (``blocks``): whole blocks chosen by the prompt's queries, kept while decoding;
    - retrieval reuse (``reuse``): token retrieval among candidates found once by the prompt's queries.

    Defaults were chosen by measurement (see README). Build from flat option names (method strings, the
    CLI, run files) with :meth:`from_options`; :meth:`options` gives them back.
    """

    top_k: int = 16
    """Memory tokens retrieved per (layer, query head, query token) (token retrieval and reuse)."""
    distance: int = 4096
    """Queries are rotated to this position; memories sit at position 0, so every memory looks
    ``distance`` tokens behind the current token."""
    layers: tuple[int, ...] | None = None
    """Layers that import memories; ``None`` means all."""
    placement: Literal["fixed", "ordered", "true", "contiguous"] = "ordered"
    """``fixed``: every memory at position 0, queries at ``distance`` (the seed's memory map).
    ``ordered``: as fixed, but one query's k memories keep their reading order: the newest sits
    ``distance`` behind the query, each older one a position further (contiguous, Landmark-style).
    ``true``: memories at the token offset they were read at (only meaningful for parity tests).
    ``contiguous`` (block retrieval only): the selected blocks, in reading order, fill the positions
    just before the prompt's first token (Landmark-Attention style); queries keep their positions."""
    blocks: BlockRetrieval | None = None
    """Block retrieval settings; None: token-level retrieval."""
    reuse: RetrievalReuse | None = None
    """Retrieval reuse settings; None: search the store at every forward."""
    search_chunk: int = 256
    """Query vectors searched per call, bounding the (queries x memory) score matrix."""
    heads: tuple[tuple[int, int], ...] | None = None
    """Query heads that import, as (layer, query head) pairs (Retrieval-Head / DuoAttention style: only the
    heads measured to retrieve read memories, the others keep their own context); ``None``: every head of
    every importing layer. A layer with none of its heads listed does not import."""
    memory_cap: int = 100
    """The largest share of a query's attention, in percent, that imported memories may take (token
    retrieval and reuse): above it their weights are scaled down to the cap and the local ones up, so
    that a head cannot leave its own context for memories entirely. 100: no cap."""
    adapter: bool = True
    """Switch the model's memory adapter on while importing (:mod:`kvmap.models.adapter`; nothing happens for a
    model without one). ``adapter=0`` imports with the base model, so one evaluation run can pair both."""

    def __post_init__(self) -> None:
        _at_least("top_k", self.top_k, 1)
        if self.adapter not in (0, 1):  # True/False, or 0/1 from a method string (kvmap:adapter=0)
            raise InputError(f"adapter is 1 (use the model's memory adapter) or 0 (import with the base model), "
                             f"got {self.adapter!r}")
        object.__setattr__(self, "adapter", bool(self.adapter))
        _at_least("memory_cap", self.memory_cap, 1)
        if self.memory_cap > 100:
            raise InputError(f"memory_cap is a percentage of attention, 1 to 100, got {self.memory_cap}")
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(sorted({(int(l), int(h)) for l, h in self.heads})))
            for layer, head in self.heads:
                _at_least("heads entries", layer, 0)
                _at_least("heads entries", head, 0)
            if self.blocks is not None:
                raise InputError("heads applies to token retrieval and reuse, not to block retrieval")
        if self.memory_cap < 100 and self.blocks is not None:
            raise InputError("memory_cap applies to token retrieval and reuse, not to block retrieval")
        _at_least("distance", self.distance, 0)
        _at_least("search_chunk", self.search_chunk, 1)
        if self.placement not in PLACEMENTS:
            raise InputError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))  # () imports in no layer
            for layer in self.layers:
                _at_least("layers entries", layer, 0)
        if self.blocks is not None and self.reuse is not None:
            raise InputError("block retrieval and retrieval reuse exclude each other; set block_size or reuse, not both")
        if self.placement == "contiguous" and self.blocks is None:
            raise InputError("placement contiguous is for block retrieval only; set block_size or another placement")

    @property
    def mode(self) -> Literal["tokens", "blocks", "reuse"]:
        """The retrieval mode: ``tokens`` (the seed's), ``blocks`` or ``reuse``."""
        return "blocks" if self.blocks is not None else "reuse" if self.reuse is not None else "tokens"

    @classmethod
    def from_options(cls, **options) -> "ImportConfig":
        """An ImportConfig from flat option names (:data:`OPTION_NAMES`).

        ``block_size > 0`` selects block retrieval (``n_blocks``, ``neighbours``, ``following``, ``fixed_blocks``,
        ``select_last`` apply to it), ``reuse > 0`` retrieval reuse (``reuse_*`` and ``select_last``); a
        block or reuse option without its mode is an error, as is an unknown name.
        """
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise InputError(f"unknown import option(s) {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}")
        block = {v: options[k] for k, v in _BLOCK_OPTIONS.items() if k in options}
        reuse = {v: options[k] for k, v in _REUSE_OPTIONS.items() if k in options}
        select_last = options.get("select_last", 0)
        use_blocks = block.get("size", 0) not in (0, None)
        use_reuse = reuse.get("candidates", 0) not in (0, None)
        if use_blocks and use_reuse:
            raise InputError("block retrieval and retrieval reuse exclude each other; set block_size or reuse, not both")
        block_defaults = {"n_blocks": 8, "neighbours": 0, "following": 0, "fixed": None}
        if not use_blocks and any(block.get(k, v) != v for k, v in block_defaults.items()):
            raise InputError("n_blocks, neighbours, following and fixed_blocks need block retrieval; set block_size too")
        reuse_defaults = {"next": 0, "next_best": 0, "blocks": 0, "block_size": 32, "probe": 0}
        if not use_reuse and any(reuse.get(k, v) != v for k, v in reuse_defaults.items()):
            raise InputError("reuse_next, reuse_next_best, reuse_blocks and reuse_probe need retrieval reuse; "
                             "set reuse too")
        if reuse.get("blocks") and reuse.get("probe"):
            raise InputError("reuse_blocks and reuse_probe are two ways to pick candidates; set one of them")
        if select_last and not (use_blocks or use_reuse):
            raise InputError("select_last needs block retrieval or retrieval reuse; set block_size or reuse too")
        block.pop("size", None)
        return cls(
            **{k: options[k] for k in _TOKEN_OPTIONS if k in options},
            blocks=BlockRetrieval(size=options["block_size"], **block, select_last=select_last) if use_blocks else None,
            reuse=RetrievalReuse(**reuse, select_last=select_last) if use_reuse else None,
        )

    def with_options(self, **options) -> "ImportConfig":
        """This config with some flat options changed (``kvmap-block:n_blocks=16`` on a preset)."""
        return ImportConfig.from_options(**{**self.options(), **options})

    def options(self) -> dict:
        """The flat options this config stands for (every name of :data:`OPTION_NAMES`, 0 where a mode is off;
        ``memory_cap``, ``heads``, ``reuse_probe`` and ``following`` only when set, so that configs written before they existed still compare equal)."""
        blocks, reuse = self.blocks, self.reuse
        return {
            "top_k": self.top_k, "distance": self.distance, "layers": self.layers, "placement": self.placement,
            "block_size": blocks.size if blocks else 0, "n_blocks": blocks.n_blocks if blocks else 8,
            "neighbours": blocks.neighbours if blocks else 0,
            "select_last": (blocks or reuse).select_last if (blocks or reuse) else 0,
            "fixed_blocks": blocks.fixed if blocks else None,
            "reuse": reuse.candidates if reuse else 0, "reuse_next": reuse.next if reuse else 0,
            "reuse_next_best": reuse.next_best if reuse else 0, "reuse_blocks": reuse.blocks if reuse else 0,
            "reuse_block_size": reuse.block_size if reuse else 32, "search_chunk": self.search_chunk,
        } | ({"memory_cap": self.memory_cap} if self.memory_cap != 100 else {}) \
            | ({"reuse_probe": reuse.probe} if reuse and reuse.probe else {}) \
            | ({"adapter": False} if not self.adapter else {}) \
            | ({"heads": self.heads} if self.heads is not None else {}) \
            | ({"following": blocks.following} if blocks and blocks.following else {})  # run files before them lack these


def parse_layers(text: str) -> tuple[int, ...]:
    """``"0-14"``, ``"0-28/2"`` (every second), ``"3+7+20-29"`` -> the sorted layer indices (InputError if malformed)."""
    layers: set[int] = set()
    try:
        for part in text.split("+"):
            span, _, step = part.partition("/")
            a, dash, b = span.partition("-")
            layers.update(range(int(a), int(b) + 1, int(step or 1)) if dash else [int(a)])
    except ValueError:
        raise InputError(f"layers '{text}' is not a layer list; write e.g. 0-14, 0-28/2 or 3+7+20-29") from None
    if not layers:
        raise InputError(f"layers '{text}' names no layer; write e.g. 0-14, 0-28/2 or 3+7+20-29")
    return tuple(sorted(layers))


def parse_heads(text: str) -> tuple[tuple[int, int], ...]:
    """``"17.3+20.5"`` -> ((17, 3), (20, 5)): (layer, query head) pairs (InputError if malformed)."""
    try:
        pairs = [tuple(int(x) for x in part.split(".")) for part in text.split("+")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise InputError(f"heads '{text}' is not a head list; write LAYER.HEAD pairs joined by +, e.g. 17.3+20.5")
    return tuple(sorted(set(pairs)))


def format_heads(heads: tuple[tuple[int, int], ...] | None) -> str:
    """Inverse of :func:`parse_heads`; ``None`` -> ``"all"``."""
    return "all" if heads is None else "+".join(f"{layer}.{head}" for layer, head in heads)


def format_layers(layers: tuple[int, ...] | None) -> str:
    """Inverse of :func:`parse_layers` for display: ``(0, 2, ..., 28)`` -> ``"0-28/2"``; ``None`` -> ``"all"``."""
    if layers is None:
        return "all"
    steps = {b - a for a, b in zip(layers, layers[1:])}
    if len(layers) > 2 and len(steps) == 1:
        step = steps.pop()
        return f"{layers[0]}-{layers[-1]}" + (f"/{step}" if step > 1 else "")
    return "+".join(str(x) for x in layers)
