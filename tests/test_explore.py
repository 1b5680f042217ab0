"""``kvmap explore``'s JSON API on the real SmolLM2-135M: answers with their map and memories, and every
bad upload or hostile name refused with a message while nothing stored changes."""
from __future__ import annotations

import hashlib

import pytest

from kvmap.data import grimm_tales

pytestmark = pytest.mark.slow

TALE = "frog-king.txt"


@pytest.fixture(scope="module")
def lm():
    from kvmap.models.loading import load_model

    return load_model()


@pytest.fixture(scope="module")
def served(lm, tmp_path_factory):
    """An explorer on a memory holding the start of one tale, and a TestClient on its app."""
    from fastapi.testclient import TestClient

    from kvmap.explore import Explorer, create_app

    root = tmp_path_factory.mktemp("explore")
    explorer = Explorer(lm, root / "memory", max_bytes=20_000, max_new_tokens=12)
    explorer.upload(TALE, grimm_tales()[0]["text"][:1500].encode())
    return explorer, TestClient(create_app(explorer)), root


def snapshot(root):
    """Every file under ``root`` (the memory folder and its parent) with its content's digest."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def sources(client):
    return {s["source"]: s for s in client.get("/api/memory").json()["sources"]}


def test_the_page_and_the_memory_info_are_served(served):
    _, client, _ = served
    page = client.get("/")
    assert page.status_code == 200 and 'id="heatmap"' in page.text and "http" not in page.text.split("<script")[0]
    info = client.get("/api/memory").json()
    assert TALE in {s["source"] for s in info["sources"]}
    assert info["n_tokens"] > 300 and info["disk_bytes"] > 0 and info["default_mode"] in info["modes"]


@pytest.mark.parametrize("name, body, message", [
    ("empty.txt", b"", "empty"),
    ("blank.txt", b" \n\t \n", "empty"),
    ("binary.txt", b"PK\x03\x04\x00\x00" + bytes(range(256)) * 4, "binary"),
    ("latin1.txt", "Schneewittchen und die Zwerge sa\xdfen am Tisch. ".encode("latin-1") * 3, "UTF-8"),
    ("huge.txt", b"The frog sat by the well. " * 1000, "more than"),
    (TALE, b"The same name again.", "already holds"),
    ("../evil.txt", b"A plain sentence.", "may not contain"),
    ("a/b.txt", b"A plain sentence.", "may not contain"),
    ("..", b"A plain sentence.", "may not contain"),
    ("/etc/passwd", b"A plain sentence.", "may not contain"),
    ("..\\win.txt", b"A plain sentence.", "may not contain"),
    ("", b"A plain sentence.", "no name"),
    (".hidden", b"A plain sentence.", "starts with a letter"),
    ("name\x00.txt", b"A plain sentence.", "letters, digits"),
])
def test_bad_uploads_are_refused_with_a_message_and_change_nothing(served, name, body, message):
    explorer, client, root = served
    before, listed = snapshot(root), sources(client)
    got = client.post("/api/upload", params={"name": name}, content=body)
    assert got.status_code == 400, got.text
    assert message in got.json()["error"] and "\n" not in got.json()["error"]
    assert snapshot(root) == before and sources(client) == listed
    assert not (root.parent / "evil.txt").exists() and not (root / "evil.txt").exists()


def test_a_good_upload_is_listed_and_forget_removes_only_it(served):
    explorer, client, root = served
    tale_tokens = sources(client)[TALE]["n_tokens"]
    got = client.post("/api/upload", params={"name": "baker notes.txt"},
                      content="The baker's secret ingredient is saffron, bought in the town of Ulm.".encode())
    assert got.status_code == 200, got.text
    assert got.json()["n_tokens"] > 10 and sources(client)["baker notes.txt"]["n_tokens"] == got.json()["n_tokens"]
    unknown = client.post("/api/forget", json={"source": "never-stored.txt"})
    assert unknown.status_code == 400 and "never-stored.txt" in unknown.json()["error"]
    gone = client.post("/api/forget", json={"source": "baker notes.txt"})
    assert gone.status_code == 200 and gone.json()["removed_tokens"] == got.json()["n_tokens"]
    assert set(sources(client)) == {TALE} and sources(client)[TALE]["n_tokens"] == tale_tokens


@pytest.mark.parametrize("path", ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/manifest.json",
                                  "/api/../manifest.json", "/keys/0.npy", "/explore_page.html"])
def test_no_path_outside_the_api_is_served(served, path):
    _, client, _ = served
    assert client.get(path).status_code == 404


@pytest.mark.parametrize("body, message", [({"question": "   "}, "empty"), ({"question": "Who?", "mode": "magic"},
                                                                             "unknown mode"),
                                           ({"question": "x" * 5000}, "at most")])
def test_bad_questions_are_refused_with_a_message(served, body, message):
    _, client, _ = served
    got = client.post("/api/ask", json=body)
    assert got.status_code == 400 and message in got.json()["error"]


def test_an_answer_in_import_mode_shows_the_map_the_tokens_and_the_memories_in_place(served, lm):
    explorer, client, _ = served
    got = client.post("/api/ask", json={"question": "What fell into the well?", "mode": "import"})
    assert got.status_code == 200, got.text
    view = got.json()
    layout = lm.port.layout
    n_query_heads = lm.model.config.num_attention_heads
    assert len(view["heatmap"]) == layout.n_layers == len(view["layers"])
    assert all(len(row) == n_query_heads for row in view["heatmap"])
    assert all(0.0 <= share <= 1.0 for row in view["heatmap"] for share in row)
    assert max(max(row) for row in view["heatmap"]) > 0.0  # memories took some attention somewhere
    assert view["tokens"] and all(0.0 <= t["share"] <= 1.0 for t in view["tokens"])
    assert any(t["memories"] for t in view["tokens"])
    assert view["places"] and view["places"][0]["source"] == TALE
    highlighted = [p for place in view["places"] for p in place["pieces"] if p["weight"] > 0]
    assert highlighted and max(p["weight"] for p in highlighted) == 1.0
    stored = explorer.memory.token_texts()
    assert all(stored[p["memory_id"]] == p["text"] for p in highlighted)  # highlighted where it sits
    assert view["answer_without_memory"] and view["memories"]


def test_an_answer_in_splice_mode_lists_the_spliced_blocks_and_says_why_there_is_no_map(served):
    _, client, _ = served
    view = client.post("/api/ask", json={"question": "What fell into the well?", "mode": "splice"}).json()
    assert view["heatmap"] == [] and "splice" in view["note"]
    assert view["places"] and all(place["source"] == TALE for place in view["places"])
    assert view["answer"]


def test_the_cli_names_the_explorer_and_binds_locally_by_default():
    from tests.test_cli import run_cli

    out = run_cli("explore", "--help")
    help_text = out.stdout.decode()
    assert out.returncode == 0 and "127.0.0.1" in help_text and "--max-bytes" in help_text


def test_kvmap_explore_serves_the_page_on_localhost_until_interrupted(tmp_path):
    """The command itself: it creates the memory folder, serves on 127.0.0.1, and stops cleanly on Ctrl-C."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.test_cli import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "kvmap.cli", "explore", "--memory", str(tmp_path / "mem"),
                             "--port", str(port)], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline, info = time.monotonic() + 180, None
        while info is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/memory", timeout=5) as response:
                    info = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert info is not None, proc.stderr.read().decode() if proc.poll() is not None else "no answer in 180 s"
        assert info["n_tokens"] == 0 and info["sources"] == [] and (tmp_path / "mem" / "manifest.json").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out.decode()
    assert "Traceback" not in err.decode(), err.decode()


def test_a_bad_or_busy_address_is_one_line_before_the_model_loads(tmp_path):
    import socket

    from tests.test_cli import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("explore", "--memory", str(tmp_path / "m"), "--port", "70000"), "--port must be")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert_one_line_error(run_cli("explore", "--memory", str(tmp_path / "m"), "--port", str(taken)),
                              f"127.0.0.1:{taken}", "choose another --port")
