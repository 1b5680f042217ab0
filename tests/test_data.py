"""Shipped evaluation data and its loaders (no model; fast)."""
from __future__ import annotations

import csv

import pytest

from kvmap.data import (TALE_COLLECTIONS, babi, babilong_prompts, data_path, fairytaleqa, fairytaleqa_overlap,
                        niah_template, tales)
from kvmap.errors import InputError


def test_tales_all_collections():
    ts = tales()
    counts = {name: sum(t["collection"] == name for t in ts) for name in TALE_COLLECTIONS}
    assert counts == {"grimm_hunt": 211, "andersen": 127, "blue_fairy_book": 37, "perrault": 10, "aesop": 284}
    assert len({t["id"] for t in ts}) == len(ts)
    for t in ts:
        assert {"id", "collection", "title", "text", "n_words"} <= t.keys()
        assert t["title"] and t["text"].strip() and t["n_words"] > 0


def test_tales_named_collections():
    assert {t["collection"] for t in tales(["perrault", "aesop_vernon_jones"])} == {"perrault", "aesop"}
    assert len(tales(["perrault"])) == 10
    assert tales(["grimm_hunt"])[0]["id"] == "KHM-1"
    with pytest.raises(InputError, match="unknown tale collection"):
        tales(["nope"])


def test_fairytaleqa_splits():
    val, train = fairytaleqa(), fairytaleqa("train")
    assert (len(val), len(train)) == (23, 232)
    assert sum(len(s["questions"]) for s in val) == 1025
    assert sum(len(s["questions"]) for s in train) == 8548
    s = val[0]
    assert s["split"] == "val" and s["sections"][0]["text"] and s["questions"][0]["question"]
    assert isinstance(s["questions"][0]["answers_annotator1"], list)


def test_fairytaleqa_path(tmp_path):
    p = tmp_path / "one.jsonl"
    p.write_text(data_path("fairytaleqa", "fairytaleqa_val.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n",
                 encoding="utf-8")
    assert [s["story"] for s in fairytaleqa(path=p)] == [fairytaleqa()[0]["story"]]


@pytest.mark.parametrize("content", [None, "", "not json\n", "[1, 2]\n"])
def test_fairytaleqa_bad_path(tmp_path, content):
    p = tmp_path / "bad.jsonl"
    if content is not None:
        p.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as err:
        fairytaleqa(path=p)
    msg = str(err.value)
    assert str(p) in msg and "\n" not in msg


def test_fairytaleqa_missing_split():
    with pytest.raises(InputError, match="fairytaleqa_test.jsonl"):
        fairytaleqa("test")


def test_fairytaleqa_overlap_ids_exist():
    ov = fairytaleqa_overlap()
    by_id = {t["id"]: t for t in tales()}
    assert len(ov) == 24 and ov["cinderella-or-the-little-glass-slipper"] == {"perrault-006", "bluefb-007"}
    with open(data_path("fairytaleqa", "overlap_with_tales.tsv"), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            assert by_id[row["tale_id"]]["collection"] == row["collection"]
    assert all(i in by_id for ids in ov.values() for i in ids)
    val_stories = {s["story"] for s in fairytaleqa()}
    assert "prince-hyacinth-and-thedear-little-princess" in val_stories & ov.keys()


@pytest.mark.parametrize("task", [1, 2, 3])
@pytest.mark.parametrize("split", ["train", "test"])
def test_babi_counts_and_shape(task, split):
    samples = babi(task, split)
    assert len(samples) == 1000
    for s in samples:
        assert s["facts"] and s["question"].endswith("?") and s["answer"] and "\t" not in s["question"]
        assert len(s["supporting"]) == task
        assert all(0 <= i < len(s["facts"]) for i in s["supporting"])
        assert not s["facts"][0][0].isdigit()


def test_babi_qa1_first_sample_matches_file():
    lines = data_path("babi", "en", "qa1_single-supporting-fact_test.txt").read_text(encoding="utf-8").splitlines()
    assert lines[:3] == ["1 John travelled to the hallway.", "2 Mary journeyed to the bathroom.",
                         "3 Where is John? \thallway\t1"]
    s0, s1 = babi(1)[:2]
    assert s0 == {"facts": ["John travelled to the hallway.", "Mary journeyed to the bathroom."],
                  "question": "Where is John?", "answer": "hallway", "supporting": [0]}
    # the second question of the story sees all facts so far (not the first question), support line 2 -> index 1
    assert s1["facts"] == s0["facts"] + ["Daniel went back to the bathroom.", "John moved to the bedroom."]
    assert (s1["question"], s1["answer"], s1["supporting"]) == ("Where is Mary?", "bathroom", [1])
    # line numbers restart at 1: the 6th question opens a new story
    assert babi(1)[5]["facts"] == ["Sandra travelled to the kitchen.", "Sandra travelled to the hallway."]


def test_babi_bad_args():
    with pytest.raises(InputError):
        babi(4)
    with pytest.raises(InputError):
        babi(1, "val")


def test_templates():
    p = babilong_prompts()
    assert {"TASK_TEMPLATE", "USER_TEMPLATE", "DEFAULT_TEMPLATE", "DEFAULT_PROMPTS"} <= p.keys()
    assert {"instruction", "examples", "post_prompt"} <= p["DEFAULT_PROMPTS"]["qa1"].keys()
    n = niah_template()
    assert {"template", "needle", "answer_prefix"} <= n.keys()
