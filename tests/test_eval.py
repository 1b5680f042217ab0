"""The evaluation harness: method names, scoring, tasks, and a smoke run of every task x method."""
from __future__ import annotations

import json

import pytest

from kvmap.errors import InputError
from kvmap.eval.methods import METHODS, import_config, parse_method
from kvmap.eval.scoring import score
from kvmap.ports import format_layers, parse_layers


def test_method_names_and_options():
    assert parse_method("kvmap-block:n_blocks=16:neighbours=1") == ("kvmap-block", {"n_blocks": 16, "neighbours": 1})
    assert parse_method("kvmap:layers=0-2") == ("kvmap", {"layers": (0, 1, 2)})
    assert parse_method("kvmap:layers=0-8/4+9") == ("kvmap", {"layers": (0, 4, 8, 9)})
    assert import_config("kvmap-block").blocks.size == 64
    assert import_config("kvmap-fixed:distance=64").placement == "fixed"
    assert parse_method("rag-bm25:budget=512") == ("rag-bm25", {"budget": 512})
    assert format_layers(parse_layers("0-28/2")) == "0-28/2" and format_layers(None) == "all"
    for bad in ("nope", "kvmap:colour=3", "oracle:budget=3", "truncate:x", "kvmap:layers=a-b", "kvmap:layers=5-1"):
        with pytest.raises(InputError):
            parse_method(bad)


def test_method_lists_are_checked_before_anything_runs():
    from kvmap.eval.methods import KVMAP_PRESETS, check_methods
    from kvmap.presets import SPLICE

    check_methods(["kvmap", "kvmap-fixed", "kvmap:top_k=8:distance=64", "truncate", "truncate-tail", "full", "none"])
    assert import_config("kvmap-fixed:top_k=8", import_config("kvmap:distance=64")).distance == 64
    for bad in ([], ["nope"], ["truncate:x=1"], ["kvmap:colour=3"], ["kvmap:top_k=abc"], ["kvmap-block:reuse=4"]):
        with pytest.raises(InputError):
            check_methods(bad)
    with pytest.raises(InputError):
        parse_method("kvmap:top_k=abc")
    assert KVMAP_PRESETS["kvmap-splice"] == SPLICE


def test_scorers():
    assert score("passkey", " 4242. The", ["4242"])["score"] == 1.0
    assert score("passkey", "42 4242", ["4242"])["score"] == 0.0
    assert score("all", "are 123 and 456", ["123", "456", "789"])["score"] == pytest.approx(2 / 3)
    assert score("contains", "The most recent location of Mary is Kitchen.", ["kitchen"])["score"] == 1.0
    assert score("contains", "in the kitchenette", ["kitchen"])["score"] == 0.0
    qa = score("qa", "She gave him the herb of immortality.", ["the herb of immortality"])
    assert qa["contains"] == 1.0 and 0.5 < qa["score"] < 1.0


@pytest.fixture(scope="module")
def lm():
    from kvmap.models.loading import load_model

    return load_model()


@pytest.mark.slow
@pytest.mark.long  # about 4 minutes for the four tasks: `make test-long` (CI runs it), not `make test`
@pytest.mark.parametrize("task,length,options", [
    ("passkey", 300, {}), ("niah", 400, {"variant": "multiquery"}),
    ("fairytaleqa", 200, {"per_story": 2}), ("babi", 500, {"qa": 2})])
def test_every_method_runs_on_every_task(lm, tmp_path, task, length, options):
    from kvmap.eval.runner import run_eval
    from kvmap.eval.tasks import make_examples

    methods = list(METHODS)
    out = tmp_path / task
    metrics = run_eval(lm, task, methods, [length], 2, out, task_options=options, max_new_tokens=3, progress=False)
    cells = metrics["metrics"][str(length)]
    assert set(cells) == set(methods)
    for method, cell in cells.items():
        assert cell["n"] == 2, (method, cell)
        assert 0.0 <= cell["score"] <= 1.0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(methods)
    assert (out / "config.yaml").exists() and json.loads((out / "metrics.json").read_text())["task"] == task
    # resuming does nothing new; the same seed gives the same examples
    run_eval(lm, task, methods, [length], 2, out, task_options=options, max_new_tokens=3, progress=False)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == len(lines)
    a = make_examples(task, lm.tokenizer, length, 2, 0, **options)
    b = make_examples(task, lm.tokenizer, length, 2, 0, **options)
    assert [e.context for e in a] == [e.context for e in b]
    for ex in a:
        if task != "fairytaleqa":
            assert all(ans in ex.context for ans in ex.answers)


@pytest.mark.slow
def test_yarn_stretches_rope_and_restores_it(lm):
    import torch

    from kvmap.eval.methods import yarn_rope

    rotary = lm.model.model.rotary_emb
    x, pos = torch.zeros(1, 1, 64), torch.tensor([[9000]])
    with yarn_rope(lm.model, 2.0):
        assert lm.model.model.rotary_emb is not rotary
        stretched = lm.model.model.rotary_emb(x, pos)[0]
    assert lm.model.model.rotary_emb is rotary
    assert not torch.allclose(stretched, rotary(x, pos)[0])


def test_fairytaleqa_bad_data_file_is_one_line_error(tmp_path, capsys):
    from kvmap.cli import main

    bad = tmp_path / "qa.jsonl"
    bad.write_text("not json\n")
    code = main(["eval", "fairytaleqa", "--data", str(bad), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0 and str(bad) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
