"""The fairy-tale demo: Grimm tales go into memory, questions come out answered from it.

The memory is built once (about 60k tokens, far beyond SmolLM2's 8k window) and reused. Each
question is answered twice, with and without memory, and the tales the imported memories came
from are shown. "With memory" is ``kvmap ask``'s default mode: the memory blocks BM25 ranks best
for the question have their stored K/V spliced into the prompt (``kvmap.splice``); the seed's
token-level import answered none of these questions (README, "Results"). The questions were picked among those SmolLM2-135M answers correctly when the
tale itself is in its prompt (see README, "Demo").
"""
from __future__ import annotations

import time
from pathlib import Path

from kvmap.answer import ask
from kvmap.data import grimm_tales
from kvmap.models.loading import cache_dir, load_model
from kvmap.presets import preset
from kvmap.reader import read_into

# (question, words one of which a correct answer contains). Picked from 17 candidates as the ones
# SmolLM2-135M answered correctly with the whole tale in its prompt (benchmarks/demo_oracle.json);
# no expected word appears in its question.
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("Who brought the golden ball back up from the well?", ("frog",)),
    ("What did the cat and the mouse buy for the winter?", ("fat",)),
    ("What did the fisherman catch?", ("flounder",)),
    ("How many did the tailor kill at one blow?", ("seven", "7")),
    ("What was the bird's work every day, in the house it shared with a mouse and a sausage?", ("wood",)),
    ("Which town were the donkey, dog, cat and cock going to?", ("bremen",)),
]


def source_name(tale: dict) -> str:
    return f"{tale['id']} {tale['title']}"


def build_memory(folder: Path, n_tales: int, rebuild: bool):
    """Open the demo memory, reading the first ``n_tales`` Grimm tales that are not in it yet."""
    from kvmap.stores import Memory

    lm = load_model()
    port = lm.port
    if rebuild and folder.exists():
        import shutil

        shutil.rmtree(folder)
    memory = Memory.open_or_create(folder, lm.model_id, port.layout)
    have = {s["source"] for s in memory.sources()}
    todo = [t for t in grimm_tales()[:n_tales] if source_name(t) not in have]
    if todo:
        print(f"Reading {len(todo)} Grimm tales into {folder} (once; later runs reuse it)...")
    for tale in todo:  # one source per tale, each committed atomically: an interrupted build resumes
        read_into(port, lm.tokenizer, memory, source_name(tale), [tale["title"] + "\n\n" + tale["text"]])
    return lm, port, memory


def run_demo(memory_dir: str | None = None, n_tales: int = 28, rebuild: bool = False) -> int:
    """Build (or reuse) the tale memory and answer the demo questions with and without it."""
    began = time.perf_counter()
    folder = Path(memory_dir) if memory_dir else cache_dir() / "demo-memory"
    lm, port, memory = build_memory(folder, n_tales, rebuild)
    print(f"\nMemory: {memory.n_tokens} tokens from {len(memory.sources())} tales "
          f"(SmolLM2's window is {lm.model.config.max_position_embeddings} tokens).\n")
    config = preset("splice")  # what `kvmap ask` uses by default
    hits_with = hits_without = 0
    for question, expected in QUESTIONS:
        with_mem = ask(lm, question, memory, config, max_new_tokens=20, port=port)
        without = ask(lm, question, None, max_new_tokens=20, port=port)
        ok_with = any(w in with_mem.text.lower() for w in expected)
        ok_without = any(w in without.text.lower() for w in expected)
        hits_with += ok_with
        hits_without += ok_without
        print(f"Q: {question}")
        print(f"  with memory    [{'ok' if ok_with else '--'}] {with_mem.text}")
        print(f"  without memory [{'ok' if ok_without else '--'}] {without.text}")
        top = list(with_mem.source_shares.items())[:3]
        print("  memories came from: " + ", ".join(f"{src} ({share:.0%})" for src, share in top) + "\n")
    n = len(QUESTIONS)
    print(f"Answers containing the expected words: with memory {hits_with}/{n}, without {hits_without}/{n} "
          f"({time.perf_counter() - began:.0f}s in all).")
    return 0
