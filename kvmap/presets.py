"""Named import settings, in one place for the CLI, the evaluation methods, the benchmarks and the README.

Each preset is a set of flat options (:data:`kvmap.ports.OPTION_NAMES`, the ``kvmap:KEY=VALUE``
vocabulary), turned into an :class:`~kvmap.ports.ImportConfig` by :func:`preset`. The numbers behind
each choice are in RESULTS.md.
"""
from __future__ import annotations

from kvmap.errors import InputError
from kvmap.ports import ImportConfig

TOKEN_IMPORT: dict = {}
"""The seed's token-level import: top-16 per query at every forward, ordered placement, distance 4096."""

SCALE_1M: dict = {"reuse": 256, "reuse_next": 8, "reuse_next_best": 16}
"""The setting chosen for a 1M-token memory (`kvmap bench scale`'s default): the prompt's exact streamed
search keeps 256 candidates per query, plus the 8 followers of each query's 16 best; decode-step recall
0.956 on real K/V, 1.24x no-memory decode (RESULTS.md, scale section)."""

SPLICE: dict = {"block_size": 64, "n_blocks": 8, "placement": "contiguous"}
"""Block settings of `kvmap ask`'s default splice mode and the demo: the 8 blocks of 64 tokens that BM25
(or the question's queries) rank best, their stored K/V spliced into the prompt."""

RETELL_SPLICE: dict = {"block_size": 128, "n_blocks": 4, "placement": "contiguous", "adapter": False}
"""Splice settings the demo retells a tale with ("Tell me the story of ..."): the 4 blocks of 128 tokens BM25 ranks
best, read by the base model (a splice adapter, trained on short answers, cut retellings short). Chosen on dev tales,
not the three the demo reports (``benchmarks/retell_dev.py``, runs/demo/retell-dev.json)."""

BM25_IMPORT: dict = {"distance": 256}
"""Token-level import settings of `kvmap ask --mode import-bm25`: the seed's import, with the memories placed
256 positions behind each query instead of 4096 (NIAH multikey at 16k, dev: 8/10 against 5/10 at 4096)."""

BM25_GATE: dict = {"n_blocks": 2, "block_size": 64, "stride": 32}
"""The passages `--mode import-bm25` imports from: the 2 blocks of 64 tokens, one starting every 32, that
BM25 ranks best for the question (:func:`kvmap.splice.bm25_memory`); chosen on NIAH dev (RESULTS.md)."""

PRESETS: dict[str, dict] = {"token-import": TOKEN_IMPORT, "scale-1m": SCALE_1M, "splice": SPLICE,
                            "retell": RETELL_SPLICE, "bm25-import": BM25_IMPORT}


def preset(name: str, **overrides) -> ImportConfig:
    """The ImportConfig of preset ``name`` with flat ``overrides`` applied."""
    if name not in PRESETS:
        raise InputError(f"unknown import preset {name!r}; choose from {', '.join(PRESETS)}")
    return ImportConfig.from_options(**{**PRESETS[name], **overrides})
