"""The command line: bad input gives a one-line error and exit code != 0, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kvmap.cli", *args], input=stdin, capture_output=True,
                          cwd=ROOT, env=full_env, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("kvmap: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["missing", "empty", "binary", "latin1", "folder"])
def test_remember_refuses_bad_files(tmp_path, kind):
    path = tmp_path / f"{kind}.txt"
    if kind == "empty":
        path.write_text("  \n")
    elif kind == "binary":
        path.write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    elif kind == "latin1":
        path.write_bytes("Es war einmal ein K\u00f6nig".encode("latin-1"))
    elif kind == "folder":
        path.mkdir()
    proc = run_cli("remember", str(path), "--memory", str(tmp_path / "mem"))
    assert_one_line_error(proc, str(path))
    assert not (tmp_path / "mem").exists()  # nothing created before the input was checked


def test_ask_refuses_a_folder_that_is_not_a_memory(tmp_path):
    (tmp_path / "notes").mkdir()
    proc = run_cli("ask", "Who?", "--memory", str(tmp_path / "notes"))
    assert_one_line_error(proc, "not a kvmap memory")


def test_info_refuses_a_corrupted_manifest(tmp_path, tiny_memory):
    (tiny_memory / "manifest.json").write_text('{"format_version": 1, "mod')
    proc = run_cli("info", str(tiny_memory))
    assert_one_line_error(proc, str(tiny_memory))


def test_info_json_describes_a_memory(tiny_memory):
    import json

    proc = run_cli("info", str(tiny_memory), "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    info = json.loads(proc.stdout)
    assert info["model"] == "tiny" and info["n_tokens"] == 30
    assert [s["source"] for s in info["sources"]] == ["a.txt"]


def test_unknown_passkey_method_is_a_one_line_error(tmp_path):
    proc = run_cli("eval", "passkey", "--methods", "kvmap,magic", "--length", "100", "--trials", "1",
                   "--model", "/nonexistent/checkpoint", "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "magic")


def test_ask_refuses_a_memory_from_another_model(tiny_memory):
    proc = run_cli("ask", "Who?", "--memory", str(tiny_memory))
    assert_one_line_error(proc, "tiny")


def test_info_refuses_a_truncated_key_file(tiny_memory):
    key_file = next((tiny_memory / "segments").glob("*/k00.bin"))
    key_file.write_bytes(key_file.read_bytes()[:100])
    proc = run_cli("info", str(tiny_memory))
    assert_one_line_error(proc, "k00.bin")


def test_forget_unknown_source_lists_the_known_ones(tiny_memory):
    proc = run_cli("forget", "b.txt", "--memory", str(tiny_memory))
    assert_one_line_error(proc, "a.txt")


def test_bridge_eval_without_a_trained_adapter_is_a_one_line_error(tmp_path):
    # it must not quietly score the untrained adapter as the trained one
    proc = run_cli("bridge", "eval", "--task", "text-limb", "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "no adapter at", "kvmap bridge train --task text-limb")
    assert not (tmp_path / "run").exists()


def test_import_options_reach_the_import_config():
    from kvmap.cli import build_parser
    from kvmap.cli.options import import_config as _import_config

    args = build_parser().parse_args(["ask", "q?", "--memory", "m", "--mode", "import", "--reuse", "256", "--reuse-next", "8",
                                      "--reuse-next-best", "16", "--layers", "0-28/2"])
    config = _import_config(args)
    assert (config.reuse.candidates, config.reuse.next, config.reuse.next_best) == (256, 8, 16)
    assert config.layers == tuple(range(0, 29, 2))


def test_negative_reuse_option_is_a_one_line_error(tiny_memory):
    proc = run_cli("ask", "q?", "--memory", str(tiny_memory), "--mode", "import", "--reuse", "8",
                   "--reuse-next-best", "-1")
    assert_one_line_error(proc, "--reuse-next-best must be 0 or more")
