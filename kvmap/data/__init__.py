"""Data shipped with kvmap (public-domain tales, FairytaleQA, bAbI qa1-qa3, prompt templates); each folder keeps its SOURCE.txt."""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from kvmap.errors import InputError


def data_path(*parts: str) -> Path:
    """Path of a file shipped in ``kvmap/data``."""
    return Path(str(files("kvmap.data").joinpath(*parts)))


def grimm_tales() -> list[dict]:
    """Grimm's Household Tales (Hunt, 1884): dicts with id, number, title, text, n_words."""
    with open(data_path("tales", "grimm_hunt", "grimm_hunt_tales.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def passkey_template() -> dict:
    """The Landmark-Attention passkey prompt strings (see templates/passkey_niah/SOURCE.txt)."""
    with open(data_path("templates", "passkey_niah", "templates.json"), encoding="utf-8") as f:
        return json.load(f)["landmark_attention_passkey"]


# Tale collections: short name (as in the ``collection`` column of fairytaleqa/overlap_with_tales.tsv) -> (folder, jsonl).
TALE_COLLECTIONS: dict[str, tuple[str, str]] = {
    "grimm_hunt": ("grimm_hunt", "grimm_hunt_tales.jsonl"),
    "andersen": ("andersen_gutenberg27200", "andersen_tales.jsonl"),
    "blue_fairy_book": ("lang_blue_fairy_book_gutenberg503", "blue_fairy_book_tales.jsonl"),
    "perrault": ("perrault_gutenberg29021", "perrault_tales.jsonl"),
    "aesop": ("aesop_vernon_jones", "aesop_vernon_jones_fables.jsonl"),
}

BABI_TASKS = (1, 2, 3)  # the bAbI tasks shipped in kvmap/data/babi/en


def _read_jsonl(path: Path) -> list[dict]:
    """JSON objects of a .jsonl file (blank lines skipped); any problem is an InputError naming the file."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open  # the train split ships gzipped (5.6 MB raw)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; give a .jsonl file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror}); check its permissions") from None
    except (gzip.BadGzipFile, EOFError) as err:
        raise InputError(f"{path}: damaged gzip file ({err}); give a .jsonl or .jsonl.gz file") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (offset {err.start}); give a UTF-8 .jsonl file") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not JSON lines ({err.msg} at line {err.lineno}); give one JSON object per line") from None
    if not all(isinstance(r, dict) for r in rows):
        raise InputError(f"{path}: every line must be a JSON object")
    return rows


def tales(collections: Sequence[str] | None = None) -> list[dict]:
    """Public-domain tales of all (or the named) collections, in ``TALE_COLLECTIONS`` order.

    ``collections`` takes short names (``grimm_hunt``, ``andersen``, ``blue_fairy_book``, ``perrault``, ``aesop``)
    or folder names under ``tales/``. Each dict: ``{"id", "collection", "title", "text", "n_words", ...}`` plus the
    file's extra fields (``number`` for Grimm, ``title_raw`` for Aesop); ``id`` is the ``tale_id`` of
    fairytaleqa/overlap_with_tales.tsv and ``collection`` the short name.
    """
    folder_to_name = {folder: name for name, (folder, _) in TALE_COLLECTIONS.items()}
    if collections is None:
        names = list(TALE_COLLECTIONS)
    else:
        if isinstance(collections, str):
            collections = [collections]
        names = []
        for c in collections:
            name = folder_to_name.get(c, c)
            if name not in TALE_COLLECTIONS:
                raise InputError(f"unknown tale collection {c!r}; choose from: {', '.join(TALE_COLLECTIONS)}")
            if name not in names:
                names.append(name)
    out: list[dict] = []
    for name in names:
        folder, fname = TALE_COLLECTIONS[name]
        for row in _read_jsonl(data_path("tales", folder, fname)):
            text = row["text"]
            out.append({"id": row["id"], "collection": name, "title": row["title"], "text": text,
                        "n_words": row.get("n_words", len(text.split())),
                        **{k: v for k, v in row.items() if k not in ("id", "title", "text", "n_words")}})
    return out


def fairytaleqa(split: str = "val", path: str | Path | None = None) -> list[dict]:
    """FairytaleQA stories (Xu et al. 2022), one dict per story as in the jsonl.

    Each story: ``{"story", "origin", "split", "sections": [{"section", "text"}], "questions": [{"question_id",
    "local_or_sum", "cor_section", "attribute1", "attribute2", "question", "ex_or_im1", "ex_or_im2",
    "answers_annotator1": [...], "answers_annotator2": [...]}]}``. Shipped splits: ``train``, ``val``.
    ``path`` reads any file in the same format instead. A missing, unreadable or malformed file raises InputError.
    """
    if path is None:
        p = data_path("fairytaleqa", f"fairytaleqa_{split}.jsonl")
        if not p.is_file() and p.with_suffix(".jsonl.gz").is_file():
            p = p.with_suffix(".jsonl.gz")
        if not p.is_file():
            raise InputError(f"{p}: no such file; FairytaleQA splits shipped: train, val (or pass path=)")
    else:
        p = Path(path)
    rows = _read_jsonl(p)
    if not rows:
        raise InputError(f"{p}: no stories in the file; give a FairytaleQA .jsonl file")
    if not all("story" in r and "sections" in r for r in rows):
        raise InputError(f"{p}: not FairytaleQA stories (each line needs 'story' and 'sections')")
    return rows


def fairytaleqa_overlap() -> dict[str, set[str]]:
    """FairytaleQA story name -> ids of shipped tales (see ``tales()``) that hold the same story.

    From fairytaleqa/overlap_with_tales.tsv (all FairytaleQA splits); use it to keep a story's own text out of
    a haystack built from ``tales()``.
    """
    out: dict[str, set[str]] = {}
    with open(data_path("fairytaleqa", "overlap_with_tales.tsv"), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            out.setdefault(row["fairytaleqa_story"], set()).add(row["tale_id"])
    return out


def babi(task: int, split: str = "test") -> list[dict]:
    """bAbI v1.1 (English, 1k) samples of task ``qa{task}`` (1-3 shipped), one per question, in file order.

    Each sample: ``{"facts": [str, ...], "question": str, "answer": str, "supporting": [int, ...]}``; ``facts`` are
    the story's statements before the question (line numbers and earlier questions dropped), ``supporting``
    indexes into ``facts``. A line numbered 1 starts a new story.
    """
    if task not in BABI_TASKS:
        raise InputError(f"bAbI task {task!r} is not shipped; choose one of {', '.join(map(str, BABI_TASKS))}")
    if split not in ("train", "test"):
        raise InputError(f"bAbI split {split!r}: choose train or test")
    (p,) = sorted(data_path("babi", "en").glob(f"qa{task}_*_{split}.txt"))
    samples: list[dict] = []
    facts: list[str] = []
    index: dict[int, int] = {}  # line number in the story -> index in facts
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            num, _, rest = line.rstrip("\n").partition(" ")
            n = int(num)
            if n == 1:
                facts, index = [], {}
            if "\t" in rest:
                question, answer, support = rest.split("\t")
                samples.append({"facts": list(facts), "question": question.strip(), "answer": answer.strip(),
                                "supporting": [index[int(s)] for s in support.split()]})
            else:
                index[n] = len(facts)
                facts.append(rest.strip())
    return samples


def babilong_prompts() -> dict:
    """BABILong prompt templates: TASK_TEMPLATE, USER_TEMPLATE, DEFAULT_TEMPLATE, CUSTOM_SYSTEM_PROMPTS,
    DEFAULT_PROMPTS[qa1..qa20] = {instruction, examples, post_prompt} (see templates/babilong/SOURCE.txt)."""
    with open(data_path("templates", "babilong", "babilong_prompts.json"), encoding="utf-8") as f:
        return json.load(f)


def niah_template() -> dict:
    """The RULER needle-in-a-haystack prompt strings ("ruler_niah" of templates/passkey_niah/templates.json)."""
    with open(data_path("templates", "passkey_niah", "templates.json"), encoding="utf-8") as f:
        return json.load(f)["ruler_niah"]
