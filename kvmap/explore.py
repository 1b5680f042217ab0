"""``kvmap explore``: a local web page to see a memory at work (ask, inspect, upload, forget).

Why FastAPI and one hand-written page, not Gradio: the views one debugs a memory with (a layer x head
map, decoded tokens linked to the memories they drew on, those memories highlighted in their documents)
are custom drawings that Gradio's components do not offer, and Gradio brings a large frontend and
analytics calls to switch off on a machine without network. FastAPI is small and well kept, its
``TestClient`` tests the API without a server, and the page (``explore_page.html``) loads nothing from
outside, so it works offline and in a headless browser.

Safety: the server binds to 127.0.0.1 unless told otherwise; the only files it touches are in the memory
folder, through :class:`kvmap.stores.Memory` (an upload's name is a source name, never a path); an upload
is read into memory as one atomic segment, so a bad or interrupted one leaves what was stored.
"""

# No "from __future__ import annotations" here: FastAPI resolves the handlers' annotations (Request,
# declared inside create_app) at run time, and string annotations would not resolve.
import re
import threading
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from kvmap.errors import InputError, KVMapError
from kvmap.fileio import disk_usage

UPLOAD_LIMIT = 4 << 20
"""Largest upload in bytes (4 MiB, about a million tokens of English); ``kvmap explore --max-bytes`` changes it."""
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._()+-]{0,119}")
"""A source name an upload may take: letters, digits, space and ``._()+-``, at most 120 characters, no path."""
DEFAULT_MODE = "import"
"""The page's first mode: the seed's token-level import, whose every layer and head draws on memories, so
that the map and the per-token view have something to show (``kvmap ask`` defaults to splice, which
puts text into the prompt and imports nothing into attention)."""
QUESTION_LIMIT = 2000
"""Longest question in characters."""


def check_source_name(name: str) -> str:
    """``name`` stripped if it may name an uploaded source; InputError naming the problem otherwise."""
    name = (name or "").strip()
    if not name:
        raise InputError("the upload has no name; give the document a name (e.g. the file's name)")
    if "/" in name or "\\" in name or ".." in name:
        raise InputError(f"{name!r}: a document name may not contain '/', '\\\\' or '..' (it names a source in "
                         f"the memory, not a path); give a plain name like story.txt")
    if not NAME_PATTERN.fullmatch(name):
        raise InputError(f"{name!r}: a document name is 1-120 letters, digits, spaces or ._()+- and starts with a "
                         f"letter or digit; rename it")
    return name


@dataclass
class Explorer:
    """The model and the memory the page works on; one question or change at a time (:attr:`lock`)."""

    lm: object
    """A :class:`kvmap.models.loading.LoadedModel`."""
    memory_dir: Path
    max_bytes: int = UPLOAD_LIMIT
    max_new_tokens: int = 48
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        from kvmap.stores import Memory

        self.memory_dir = Path(self.memory_dir)
        self.memory = Memory.open_or_create(self.memory_dir, self.lm.model_id, self.lm.port.layout)
        self.lm.port.check_memory(self.memory)

    def info(self) -> dict:
        """The memory's sources, sizes and settings, and the modes a question can be asked in."""
        from kvmap.answer import ASK_MODES

        with self.lock:
            self.memory.refresh()
            m = self.memory
            return {"path": str(m.path), "model": m.model_id, "store": m.store_kind, "n_tokens": m.n_tokens,
                    "disk_bytes": disk_usage(m.path), "layout": m.layout.as_dict(), "sources": m.sources(),
                    "modes": list(ASK_MODES), "default_mode": DEFAULT_MODE, "max_upload_bytes": self.max_bytes}

    def ask(self, question: str, mode: str) -> dict:
        from kvmap.answer import ASK_MODES
        from kvmap.inspection import inspect_answer

        question = (question or "").strip()
        if not question:
            raise InputError("the question is empty; type a question")
        if len(question) > QUESTION_LIMIT:
            raise InputError(f"the question has {len(question)} characters; ask in at most {QUESTION_LIMIT}")
        if mode not in ASK_MODES:
            raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(ASK_MODES)}")
        with self.lock:
            self.memory.refresh()
            if self.memory.n_tokens == 0:
                raise InputError("the memory is empty; add a document first")
            return inspect_answer(self.lm, self.memory, question, mode, self.max_new_tokens).as_dict()

    def upload(self, name: str, data: bytes) -> dict:
        """Read an uploaded text into memory as source ``name``; refused (nothing changed) when it is
        binary, not UTF-8, empty, larger than :attr:`max_bytes`, badly named or already in memory."""
        from kvmap.reader import read_into
        from kvmap.textfiles import decode_text

        name = check_source_name(name)
        if len(data) > self.max_bytes:
            raise InputError(f"{name}: {len(data)} bytes is more than the {self.max_bytes} an upload may have; "
                             f"split it, or restart with kvmap explore --max-bytes N")
        text = decode_text(data, name)
        with self.lock:
            self.memory.refresh()
            if name in {s["source"] for s in self.memory.sources()}:
                raise InputError(f"{name}: the memory already holds a document of that name; forget it first "
                                 f"or upload under another name")
            before = self.memory.n_tokens
            stats = read_into(self.lm.port, self.lm.tokenizer, self.memory, name, [text], progress=False)
            # n_tokens: what the memory now holds of it (a document's first sink tokens are read, not stored)
            return {"source": name, "n_tokens": self.memory.n_tokens - before, "read_tokens": stats.n_tokens,
                    "seconds": round(stats.seconds, 2)}

    def forget(self, source: str) -> dict:
        with self.lock:
            removed = self.memory.forget((source or "").strip())
            return {"source": source, "removed_tokens": removed, "n_tokens": self.memory.n_tokens}


def page() -> str:
    """The explorer's page (HTML with its script and styles inline)."""
    return files("kvmap").joinpath("explore_page.html").read_text(encoding="utf-8")


def create_app(explorer: Explorer):
    """The FastAPI app of the page and its JSON API; every refusal is ``{"error": one line}`` with status 400."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="kvmap explore", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(KVMapError)
    def refused(request: Request, err: KVMapError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page()

    @app.get("/api/memory")
    def memory_info() -> dict:
        return explorer.info()

    @app.post("/api/ask")
    def ask(body: dict) -> dict:
        return explorer.ask(str(body.get("question", "")), str(body.get("mode", DEFAULT_MODE)))

    @app.post("/api/upload")
    async def upload(request: Request, name: str = "") -> dict:
        # read at most max_bytes + 1 bytes: a huge body is refused without being held whole in RAM
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > explorer.max_bytes:
                break
        return await _in_thread(explorer.upload, name, bytes(data))

    @app.post("/api/forget")
    def forget(body: dict) -> dict:
        return explorer.forget(str(body.get("source", "")))

    return app


async def _in_thread(fn, *args):
    """Run a blocking call (the model reading a text) off the server's event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def check_address(host: str, port: int) -> None:
    """InputError (one line) unless the server could listen on ``host:port``: checked before the model loads,
    so a port in use or a bad address is said at once, not after a minute and as a traceback."""
    import socket

    if not 1 <= port <= 65535:
        raise InputError(f"--port must be 1-65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(address)
    except OSError as err:
        raise InputError(f"cannot serve on {host}:{port} ({err.strerror or err}); choose another --port or --host") \
            from None


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the page until Ctrl-C."""
    import uvicorn

    print(f"kvmap explore: memory {explorer.memory_dir} ({explorer.memory.n_tokens} tokens) at http://{host}:{port}/ "
          f"(Ctrl-C stops)")
    uvicorn.run(create_app(explorer), host=host, port=port, log_level="warning")
