"""RESULTS.md from run files: the generic harness's run folders, finished or still going."""
from __future__ import annotations

import json

import yaml

from kvmap.cli import main


def write_run(folder, task: str, rows: list[dict], methods: list[str], lengths: list[int], tail: str = "") -> None:
    """A run folder as ``kvmap eval TASK --out folder`` leaves it before metrics.json is written."""
    folder.mkdir(parents=True)
    config = {"task": task, "model": "m", "methods": methods, "lengths": lengths, "limit": len(rows),
              "seed": 0, "task_options": {}, "store": "exact", "max_new_tokens": 10}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def row(i: int, method: str, score: float, length: int = 1000, group: str | None = None, **extra) -> dict:
    return {"id": f"ex{i}", "group": group or f"ex{i}", "task": "passkey", "length": length, "depth": i / 4,
            "method": method, "question": "q", "answers": ["1"], "meta": {}, "output": "1", "score": score,
            "answer_s": 0.5, "context_s_per_example": 2.0, "decode_ms_per_token": 60.0, "prompt_tokens": 20,
            "rss_mb": 900.0, "context_tokens": length, **extra}


def test_report_builds_results_from_a_run_still_going(tmp_path):
    rows = [row(i, m, float(m == "kvmap" or i == 2)) for i in range(3) for m in ("kvmap", "truncate")]
    write_run(tmp_path / "runs" / "pk", "passkey", rows, ["kvmap", "truncate"], [1000], tail='{"id": "ex3", "cut')
    assert main(["report", str(tmp_path / "runs"), "-o", str(tmp_path / "RESULTS.md")]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| kvmap | 100.0% [44%–100%] n=3 |" in text
    assert "| truncate | 33.3% [6%–79%] n=3 |" in text
    assert "| 1000 | kvmap | 0.50 | 2.00 |" in text  # answer s, context s per example


def report(tmp_path) -> str:
    assert main(["report", str(tmp_path / "runs"), "-o", str(tmp_path / "RESULTS.md")]) == 0
    return (tmp_path / "RESULTS.md").read_text()


def test_ratios_are_over_the_examples_both_methods_have(tmp_path):
    # the oracle has 4 examples, yarn only the first 2; yarn equals the oracle on those two
    rows = [row(i, "oracle", [1.0, 1.0, 0.0, 0.0][i]) for i in range(4)]
    rows += [row(i, "yarn", 1.0) for i in range(2)] + [row(i, "none", 0.0) for i in range(4)]
    write_run(tmp_path / "runs" / "a", "passkey", rows, ["oracle", "yarn", "none"], [1000])
    text = report(tmp_path)
    assert "| yarn | 100% (n=2) |" in text  # not 1.0 / 0.5 = 200% over different examples
    assert "⚠ oracle n=4" in text


def test_a_cell_in_two_run_folders_is_an_error(tmp_path, capsys):
    write_run(tmp_path / "runs" / "a", "passkey", [row(0, "kvmap", 1.0)], ["kvmap"], [1000])
    write_run(tmp_path / "runs" / "b", "passkey", [row(1, "kvmap", 0.0)], ["kvmap"], [1000])
    assert main(["report", str(tmp_path / "runs"), "-o", str(tmp_path / "RESULTS.md")]) == 1
    err = capsys.readouterr().err
    assert "two run folders" in err and "kvmap at 1000" in err and len(err.strip().splitlines()) == 1


def test_two_adapters_rows_are_two_cells_named_by_the_adapter_run(tmp_path):
    for name, score in (("memory-adapter", 1.0), ("memory-adapter-v2", 0.0)):
        folder = tmp_path / "runs" / name
        write_run(folder, "passkey", [row(0, "kvmap:adapter=1", score)], ["kvmap:adapter=1"], [1000])
        config = yaml.safe_load((folder / "config.yaml").read_text())
        (folder / "config.yaml").write_text(yaml.safe_dump({**config, "adapter": f"runs/finetune/{name}/adapter"}))
    text = report(tmp_path)
    assert "| kvmap:adapter=1@memory-adapter | 100.0%" in text
    assert "| kvmap:adapter=1@memory-adapter-v2 | 0.0%" in text


def test_tuned_rows_are_measured_against_the_baselines_tuned_by_the_same_adapter(tmp_path):
    # the adapter lifts every answer: tuned kvmap 0.5 over a tuned oracle of 1.0 is half of it, not 5x the base's 0.1
    base = [row(i, m, s, group=f"s{i}") for i in range(4) for m, s in (("oracle", 0.1), ("none", 0.0), ("rag-bm25", 0.1))]
    write_run(tmp_path / "runs" / "base", "fairytaleqa", base, ["oracle", "none", "rag-bm25"], [1000])
    methods = {"kvmap-splice-bm25:adapter=1": 0.5, "oracle:adapter=1": 1.0, "none:adapter=1": 0.2,
               "rag-bm25:adapter=1": 0.4, "rag-bm25:budget=512:adapter=1": 0.3}
    tuned = [row(i, m, s, group=f"s{i}") for i in range(4) for m, s in methods.items()]
    folder = tmp_path / "runs" / "tuned"
    write_run(folder, "fairytaleqa", tuned, list(methods), [1000])
    config = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "adapter": "runs/finetune/splice-adapter/adapter"}))
    (tmp_path / "runs" / "DISCUSSION.md").write_text(
        "share {{share fairytaleqa dev 1000 kvmap-splice-bm25:adapter=1@splice-adapter oracle}}.")
    text = report(tmp_path)
    assert "| kvmap-splice-bm25:adapter=1@splice-adapter | 50% (n=4) |" in text  # over the tuned oracle
    assert "| kvmap-splice-bm25:adapter=1@splice-adapter | 37% (n=4) |" in text  # (0.5 - 0.2) / (1.0 - 0.2), floats
    assert "| kvmap-splice-bm25:adapter=1@splice-adapter | +30.0 (n=4, 4 clusters" not in text
    assert "| kvmap-splice-bm25:adapter=1@splice-adapter | +30.0 [+30.0, +30.0] (n=4, 4 clusters) | +10.0 [" in text
    assert "best RAG here: `rag-bm25`; rows tuned by a memory adapter" in text
    assert "share 500% (n=4)." in text  # a placeholder names its reference: here the base oracle


def test_methods_listed_without_predictions_are_named(tmp_path):
    write_run(tmp_path / "runs" / "a", "passkey", [row(0, "kvmap", 1.0)], ["kvmap", "kvmap-block"], [1000])
    assert "kvmap-block at 1000 in `a`" in report(tmp_path)


def test_paired_differences_resample_whole_clusters(tmp_path):
    # two stories of three questions: kvmap beats none by 1 on story s0 and by 0 on s1
    rows = [row(i, "kvmap", 1.0 if i < 3 else 0.5, group=f"s{i // 3}") for i in range(6)]
    rows += [row(i, "none", 0.0 if i < 3 else 0.5, group=f"s{i // 3}") for i in range(6)]
    write_run(tmp_path / "runs" / "a", "fairytaleqa", rows, ["none", "kvmap"], [1000])
    text = report(tmp_path)
    assert "| kvmap | +50.0 [+0.0, +100.0] (n=6, 2 clusters) | – |" in text


def test_dev_and_test_parts_are_separate_sections(tmp_path):
    write_run(tmp_path / "runs" / "dev", "passkey", [row(0, "kvmap", 1.0)], ["kvmap"], [1000])
    write_run(tmp_path / "runs" / "test", "passkey", [row(5, "kvmap", 0.0)], ["kvmap"], [1000])
    config = yaml.safe_load((tmp_path / "runs" / "test" / "config.yaml").read_text())
    config["task_options"] = {"part": "test"}
    (tmp_path / "runs" / "test" / "config.yaml").write_text(yaml.safe_dump(config))
    text = report(tmp_path)
    assert text.index("## passkey, test part") < text.index("## passkey, dev part")
    assert "| kvmap | 0.0% [0%–79%] n=1 |" in text and "| kvmap | 100.0% [21%–100%] n=1 |" in text


def test_prose_placeholders_are_filled_from_the_runs(tmp_path, capsys):
    rows = [row(i, "kvmap", float(i < 3), group=f"s{i}") for i in range(4)] + \
           [row(i, "none", 0.0, group=f"s{i}") for i in range(4)]
    write_run(tmp_path / "runs" / "a", "passkey", rows, ["none", "kvmap"], [1000])
    (tmp_path / "runs" / "DISCUSSION.md").write_text(
        "kvmap found {{correct passkey dev 1000 kvmap}} ({{score passkey dev 1000 kvmap}}), "
        "{{diff passkey dev 1000 kvmap none}} over none; {{score passkey test 1000 kvmap}}.")
    text = report(tmp_path)
    assert "kvmap found 3/4 (75.0%), +75.0 [" in text
    assert "**[no such cell: score passkey test 1000 kvmap]**" in text
    assert "names nothing in these runs" in capsys.readouterr().err


def test_the_diagnosis_section_reads_the_attention_shares(tmp_path):
    (tmp_path / "runs" / "diagnosis").mkdir(parents=True)
    rows = [{"id": "niah-1", "output": "the wood", "answers": ["1"], "share_layer_head": [[0.5, 0.1], [0.9, 0.3]],
             "share_per_step": [0.2, 0.4], "top_on_target": 0.25, "target_tokens": 9,
             "most_attended": [[" the", 40], [".", 7]]}]
    (tmp_path / "runs" / "diagnosis" / "attention_share.json").write_text(json.dumps(
        {"length": 16000, "n": 1, "part": "dev", "model": "m", "seconds": 60, "tasks": {"niah": rows}}))
    text = report(tmp_path)
    assert "| niah | `niah-1` | 30% | 25% | 'the wood' | `the` ×40, `.` ×7 |" in text
    assert (tmp_path / "docs" / "plots" / "results_diagnosis_share.png").stat().st_size > 1000


def test_json_placeholders_read_fields_of_run_files(tmp_path, capsys):
    (tmp_path / "runs" / "scale" / "m").mkdir(parents=True)
    (tmp_path / "runs" / "scale" / "m" / "r.json").write_text(json.dumps({"speed": {"ratio": 1.2407}, "xs": [3, 4]}))
    (tmp_path / "runs" / "DISCUSSION.md").write_text(
        "ratio {{json scale/m/r.json speed.ratio .2f}}x, second {{json scale/m/r.json xs.1}}, "
        "{{json scale/m/r.json speed.nope}} {{json ../secret.json a}} {{json /etc/hostname a}}")
    text = report(tmp_path)
    assert "ratio 1.24x, second 4, **[no such field: scale/m/r.json speed.nope]** **[no such field: ../secret.json a]**" in text
    assert capsys.readouterr().err.count("names nothing") == 3


def test_the_grid_cost_table_sums_the_measured_slices(tmp_path):
    (tmp_path / "runs" / "grid").mkdir(parents=True)
    (tmp_path / "runs" / "grid" / "timing.jsonl").write_text(
        '{"slice": "1-a", "wall_s": 3600, "cpu_s": 7200, "finished": "t1"}\n'
        '{"slice": "2-b", "wall_s": 1800, "cpu_s": 3600, "finished": "t2"}\n')
    text = report(tmp_path)
    assert "| 1-a | 1.00 | 2.00 | t1 |" in text and "| all calls | 1.50 | 3.00 | |" in text


def test_the_finetune_section_lists_each_adapter_run_with_its_data_settings(tmp_path):
    for name, share in (("memory-adapter", None), ("memory-adapter-v2", 0.5)):
        folder = tmp_path / "runs" / "finetune" / name
        (folder / "adapter").mkdir(parents=True)
        data = {"n_stories": 40} if share is None else {"n_stories": 40, "instruction_in_memory": share}
        (folder / "training.json").write_text(json.dumps({"steps": 20, "batch_size": 4, "train_wall_s": 60.0,
                                                          "train_cpu_s": 120.0, "data": data}))
        (folder / "adapter" / "adapter.json").write_text(json.dumps({"settings": {"rank": 8, "targets": ["q_proj"]}}))
        (folder / "metrics.csv").write_text("epoch,step,train/accuracy,train/loss,val/accuracy,val/loss\n"
                                            "0,0,,,0.5,1.5\n0,9,1.0,0.2,,\n0,19,,,0.75,0.4\n")
    text = report(tmp_path)
    assert "| `memory-adapter` | 20 × 4 | 0% | 0.03 CPU-h (1 min wall) | r=8 on q_proj | 1.50 → 0.40 | 50% → 75% |" in text
    assert "| `memory-adapter-v2` | 20 × 4 | 50% |" in text


def _scale_result(tokens: int, probe: int | None, task: str = "passkey-scale", prefill: float = 5.0) -> dict:
    config = {"top_k": 16, "reuse": 256, "reuse_next": 8, "reuse_next_best": 16} | ({"reuse_probe": probe} if probe else {})
    return {"task": task, "corpus": "tales", "haystack_tokens": tokens, "trials": 5, "config": config,
            "methods": {"kvmap": {"correct": 1, "n": 5, "accuracy": 0.2}, "none": {"correct": 0, "n": 5, "accuracy": 0}},
            "speed": {"decode_ms_memory": 55.0, "decode_ms_no_memory": 50.0, "prefill_s_memory": prefill},
            "peak_rss_mb": 2048.0, "disk_bytes_per_token": 29000.0}


def test_the_scale_section_curves_first_forward_by_memory_size_and_the_index_build(tmp_path):
    from kvmap.eval.plots import plot_path
    from kvmap.eval.report_scale import scale_section, size_rows

    scale = tmp_path / "scale"
    for name, result in {"a-probe/passkey-scale.json": _scale_result(35_000, 32, prefill=2.0),
                         "b-probe/passkey-scale.json": _scale_result(1_000_000, 32, prefill=5.1),
                         "b-probe/niah-single-test-scale.json": _scale_result(1_000_000, 32, "niah-single-scale", 7.7),
                         "b-exact/passkey-scale.json": _scale_result(1_000_000, None, prefill=65.0),
                         "b-block/passkey-scale.json": {**_scale_result(1_000_000, None), "config": {
                             "top_k": 16, "reuse": None, "block_size": 64, "n_blocks": 8}}}.items():
        (scale / name).parent.mkdir(parents=True, exist_ok=True)
        (scale / name).write_text(json.dumps(result))
    (scale / "index_build.json").write_text(json.dumps({
        "n_tokens": 68000, "n_segments": 2, "part_s_per_1k": {"moments": 0.1, "clusters": 0.2, "sketch": 0.05},
        "index_s_per_1k": 0.35, "ingest_s_per_1k_with_index": 2.9, "build_run": "runs/scale/tales-50k-probe32",
        "index_share_of_ingest": 0.137}))
    rows = size_rows(scale)
    assert [r["curve"] for r in rows if "reuse_probe" in r["method"]] == [True, False, True]  # NIAH is no curve point
    text = "\n".join(scale_section(scale, tmp_path / "out"))
    assert "| 1,000,000 | kvmap:reuse=256:reuse_next=8:reuse_next_best=16:reuse_probe=32 (tales) | 1/5 |" in text
    assert "| kvmap-block:block_size=64:n_blocks=8 (tales) |" in text  # the InfLLM-style peer, same bench
    assert "(tales, niah-single, dev part)" in text and "adds 14% to reading without it" in text
    assert "0.35 s per 1k tokens" in text and plot_path(tmp_path / "out", "results_scale.png").exists()


def test_the_scale_section_reports_the_cold_start(tmp_path):
    from kvmap.eval.report_scale import scale_section

    scale = tmp_path / "scale"
    scale.mkdir()
    (scale / "cold_start.json").write_text(json.dumps({
        "n_tokens": 1_025_751, "options": {"top_k": 16, "reuse": 256, "reuse_probe": 32}, "prompt_tokens": 40,
        "rows": [{}, {}, {}], "cold_s": 12.0, "warm_s": 5.0, "cold_over_warm": 2.4}))
    text = "\n".join(scale_section(scale, tmp_path / "out"))
    assert "`reuse=256:reuse_probe=32`" in text and "cold 12.0 s, warm" in text and "2.4× warm" in text


def test_the_port_section_compares_on_the_examples_both_ports_answered(tmp_path):
    import json

    from kvmap.eval.report_port import port_section

    method = "kvmap:local=4096"
    port, grid = tmp_path / "port", tmp_path / "grid"
    (port / "passkey-16k").mkdir(parents=True)
    (grid / "passkey").mkdir(parents=True)
    (port / "passkey-16k" / "config.yaml").write_text(f"task: passkey\nmethods:\n- {method}\ntask_options:\n  part: test\n")

    def rows(scores):
        return "".join(json.dumps({"id": i, "method": method, "length": 16000, "score": s}) + "\n"
                       for i, s in scores.items())

    (port / "passkey-16k" / "predictions.jsonl").write_text(rows({"a": 1.0, "b": 1.0, "c": 0.0}))
    (grid / "passkey" / "predictions.jsonl").write_text(rows({"a": 1.0, "b": 0.0, "d": 1.0}))
    (port / "decode_cost.json").write_text(json.dumps({
        "settings": {"rounds": 2, "order": "ABBA", "steps": 8, "memory_tokens": 100, "threads": 2, "old_commit": "x"},
        "decode_ms_median": {"old": {"none": 40.0}, "new": {"none": 42.0}}, "new_over_old": {"none": 1.05}}))
    text = "\n".join(port_section(port))
    assert "| none | 40.0 | 42.0 | 1.050 |" in text
    assert "| old (runs/grid/passkey) | 1/2 " in text and "| new (runs/port/passkey-16k) | 2/2 " in text
    assert "Same score on 1 of 2 examples." in text and "test part" in text
