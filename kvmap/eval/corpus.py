"""Build a large memory from a bundled corpus, resumably: the scale benchmark's haystacks.

Corpora:

- ``tales``: the public-domain tales (all collections, in a fixed order), packed into parts of about
  ``part_tokens`` tokens. When the tales run out before ``target_tokens`` (they hold about 1.03M
  tokens), they are read again as the next pass.
- ``filler``: the passkey template's repeated filler sentences (the haystack of the passkey test at
  every length, as in Landmark Attention and InfLLM), in parts of ``part_tokens`` tokens; every
  part is the same text, so a filler memory holds one part's K/V many times over.

Each part is one source (one segment) of the memory. A killed build loses at most the part being
read: a rerun skips every part already in the memory and goes on from there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm


@dataclass
class CorpusPart:
    """One source of the corpus memory: a run of whole tales."""

    source: str
    texts: list[str]
    n_tokens: int


CORPORA = ("tales", "filler")


def corpus_parts(tokenizer, target_tokens: int, part_tokens: int = 32768, corpus: str = "tales") -> list[CorpusPart]:
    """The parts whose tokens first reach ``target_tokens`` (whole parts; the same list every call)."""
    from kvmap.data import tales
    from kvmap.errors import InputError

    if corpus not in CORPORA:
        raise InputError(f"unknown corpus {corpus!r}; choose from {', '.join(CORPORA)}")
    if corpus == "filler":
        return _filler_parts(tokenizer, target_tokens, part_tokens)

    rows = tales()
    lengths = [len(ids) for ids in tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]]
    parts: list[CorpusPart] = []
    total, n_pass = 0, 0
    while total < target_tokens:
        texts, n = [], 0
        for row, length in zip(rows, lengths):
            texts.append(row["text"])
            n += length
            if n >= part_tokens:
                parts.append(CorpusPart(f"tales/pass{n_pass}/part{len(parts):04d}", texts, n))
                total += n
                texts, n = [], 0
                if total >= target_tokens:
                    return parts
        if texts:  # the end of a pass closes its last, shorter part
            parts.append(CorpusPart(f"tales/pass{n_pass}/part{len(parts):04d}", texts, n))
            total += n
        n_pass += 1
    return parts


def _filler_parts(tokenizer, target_tokens: int, part_tokens: int) -> list[CorpusPart]:
    from kvmap.data import passkey_template

    garbage = passkey_template()["garbage_sentence"]
    per_sentence = len(tokenizer(garbage, add_special_tokens=False)["input_ids"])
    text = " ".join([garbage] * (part_tokens // per_sentence + 1))
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    count = -(-target_tokens // n)
    return [CorpusPart(f"filler/part{i:04d}", [text], n) for i in range(count)]


def build_corpus_memory(lm, path: str | Path, target_tokens: int, part_tokens: int = 32768, corpus: str = "tales",
                        reader_config=None, progress: bool = True) -> dict:
    """Read corpus parts into the memory at ``path`` until it holds ``target_tokens``; resumable.

    Returns the memory's size and the ingest speed of the parts read in this call.
    """
    import time

    from kvmap.reader import ReaderConfig, read_into
    from kvmap.stores import Memory

    reader_config = reader_config or ReaderConfig()
    from kvmap.errors import InputError

    memory = Memory.open_or_create(path, lm.model_id, lm.port.layout)
    lm.port.check_memory(memory)
    done = {s["source"] for s in memory.sources()}
    foreign = sorted(s for s in done if not s.startswith(f"{corpus}/") and not s.startswith("needle/"))
    if foreign:  # never add a corpus to a memory that holds the user's own sources
        raise InputError(f"memory {path} holds other sources ({foreign[0]!r}, ...), not only the {corpus} corpus; "
                         "give a new --memory folder")
    parts = corpus_parts(lm.tokenizer, target_tokens, part_tokens, corpus)
    todo = [p for p in parts if p.source not in done]
    read_tokens, began = 0, time.perf_counter()
    bar = tqdm(total=sum(p.n_tokens for p in parts), initial=sum(p.n_tokens for p in parts if p.source in done),
               unit="tok", desc=f"corpus memory {Path(path).name}", disable=not progress, dynamic_ncols=True)
    for part in todo:
        stats = read_into(lm.port, lm.tokenizer, memory, part.source, part.texts, reader_config, progress=False)
        read_tokens += stats.n_tokens
        bar.update(part.n_tokens)
        bar.set_postfix(tok_s=f"{read_tokens / (time.perf_counter() - began):.0f}")
    bar.close()
    seconds = time.perf_counter() - began
    return {"path": str(path), "n_tokens": memory.n_tokens, "n_segments": memory.n_segments,
            "parts_read": len(todo), "tokens_read": read_tokens, "seconds": seconds,
            "ingest_tok_s": read_tokens / seconds if read_tokens else None}
