"""The benchmark grid's plan: the cells and sizes issue 15 asks for, slices that fit, clear errors."""
from __future__ import annotations

from kvmap.eval.grid import METHODS, SLICES, estimate_s, main, plan
from kvmap.eval.methods import check_methods


def test_the_grid_holds_every_task_length_and_method_asked_for():
    cells = [c for cells in SLICES.values() for c in cells]
    have = {(c.task, c.options.get("variant") or c.options.get("qa"), x) for c in cells for x in c.lengths}
    for task, option in [("passkey", None), ("niah", "single"), ("niah", "multikey"), ("babi", 1), ("babi", 2),
                         ("fairytaleqa", None)]:
        assert {(task, option, x) for x in (4_000, 16_000, 64_000)} <= have
    assert ("niah", "single", 128_000) in have
    for c in cells:
        assert c.n >= 10
        if c.task == "fairytaleqa" or c.options.get("variant") == "single":
            assert c.n >= 50 or min(c.lengths) >= 64_000
    check_methods(list(METHODS))
    assert {"oracle", "none", "truncate", "streaming", "rag-bm25", "rag-embed", "kvmap", "kvmap-block",
            "kvmap-splice", "kvmap-splice-bm25"} <= set(METHODS)


def test_every_slice_fits_in_about_two_hours():
    for name, cells in SLICES.items():
        assert sum(estimate_s(c) for c in cells) <= 2.2 * 3600, name
    assert plan()[-1].startswith("total")


def test_an_unknown_slice_is_a_one_line_error(capsys):
    assert main(["no-such-slice"]) == 1
    err = capsys.readouterr().err
    assert "no-such-slice" in err and len(err.strip().splitlines()) == 1


def test_lengths_runs_only_those_lengths_of_each_cell(tmp_path, monkeypatch):
    import kvmap.eval.runner as runner
    from kvmap.eval.grid import run_slice

    calls = []
    monkeypatch.setattr(runner, "run_eval", lambda lm, task, methods, lengths, n, out, **kw: calls.append((task, lengths)))
    (tmp_path / "grid").mkdir()
    timing = run_slice("6-babi-qa1", tmp_path, commit=False, lm=object(), lengths=(4_000,))
    assert calls == [("babi", [4_000])]
    assert timing["slice"] == "6-babi-qa1@4k"
    calls.clear()
    run_slice("2-niah-single-4k", tmp_path, commit=False, lm=object(), lengths=(64_000,))
    assert calls == []  # no cell of that slice has the length: nothing runs
