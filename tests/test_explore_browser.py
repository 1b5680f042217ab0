"""The explorer page in a real browser (headless Debian Chromium driven by Playwright, ``make test-ui``):
it loads, adds a document, refuses a binary one with a message, answers a question with the map, the
per-token memories and the memories in place, forgets a document, and leaves a screenshot.

The screenshot goes to ``$KVMAP_UI_OUT`` (``make test-ui`` sets runs/explorer), else to the test's tmp folder.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from kvmap.data import grimm_tales

pytestmark = [pytest.mark.ui, pytest.mark.slow]

ANSWER_TIMEOUT_MS = 240_000  # two answers (with and without memory) on 2 CPU cores, with room for a busy machine
# As the machine's own probe starts Chromium: without the background-networking flags it keeps trying
# Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = os.environ.get("KVMAP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no Chromium found: install Debian's package (apt-get install chromium; make test-ui does) "
                    "or set KVMAP_CHROMIUM to a Chromium binary")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The explorer on a one-tale memory, served by uvicorn on a free localhost port in a thread."""
    import uvicorn

    from kvmap.explore import Explorer, create_app
    from kvmap.models.loading import load_model

    explorer = Explorer(load_model(), tmp_path_factory.mktemp("ui") / "memory", max_bytes=50_000, max_new_tokens=16)
    explorer.upload("frog-king.txt", grimm_tales()[0]["text"][:1500].encode())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(explorer), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the explorer's server did not start in 30 s"
    yield f"http://127.0.0.1:{port}/", explorer
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_the_page_asks_shows_the_memory_at_work_and_refuses_a_bad_upload(server, browser, tmp_path):
    url, explorer = server
    out = Path(os.environ.get("KVMAP_UI_OUT") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#sources button.forget[data-source='frog-king.txt']")
    assert page.locator("#mode").input_value() == "import"

    # a good document is added and listed
    notes = tmp_path / "baker.txt"
    notes.write_text("The baker's secret ingredient is saffron, bought in the town of Ulm.\n")
    page.set_input_files("#upload-file", str(notes))
    page.fill("#upload-name", "baker.txt")
    page.click("#upload")
    page.wait_for_selector("#sources button.forget[data-source='baker.txt']")
    assert "added baker.txt" in page.text_content("#message")

    # a binary one gets a message on the page and changes nothing
    tokens_before = explorer.memory.n_tokens
    binary = tmp_path / "photo.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    page.set_input_files("#upload-file", str(binary))
    page.fill("#upload-name", "photo.txt")
    page.click("#upload")
    page.wait_for_selector("#message.error")
    assert "binary" in page.text_content("#message")
    assert page.locator("#sources button.forget[data-source='photo.txt']").count() == 0
    explorer.memory.refresh()
    assert explorer.memory.n_tokens == tokens_before

    # forget the added document through the page (it asks first)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#sources button.forget[data-source='baker.txt']")
    page.wait_for_selector("#sources button.forget[data-source='baker.txt']", state="detached")

    # a question: the answer, the layer x head map, the tokens and the memories in their document
    page.fill("#question", "What fell into the well?")
    page.click("#ask")
    page.wait_for_selector("#message.ok:has-text('answered')", timeout=ANSWER_TIMEOUT_MS)
    layout = explorer.lm.port.layout
    heads = explorer.lm.model.config.num_attention_heads
    assert page.text_content("#answer").strip()
    assert page.text_content("#answer-none").strip()
    assert page.locator("#heatmap .cell").count() == layout.n_layers * heads
    assert page.locator("#tokens .tok").count() >= 1
    assert page.locator("#memories .place mark").count() >= 1
    assert "frog-king.txt" in page.text_content("#memories")
    page.screenshot(path=str(out / "explorer.png"), full_page=True)
    assert (out / "explorer.png").stat().st_size > 10_000
    assert not errors, errors
