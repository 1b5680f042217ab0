"""Bad-input and fault probes against the CLI (REVIEW-T2, "Found by trying it"): each gives one clean line.

Most run ``kvmap.cli.main`` in this process with a tiny random Llama and a character tokenizer standing in
for the real model (``fake_lm``), so they cost well under a second; a few run the CLI as a subprocess
(standard input, FIFOs). The ones that need SmolLM2 itself are marked ``slow``.
"""
from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------------

class CharTokenizer:
    """One token per ASCII character (ids 1..127); enough tokenizer for remember and ask."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 127 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(int(i) - 1) for i in ids if int(i) > 0)

    def batch_decode(self, seqs):
        return [self.decode(s) for s in seqs]


class Loads:
    """Stands in for kvmap.cli.memory_commands.load: counts calls, hands out the tiny model."""

    def __init__(self):
        from kvmap.models.loading import LoadedModel

        self.calls = 0
        self.lm = LoadedModel(model=tiny_llama(), tokenizer=CharTokenizer(), model_id="tiny")
        self.lm.model.config.max_position_embeddings = WINDOW  # room for the reader's 512 + 4 + 512 tokens

    def __call__(self, name, adapter=None):
        self.calls += 1
        return self.lm


@pytest.fixture
def fake_lm(monkeypatch):
    loads = Loads()
    monkeypatch.setattr("kvmap.cli.memory_commands.load", loads)
    return loads


def cli(capsys, *args: str) -> tuple[int, str, str]:
    from kvmap.cli import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc in (1, 2), (rc, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("kvmap: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_cli(*args: str, stdin=None, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kvmap.cli", *map(str, args)], stdin=stdin, capture_output=True,
                          cwd=ROOT, env=full_env, timeout=timeout)


def sources(path) -> dict[str, int]:
    from kvmap.stores import Memory

    return {s["source"]: s["n_tokens"] for s in Memory.open(path).sources()}


def stored_text(path, source: str) -> str:
    from kvmap.cli.checks import stored_token_texts
    from kvmap.stores import Memory

    return "".join(stored_token_texts(Memory.open(path), source))


@pytest.fixture
def text_file(tmp_path):
    def make(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    return make


WINDOW = 2048
TALE = "Once upon a time a frog lived in a well near the castle of the king. " * 2


# -- 1. data loss: a killed remember --replace ---------------------------------------------------

def test_replace_killed_midway_keeps_the_old_copy(capsys, fake_lm, tmp_path, text_file, monkeypatch):
    import kvmap.reader

    mem = tmp_path / "mem"
    path = text_file("a.txt", TALE)
    assert cli(capsys, "remember", path, "--memory", mem, "--model", "tiny", "--quiet")[0] == 0
    before = sources(mem)
    path.write_text("A different tale about a goose and a golden egg, " * 3)
    real = kvmap.reader.read_tokens

    def killed_midway(*args, **kwargs):
        for i, chunk in enumerate(real(*args, **kwargs)):
            if i == 1:
                raise KeyboardInterrupt  # like Ctrl-C (or a kill) in the middle of the read
            yield chunk

    monkeypatch.setattr(kvmap.reader, "read_tokens", killed_midway)
    rc, _, err = cli(capsys, "remember", path, "--memory", mem, "--model", "tiny", "--quiet", "--replace",
                     "--chunk-size", "16")
    assert rc == 130 and "interrupted" in err
    assert sources(mem) == before
    assert stored_text(mem, str(path)) == TALE[4:]  # the old copy, whole (the 4 sink tokens are not stored)


def test_replace_swaps_in_the_new_copy(capsys, fake_lm, tmp_path, text_file):
    mem = tmp_path / "mem"
    path = text_file("a.txt", TALE)
    cli(capsys, "remember", path, "--memory", mem, "--model", "tiny", "--quiet")
    path.write_text("Another tale entirely.")
    rc, out, _ = cli(capsys, "remember", path, "--memory", mem, "--model", "tiny", "--quiet", "--replace")
    assert rc == 0 and "replacing the old copy" in out
    assert stored_text(mem, str(path)) == "Another tale entirely."[4:]


# -- 2. unbounded input --------------------------------------------------------------------------

def test_character_device_is_refused_by_file_type(capsys, fake_lm, tmp_path):
    rc, _, err = cli(capsys, "remember", "/dev/zero", "--memory", tmp_path / "mem")
    one_line_error(rc, err, "/dev/zero", "character device")
    assert fake_lm.calls == 0 and not (tmp_path / "mem").exists()


def test_fifo_without_writer_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    proc = run_cli("remember", fifo, "--memory", tmp_path / "mem", timeout=60)  # it used to wait forever
    one_line_error(proc.returncode, proc.stderr.decode(), str(fifo), "FIFO")


def test_endless_standard_input_stops_at_the_size_cap(tmp_path):
    with open("/dev/zero", "rb") as zero:
        proc = run_cli("remember", "-", "--memory", tmp_path / "mem", "--max-bytes", "1000000", stdin=zero)
    one_line_error(proc.returncode, proc.stderr.decode(), "<stdin>", "more than 1000000 bytes", "--max-bytes")


def test_endless_standard_input_stops_at_the_default_cap(tmp_path):
    with open("/dev/zero", "rb") as zero:
        proc = run_cli("remember", "-", "--memory", tmp_path / "mem", stdin=zero)
    one_line_error(proc.returncode, proc.stderr.decode(), "<stdin>", f"more than {64 << 20} bytes")


def test_file_over_the_size_cap_names_the_option(capsys, fake_lm, text_file, tmp_path):
    path = text_file("big.txt", "word " * 100)
    rc, _, err = cli(capsys, "remember", path, "--memory", tmp_path / "mem", "--max-bytes", "100")
    one_line_error(rc, err, "big.txt", "--max-bytes")
    assert fake_lm.calls == 0


def test_nul_byte_after_the_first_64_kib_is_refused(capsys, fake_lm, tmp_path):
    path = tmp_path / "late-nul.txt"
    path.write_bytes(b"a" * 70_000 + b"\x00" + b"b" * 10)
    rc, _, err = cli(capsys, "remember", path, "--memory", tmp_path / "mem")
    one_line_error(rc, err, "late-nul.txt", "NUL byte at offset 70000")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_with_bom_is_decoded(tmp_path, encoding):
    import codecs

    from kvmap.textfiles import read_text

    bom = {"utf-16": b"", "utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}[encoding]
    path = tmp_path / "u16.txt"
    path.write_bytes(bom + "Es war einmal ein K\u00f6nig.".encode(encoding))
    assert read_text(str(path)) == "Es war einmal ein K\u00f6nig."


def test_utf16_file_is_remembered(capsys, fake_lm, tmp_path):
    path = tmp_path / "u16.txt"
    path.write_bytes("Once upon a time there was a king.".encode("utf-16"))
    rc, _, err = cli(capsys, "remember", path, "--memory", tmp_path / "mem", "--model", "tiny", "--quiet")
    assert rc == 0, err
    assert stored_text(tmp_path / "mem", str(path)) == "Once upon a time there was a king."[4:]


# -- 3. success reported, nothing stored ---------------------------------------------------------

@pytest.mark.parametrize("size", ["0", "-1"])
def test_chunk_size_below_one_is_refused_before_the_model_loads(capsys, fake_lm, text_file, tmp_path, size):
    rc, _, err = cli(capsys, "remember", text_file("a.txt", TALE), "--memory", tmp_path / "mem", "--chunk-size", size)
    one_line_error(rc, err, "--chunk-size", "1 or more")
    assert fake_lm.calls == 0


def test_same_name_other_text_is_refused_naming_replace(capsys, fake_lm, tmp_path, monkeypatch):
    mem = tmp_path / "mem"
    for folder, text in (("a", TALE), ("b", "A completely different story about a goose.")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.txt").write_text(text)
    monkeypatch.chdir(tmp_path / "a")
    assert cli(capsys, "remember", "x.txt", "--memory", mem, "--model", "tiny", "--quiet")[0] == 0
    monkeypatch.chdir(tmp_path / "b")
    rc, _, err = cli(capsys, "remember", "x.txt", "--memory", mem, "--model", "tiny", "--quiet")
    one_line_error(rc, err, "x.txt", "different text", "--replace")
    assert stored_text(mem, "x.txt") == TALE[4:]  # the first one is untouched


def test_same_name_same_text_is_skipped_and_says_so(capsys, fake_lm, tmp_path, text_file):
    mem = tmp_path / "mem"
    path = text_file("a.txt", TALE)
    cli(capsys, "remember", path, "--memory", mem, "--model", "tiny", "--quiet")
    rc, _, err = cli(capsys, "remember", path, "--memory", mem, "--model", "tiny", "--quiet")
    assert rc == 0 and "already in memory with the same text, skipped" in err


def test_two_different_stdin_texts_are_two_sources(capsys, fake_lm, tmp_path, monkeypatch):
    mem = tmp_path / "mem"
    for text in (TALE, "The goose laid a golden egg every morning."):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
        rc, _, err = cli(capsys, "remember", "-", "--memory", mem, "--model", "tiny", "--quiet")
        assert rc == 0, err
    names = list(sources(mem))
    assert len(names) == 2 and all(n.startswith("<stdin:") and len(n) == len("<stdin:12345678>") for n in names)


def test_same_stdin_text_twice_is_skipped(capsys, fake_lm, tmp_path, monkeypatch):
    mem = tmp_path / "mem"
    for _ in range(2):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TALE.encode())))
        rc, _, err = cli(capsys, "remember", "-", "--memory", mem, "--model", "tiny", "--quiet")
    assert rc == 0 and "skipped" in err and len(sources(mem)) == 1


# -- 4. tracebacks -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["remember", "ask", "forget", "info"])
def test_memory_path_through_a_regular_file(capsys, fake_lm, tmp_path, text_file, command):
    blocker = text_file("regular", "not a folder")
    bad = blocker / "sub"
    args = {"remember": ["remember", text_file("a.txt", TALE), "--memory", bad],
            "ask": ["ask", "Who?", "--memory", bad], "forget": ["forget", "a.txt", "--memory", bad],
            "info": ["info", bad]}[command]
    rc, _, err = cli(capsys, *args)
    one_line_error(rc, err, "not a folder")
    assert fake_lm.calls == 0


def test_memory_that_is_a_regular_file(capsys, fake_lm, tmp_path, text_file):
    rc, _, err = cli(capsys, "remember", text_file("a.txt", TALE), "--memory", text_file("regular", "x"))
    one_line_error(rc, err, "is a file, not a memory folder")


def test_new_memory_in_a_read_only_folder(capsys, fake_lm, tmp_path, text_file, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real(p, mode))
    (tmp_path / "ro").mkdir()  # (the tests run as root, for whom chmod does not make a folder read-only)
    rc, _, err = cli(capsys, "remember", text_file("a.txt", TALE), "--memory", tmp_path / "ro" / "mem")
    one_line_error(rc, err, "not writable")
    assert fake_lm.calls == 0


def test_read_only_memory_says_read_only(capsys, fake_lm, tiny_memory, text_file, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tiny_memory else real(p, mode))
    rc, _, err = cli(capsys, "remember", text_file("b.txt", TALE), "--memory", tiny_memory)
    one_line_error(rc, err, "read-only")


def test_os_error_escaping_a_command_is_one_line(capsys, fake_lm, tmp_path, text_file, monkeypatch):
    from kvmap.stores import Memory

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "mem"))

    monkeypatch.setattr(Memory, "open_or_create", erofs)
    rc, _, err = cli(capsys, "remember", text_file("a.txt", TALE), "--memory", tmp_path / "mem", "--model", "tiny")
    one_line_error(rc, err, "Read-only file system", str(tmp_path / "mem"))
    monkeypatch.setenv("KVMAP_DEBUG", "1")  # real bugs stay visible
    with pytest.raises(OSError):
        cli(capsys, "remember", text_file("a.txt", TALE), "--memory", tmp_path / "mem", "--model", "tiny")


def test_kvmap_cache_that_is_a_regular_file(capsys, tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("KVMAP_CACHE", str(text_file("cachefile", "x")))
    rc, _, err = cli(capsys, "remember", text_file("a.txt", TALE), "--memory", tmp_path / "mem")
    one_line_error(rc, err, "KVMAP_CACHE", "not a folder")
    assert not (tmp_path / "mem").exists()


def test_kvmap_cache_that_cannot_be_written_fails_before_loading(tmp_path, monkeypatch):
    from kvmap.errors import ModelLoadError
    from kvmap.models import loading

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").write_text("in the way")  # cannot become the models folder
    monkeypatch.setenv("KVMAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "BUILTIN", {"m": ("m", lambda: pytest.fail("de-quantizing began"))})
    with pytest.raises(ModelLoadError, match="cannot write in the cache folder"):
        loading._dequantize_once("m")


def test_absurd_top_k_in_import_mode_is_refused(capsys, fake_lm, tiny_memory):
    rc, _, err = cli(capsys, "ask", "Who?", "--memory", tiny_memory, "--model", "tiny", "--mode", "import",
                     "--top-k", "1000000000")
    one_line_error(rc, err, "--top-k 1000000000", "30 tokens")
    assert fake_lm.calls == 0


def test_default_top_k_is_capped_at_a_small_memory(capsys, fake_lm, tmp_path, text_file, monkeypatch):
    from kvmap.answer import Answer

    seen = {}

    def fake_ask(lm, question, memory, config, **kw):
        seen["config"] = config
        return Answer(text="ok")

    mem = tmp_path / "mem"
    cli(capsys, "remember", text_file("a.txt", "A frog in a well."), "--memory", mem, "--model", "tiny", "--quiet")
    monkeypatch.setattr("kvmap.answer.ask", fake_ask)
    rc, _, err = cli(capsys, "ask", "Who?", "--memory", mem, "--model", "tiny", "--mode", "import")
    assert rc == 0, err
    assert seen["config"].top_k == len("A frog in a well.") - 4  # all 13 memories, not 16


@pytest.mark.parametrize("mode", ["splice", "splice-attention", "recompute", "import"])
@pytest.mark.parametrize("n", ["-5", "0"])
def test_max_new_tokens_below_one_is_refused(capsys, fake_lm, tiny_memory, mode, n):
    rc, _, err = cli(capsys, "ask", "Who?", "--memory", tiny_memory, "--model", "tiny", "--mode", mode,
                     "--max-new-tokens", n)
    one_line_error(rc, err, "--max-new-tokens", "1 or more")
    assert fake_lm.calls == 0


@pytest.mark.parametrize("mode", ["splice", "splice-attention", "recompute", "import"])
def test_empty_memory_is_refused(capsys, fake_lm, tmp_path, mode):
    from kvmap.stores import Memory

    Memory.create(tmp_path / "empty", "tiny", fake_lm.lm.port.layout)  # what a killed first remember leaves
    rc, _, err = cli(capsys, "ask", "Who?", "--memory", tmp_path / "empty", "--model", "tiny", "--mode", mode)
    one_line_error(rc, err, "is empty", "remember something first")
    assert fake_lm.calls == 0


@pytest.mark.parametrize("mode", ["splice", "splice-attention", "recompute", "import"])
def test_memory_of_another_layout_is_refused_in_every_mode(capsys, fake_lm, tmp_path, mode):
    from kvmap.ports import KVLayout
    from kvmap.stores import Memory

    port = fake_lm.lm.port
    crafted = KVLayout(port.layout.n_layers, port.layout.n_kv_heads, 32)  # this model's id, head_dim 32
    memory = Memory.create(tmp_path / "crafted", "tiny", crafted)
    n, shape = 8, (crafted.n_layers, crafted.n_kv_heads, 8, 32)
    with memory.writer("a.txt") as w:
        w.append(np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.arange(n), np.zeros(n, int),
                 np.arange(n), ["t"] * n)
    rc, _, err = cli(capsys, "ask", "Who?", "--memory", tmp_path / "crafted", "--model", "tiny", "--mode", mode)
    one_line_error(rc, err, "layout")


# -- 5. silently ignored -------------------------------------------------------------------------

@pytest.mark.parametrize("option", [["--top-k", "0"], ["--top-k", "1000000000"], ["--reuse", "256"],
                                    ["--distance", "64"], ["--placement", "fixed"]])
def test_import_options_are_refused_in_splice_mode(capsys, fake_lm, tiny_memory, option):
    rc, _, err = cli(capsys, "ask", "Who?", "--memory", tiny_memory, "--model", "tiny", *option)
    one_line_error(rc, err, option[0], "--mode import")
    assert fake_lm.calls == 0


@pytest.mark.parametrize("k", ["0", "-1"])
def test_top_k_below_one_in_import_mode_is_refused_before_loading(capsys, fake_lm, tiny_memory, k):
    rc, _, err = cli(capsys, "ask", "Who?", "--memory", tiny_memory, "--model", "tiny", "--mode", "import", "--top-k", k)
    one_line_error(rc, err, "--top-k must be 1 or more")
    assert fake_lm.calls == 0


def test_splice_mode_uses_the_splice_preset(capsys, fake_lm, tiny_memory, monkeypatch):
    from kvmap.answer import Answer
    from kvmap.presets import preset

    seen = {}

    def fake_ask(lm, question, memory, config, **kw):
        seen.update(config=config, **kw)
        return Answer(text="ok")

    monkeypatch.setattr("kvmap.answer.ask", fake_ask)
    rc, out, err = cli(capsys, "ask", "Who?", "--memory", tiny_memory, "--model", "tiny")
    assert rc == 0, err
    assert seen["config"] == preset("splice") and seen["mode"] == "splice"
    rc, out, err = cli(capsys, "ask", "Who?", "--memory", tiny_memory, "--model", "tiny", "--mode",
                       "splice-attention", "--layers", "0-1")
    assert rc == 0, err
    assert seen["config"] == preset("splice", layers=(0, 1))
    rc, out, err = cli(capsys, "ask", "Who?", "--memory", tiny_memory, "--model", "tiny", "--n-blocks", "2",
                       "--block-size", "8")
    assert rc == 0, err
    assert seen["config"] == preset("splice", n_blocks=2, block_size=8)


@pytest.mark.parametrize("option", [["--n-blocks", "5"], ["--block-size", "31"], ["--n-blocks", "0"]])
def test_block_counts_beyond_the_memory_are_refused(capsys, fake_lm, tiny_memory, option):
    rc, _, err = cli(capsys, "ask", "Who?", "--memory", tiny_memory, "--model", "tiny", "--block-size", "8", *option)
    one_line_error(rc, err, option[0])
    assert fake_lm.calls == 0


# -- 7. hang: a question longer than the model's window ------------------------------------------

@pytest.mark.parametrize("mode", ["splice", "import"])
def test_question_over_the_window_is_refused_before_generating(capsys, fake_lm, tiny_memory, monkeypatch, mode):
    monkeypatch.setattr("kvmap.answer.ask", lambda *a, **k: pytest.fail("generation began"))
    rc, _, err = cli(capsys, "ask", "why " * 600, "--memory", tiny_memory, "--model", "tiny", "--mode", mode)
    one_line_error(rc, err, "window of 2048 tokens", "shorten it")


def test_max_new_tokens_over_the_window_is_refused(capsys, fake_lm, tiny_memory, monkeypatch):
    monkeypatch.setattr("kvmap.answer.ask", lambda *a, **k: pytest.fail("generation began"))
    rc, _, err = cli(capsys, "ask", "Who?", "--memory", tiny_memory, "--model", "tiny", "--max-new-tokens", "100000")
    one_line_error(rc, err, "--max-new-tokens 100000", "window of 2048")


def test_a_real_answer_still_comes_back(capsys, fake_lm, tmp_path, text_file):
    mem = tmp_path / "mem"
    cli(capsys, "remember", text_file("a.txt", TALE * 3), "--memory", mem, "--model", "tiny", "--quiet")
    for mode in ("splice", "splice-attention", "import"):
        rc, out, err = cli(capsys, "ask", "Who lived in the well?", "--memory", mem, "--model", "tiny", "--mode", mode,
                           "--max-new-tokens", "3", "--json")
        assert rc == 0, err
        assert "a.txt" in out


# -- 8. the chunk cache is keyed by the model ----------------------------------------------------

@pytest.mark.parametrize("size", [0, -1])
def test_reader_config_refuses_chunk_size_below_one(size):
    from kvmap.errors import InputError
    from kvmap.reader import ReaderConfig

    with pytest.raises(InputError, match="chunk_size"):
        ReaderConfig(chunk_size=size)


def test_chunk_cache_is_not_shared_between_models():
    from kvmap.models.llama import LlamaMemoryPort
    from kvmap.reader import ChunkCache, ReaderConfig, read_tokens

    model, cache, config = tiny_llama(), ChunkCache(), ReaderConfig(chunk_size=8, context=8)
    ids = list(range(1, 25))
    a, b = LlamaMemoryPort(model, model_id="a"), LlamaMemoryPort(model, model_id="b")
    list(read_tokens(a, ids, config, cache))
    list(read_tokens(b, ids, config, cache))
    assert cache.reused_tokens == 0
    list(read_tokens(a, ids, config, cache))
    assert cache.reused_tokens == len(ids)


# -- the parser: no defaults or choices declared twice -------------------------------------------

def test_store_choices_come_from_the_registry():
    from kvmap.cli import build_parser
    from kvmap.stores import STORE_KINDS

    remember = build_parser()._subparsers._group_actions[0].choices["remember"]
    store = next(a for a in remember._actions if a.dest == "store")
    assert set(STORE_KINDS) <= set(store.choices)


def test_import_defaults_and_help_come_from_import_config(capsys):
    from kvmap.cli import build_parser
    from kvmap.cli.options import field_docs, import_config
    from kvmap.ports import ImportConfig
    from kvmap.presets import preset

    parser = build_parser()
    args = parser.parse_args(["ask", "q?", "--memory", "m", "--mode", "import"])
    assert import_config(args) == ImportConfig()
    args = parser.parse_args(["bench", "scale", "--layers", "0-28/2"])
    assert import_config(args, base=__import__("kvmap.presets").presets.PRESETS["scale-1m"]) == \
        preset("scale-1m", layers=tuple(range(0, 29, 2)))
    with pytest.raises(SystemExit):
        parser.parse_args(["ask", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert field_docs(ImportConfig)["top_k"].split("(")[0].strip() in help_text


def test_ask_modes_match_the_library():
    from kvmap.answer import ASK_MODES
    from kvmap.cli.memory_commands import ASK_MODES as CLI_MODES

    assert CLI_MODES == ASK_MODES


def test_no_function_over_80_lines_and_no_module_over_400():
    import ast

    for path in (ROOT / "kvmap" / "cli").glob("*.py"):
        source = path.read_text()
        assert source.count("\n") <= 400, path
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 80, (path, node.name)


# -- with the real model -------------------------------------------------------------------------

@pytest.mark.slow
def test_real_model_probes(tmp_path):
    """The model-dependent probes against SmolLM2 itself: each a clean line, fast, nothing stored lost."""
    from kvmap.models.loading import load_model
    from kvmap.ports import KVLayout
    from kvmap.stores import Memory

    lm = load_model()
    crafted = Memory.create(tmp_path / "crafted", lm.model_id, KVLayout(lm.port.layout.n_layers,
                                                                        lm.port.layout.n_kv_heads, 32))
    proc = run_cli("ask", "Who?", "--memory", tmp_path / "crafted", timeout=300)
    one_line_error(proc.returncode, proc.stderr.decode(), "is empty")
    shape = (lm.port.layout.n_layers, lm.port.layout.n_kv_heads, 4, 32)
    with crafted.writer("a.txt") as w:
        w.append(np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.arange(4), np.zeros(4, int),
                 np.arange(4), ["t"] * 4)
    proc = run_cli("ask", "Who?", "--memory", tmp_path / "crafted", timeout=300)
    one_line_error(proc.returncode, proc.stderr.decode(), "layout")
    (tmp_path / "tale.txt").write_text(TALE * 4)
    assert run_cli("remember", tmp_path / "tale.txt", "--memory", tmp_path / "mem", "--quiet").returncode == 0
    proc = run_cli("ask", "why " * 25_000, "--memory", tmp_path / "mem", timeout=300)  # 100k characters
    one_line_error(proc.returncode, proc.stderr.decode(), "window of 8192 tokens")


def test_chunk_size_over_the_window_is_refused(capsys, fake_lm, tmp_path, text_file):
    rc, _, err = cli(capsys, "remember", text_file("a.txt", TALE), "--memory", tmp_path / "mem", "--model", "tiny",
                     "--chunk-size", "100000")
    one_line_error(rc, err, "--chunk-size 100000", "window of 2048 tokens", "at most 1532")


def test_bench_scale_reuse_zero_turns_the_preset_off():
    from kvmap.cli import build_parser
    from kvmap.cli.options import import_config
    from kvmap.ports import ImportConfig
    from kvmap.presets import PRESETS

    args = build_parser().parse_args(["bench", "scale", "--reuse", "0"])
    assert import_config(args, base=PRESETS["scale-1m"]) == ImportConfig()


@pytest.mark.parametrize("command", [["demo"], ["bench", "scale"]])
def test_demo_and_bench_memory_through_a_regular_file(capsys, text_file, command):
    rc, _, err = cli(capsys, *command, "--memory", text_file("regular", "x") / "sub")
    one_line_error(rc, err, "not a folder")


def test_demo_record_into_a_folder_or_under_a_file_is_refused_before_the_demo_runs(capsys, text_file, tmp_path):
    for target in (tmp_path, text_file("regular", "x") / "demo.json"):
        rc, _, err = cli(capsys, "demo", "--record", target)
        one_line_error(rc, err, "--record", "a JSON file path")


@pytest.mark.parametrize("option", ["--reuse", "--reuse-next"])
def test_absurd_reuse_counts_are_refused(capsys, fake_lm, tiny_memory, option):
    extra = ["--reuse", "8"] if option != "--reuse" else []
    rc, _, err = cli(capsys, "ask", "Who?", "--memory", tiny_memory, "--model", "tiny", "--mode", "import",
                     *extra, option, "1000000000")
    one_line_error(rc, err, f"{option} 1000000000", "at most 30")
    assert fake_lm.calls == 0
