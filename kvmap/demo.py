"""The fairy-tale demo: Grimm tales go into memory, questions come out answered from it.

The memory is built once (about 60k tokens, far beyond SmolLM2's 8k window) and reused. Each
question is answered four ways, and the tales the memories came from are shown: "with memory" is
``kvmap ask``'s default mode (the memory blocks BM25 ranks best for the question have their stored
K/V spliced into the prompt, ``kvmap.splice``), "without memory" the same model alone,
"token-level import" the seed's method, and "BM25-gated import" the seed's method searching only the 2 blocks
BM25 ranks best (``--mode import-bm25``). A memory adapter given with ``--adapter`` acts in the ways it was
trained for: a splice adapter (``kvmap finetune --mode splice``) in "with memory", an import adapter in the
two import ways.
The questions were picked among those SmolLM2-135M answers correctly when the tale itself is in its
prompt (see README, "Demo"). Then three tales are retold ("Tell me the story of ...", the seed's
other experiment), scored by ROUGE-L against the tale's opening, with and without memory; the retelling
splices the blocks of :data:`kvmap.presets.RETELL_SPLICE`, read by the base model, as chosen on other tales.
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


def build_memory(folder: Path, n_tales: int, rebuild: bool, adapter: str | None = None):
    """Open the demo memory, reading the first ``n_tales`` Grimm tales that are not in it yet (the memory
    adapter, if given, is loaded but never acts while reading)."""
    from kvmap.stores import Memory

    lm = load_model(adapter=adapter)
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


RETELL = ("The Frog-King, or Iron Henry", "The Fisherman and His Wife", "The Bremen Town-Musicians")
"""Tales the demo asks to be retold (the seed paper's other experiment: "Tell me the story of ...")."""


def retell_score(text: str, tale: dict, opening_words: int = 150) -> float:
    """ROUGE-L F1 of a retelling against the tale's first ``opening_words`` words."""
    from rouge_score import rouge_scorer

    opening = " ".join(tale["text"].split()[:opening_words])
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(opening, text)["rougeL"].fmeasure


def tuned_mode(adapter: str | None) -> str | None:
    """How a memory adapter was trained to read memories: ``splice`` or ``import`` (None without an adapter;
    adapters from before ``--mode`` were import adapters)."""
    if not adapter:
        return None
    from kvmap.models.adapter import read_info

    return read_info(adapter).training.get("data", {}).get("mode", "import")


def _answers(lm, port, memory, question: str, tuned: str | None) -> dict:
    """The question answered four ways: the best mode (splice), no memory, the seed's token-level import, and
    that import among the BM25-chosen blocks only; the adapter (``tuned``: how it was trained) acts in its own."""
    imported = {"adapter": tuned == "import"}
    return {"with memory": ask(lm, question, memory, preset("splice", adapter=tuned == "splice"), max_new_tokens=20,
                               port=port),
            "without memory": ask(lm, question, None, max_new_tokens=20, port=port),
            "token-level import": ask(lm, question, memory, preset("token-import", **imported), max_new_tokens=20,
                                      port=port, mode="import"),
            "BM25-gated import": ask(lm, question, memory, preset("bm25-import", **imported), max_new_tokens=20,
                                     port=port, mode="import-bm25")}


TUNED_WAY = {"splice": "with memory", "import": "token-level import"}
"""The answer way each kind of adapter acts in (the BM25-gated import also takes an import adapter)."""


def _retell(lm, port, memory, n_tales: int) -> list[tuple[str, float, float]]:
    """ROUGE-L of "Tell me the story of ..." against the tale's opening, with memory (the ``retell`` splice
    preset) and without."""
    tales = {t["title"]: t for t in grimm_tales()[:n_tales]}
    out = []
    for title in [t for t in RETELL if t in tales]:
        question = f"Tell me the story of {title}."
        with_mem = ask(lm, question, memory, preset("retell"), max_new_tokens=150, port=port).text
        without = ask(lm, question, None, max_new_tokens=150, port=port).text
        out.append((title, retell_score(with_mem, tales[title]), retell_score(without, tales[title])))
    return out


def run_demo(memory_dir: str | None = None, n_tales: int = 28, rebuild: bool = False, adapter: str | None = None,
             record: str | None = None) -> int:
    """Build (or reuse) the tale memory; answer the demo questions with memory (the best mode), without it and
    with the seed's token-level import (each with ``adapter`` where it was trained for it); then retell three tales. ``record``:
    a JSON file for every answer and score, so that RESULTS.md quotes the demo from a run file."""
    began = time.perf_counter()
    folder = Path(memory_dir) if memory_dir else cache_dir() / "demo-memory"
    lm, port, memory = build_memory(folder, n_tales, rebuild, adapter)
    print(f"\nMemory: {memory.n_tokens} tokens from {len(memory.sources())} tales "
          f"(SmolLM2's window is {lm.model.config.max_position_embeddings} tokens).\n")
    tuned = tuned_mode(adapter)
    hits = {"with memory": 0, "without memory": 0, "token-level import": 0, "BM25-gated import": 0}
    log: list[dict] = []
    for question, expected in QUESTIONS:
        answers = _answers(lm, port, memory, question, tuned)
        print(f"Q: {question}")
        for name, answer in answers.items():
            ok = any(w in answer.text.lower() for w in expected)
            hits[name] += ok
            log.append({"question": question, "way": name, "answer": answer.text, "correct": ok})
            label = name + (" (adapter)" if tuned and name == TUNED_WAY[tuned] or tuned == "import" and
                            name == "BM25-gated import" else "")
            print(f"  {label:26s} [{'ok' if ok else '--'}] {answer.text}")
        top = list(answers["with memory"].source_shares.items())[:3]
        print("  memories came from: " + ", ".join(f"{src} ({share:.0%})" for src, share in top) + "\n")
    n = len(QUESTIONS)
    print("Answers containing the expected words: " + ", ".join(f"{k} {v}/{n}" for k, v in hits.items()) + ".")
    print("\nRetelling (ROUGE-L F1 against the tale's first 150 words):")
    retold = _retell(lm, port, memory, n_tales)
    for title, with_mem, without in retold:
        print(f"  {title:38s} with memory {with_mem:.3f}, without {without:.3f}")
    seconds = time.perf_counter() - began
    print(f"({seconds:.0f}s in all)")
    if record:
        _record(Path(record), memory, adapter, hits, log, retold, seconds)
    return 0


def _record(path: Path, memory, adapter: str | None, hits: dict, log: list[dict], retold: list, seconds: float) -> None:
    from statistics import mean

    from kvmap.fileio import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {
        "memory_tokens": memory.n_tokens, "tales": len(memory.sources()), "adapter": adapter,
        "questions": len(QUESTIONS), "correct": {k.lower().replace(" ", "_").replace("-", "_"): v for k, v in hits.items()},
        "answers": log, "seconds": seconds,
        "retelling": {"tales": [{"title": t, "with_memory": w, "without_memory": wo} for t, w, wo in retold],
                      "mean_with_memory": mean(w for _, w, _ in retold) if retold else None,
                      "mean_without_memory": mean(wo for _, _, wo in retold) if retold else None}}, indent=1)
