"""Rerun REVIEW-T2's bad-input and fault probes against the real CLI and count the outcomes.

    python tests/cli_probes.py [--tree DIR] [--only NAME,...] [--fast] [--json OUT]

Each probe runs ``python -m kvmap.cli`` (with the real SmolLM2 where the command loads it) from a scratch
folder, with ``PYTHONPATH=DIR`` (default: this checkout), under an 8 GiB address-space limit, and is
classified: ``clean`` (one ``kvmap: error:`` line, or argparse's usage error, where an error is right),
``correct`` (it worked, and its check passed), ``silent`` (exit 0 where an error was due, or its check
failed), ``traceback``, ``hang`` (ran past its timeout), ``crash`` (killed by a signal), ``misdiagnosed``
(a clean line without the words the problem needs), ``data loss`` (a check on the memory failed after a
kill). Read-only folders are read-only bind mounts (needs root; skipped otherwise). Point ``--tree`` at an
export of an older commit (``git archive COMMIT kvmap | tar -x -C DIR``) to count "before".
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TALE = "Once upon a time a frog lived in a well near the castle of the king. " * 40
OTHER = "A goose laid a golden egg every morning, and the farmer grew rich and greedy. " * 40
PLANTED = "The miller's daughter kept the spare key under the blue flowerpot by the mill door. "


@dataclass
class Probe:
    name: str
    argv: list[str]
    expect: str = "error"
    """``error`` (a clean one-line error is right) or ``ok`` (exit 0 and ``check`` passes)."""
    words: tuple[str, ...] = ()
    """Words the error line must hold to count as clean (else misdiagnosed)."""
    setup: Callable[[Path], None] | None = None
    stdin: str | None = None
    """A file (relative to the scratch folder) fed to standard input."""
    check: Callable[[Path, str], bool] | None = None
    env: dict = field(default_factory=dict)
    timeout: float = 60
    model: bool = False
    """The probe loads the model (slow) in at least one of the trees."""
    kill_after: str | None = None
    """SIGKILL the command once its stderr shows this text (then ``check`` looks at what is left)."""
    mounts: tuple[tuple[str, str], ...] = ()
    """Read-only bind mounts (source, target) relative to the scratch folder."""


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def remember(tree: Path, folder: Path, *files: str, memory: str = "mem", stdin: str | None = None) -> None:
    with open(folder / stdin, "rb") if stdin else contextlib.nullcontext() as f:
        subprocess.run([sys.executable, "-m", "kvmap.cli", "remember", *files, "--memory", memory, "--quiet"],
                       cwd=folder, env=_env(tree), stdin=f, capture_output=True, check=True, timeout=300)


def _env(tree: Path, extra: dict | None = None) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree), **(extra or {})}


def _memory_sources(folder: Path, memory: str = "mem") -> dict:
    manifest = json.loads((folder / memory / "manifest.json").read_text())
    out: dict = {}
    for seg in manifest["segments"]:
        out[seg["source"]] = out.get(seg["source"], 0) + seg["n_tokens"]
    return out


def _empty_memory(tree: Path, folder: Path, head_dim: int | None = None, n: int = 0) -> None:
    code = ("import sys, numpy as np; from kvmap.stores import Memory; from kvmap.ports import KVLayout;"
            "d = int(sys.argv[2]); m = Memory.create(sys.argv[1], 'smollm2-135m-instruct', KVLayout(30, 3, d));"
            "n = int(sys.argv[3])\n"
            "if n:\n"
            "    with m.writer('a.txt') as w:\n"
            "        z = np.zeros((30, 3, n, d), np.float32); w.append(z, z, np.arange(n), np.zeros(n, int), np.arange(n), ['t'] * n)")
    subprocess.run([sys.executable, "-c", code, str(folder / "mem"), str(head_dim or 64), str(n)], env=_env(tree),
                   check=True, capture_output=True, cwd=folder)


_TOLD: dict[Path, Path] = {}


def _told(tree: Path, folder: Path) -> None:
    """tale.txt, and a memory ``mem`` holding it (read once per tree, then copied)."""
    import shutil

    write(folder / "tale.txt", TALE)
    if tree not in _TOLD:
        base = Path(tempfile.mkdtemp(prefix="kvmap-told-"))
        write(base / "tale.txt", TALE)
        remember(tree, base, "tale.txt")
        _TOLD[tree] = base / "mem"
    shutil.copytree(_TOLD[tree], folder / "mem")


def probes(tree: Path) -> list[Probe]:
    tale = lambda f: write(f / "tale.txt", TALE)  # noqa: E731
    told = lambda f: _told(tree, f)  # noqa: E731
    file_in_way = lambda f: (tale(f), write(f / "regular", "x"))  # noqa: E731
    ask = ["ask", "Who lived in the well?", "--memory", "mem"]
    p = [
        Probe("missing file", ["remember", "nope.txt", "--memory", "mem"], words=("nope.txt",)),
        Probe("empty file", ["remember", "e.txt", "--memory", "mem"], setup=lambda f: write(f / "e.txt", " \n")),
        Probe("binary file", ["remember", "b.bin", "--memory", "mem"], setup=lambda f: write(f / "b.bin", b"\x7fELF\x00" * 50)),
        Probe("latin-1 file", ["remember", "l.txt", "--memory", "mem"],
              setup=lambda f: write(f / "l.txt", "K\u00f6nig".encode("latin-1"))),
        Probe("folder as file", ["remember", "d", "--memory", "mem"], setup=lambda f: (f / "d").mkdir()),
        Probe("/dev/zero", ["remember", "/dev/zero", "--memory", "mem"], words=("character device",)),
        Probe("stdin from /dev/zero", ["remember", "-", "--memory", "mem"], stdin="/dev/zero", words=("more than",)),
        Probe("FIFO without writer", ["remember", "fifo", "--memory", "mem"], words=("FIFO",),
              setup=lambda f: os.mkfifo(f / "fifo"), timeout=30),
        Probe("NUL after 64 KiB", ["remember", "n.txt", "--memory", "mem"], words=("NUL",),
              setup=lambda f: write(f / "n.txt", b"a" * 70000 + b"\x00b"), model=True),
        Probe("UTF-16 with BOM", ["remember", "u.txt", "--memory", "mem", "--quiet"], expect="ok", model=True,
              setup=lambda f: write(f / "u.txt", TALE.encode("utf-16")),
              check=lambda f, out: _memory_sources(f).get("u.txt", 0) > 100),
        Probe("--chunk-size -1", ["remember", "tale.txt", "--memory", "mem", "--chunk-size", "-1"], setup=tale,
              words=("chunk",), model=True),
        Probe("--chunk-size 0", ["remember", "tale.txt", "--memory", "mem", "--chunk-size", "0"], setup=tale,
              words=("chunk",), model=True),
        Probe("same name, other text (two folders)", ["remember", "x.txt", "--memory", "../mem"], model=True,
              setup=lambda f: (write(f / "a" / "x.txt", TALE), write(f / "b" / "x.txt", OTHER),
                               remember(tree, f / "a", "x.txt", memory="../mem")),
              words=("x.txt", "different"), env={"_CWD": "b"}),
        Probe("two different stdin texts", ["remember", "-", "--memory", "mem", "--quiet"], expect="ok", model=True,
              setup=lambda f: (write(f / "one.txt", TALE), write(f / "two.txt", OTHER), remember(tree, f, "-", stdin="one.txt")),
              stdin="two.txt", check=lambda f, out: len(_memory_sources(f)) == 2),
        Probe("remember --memory regularfile/sub", ["remember", "tale.txt", "--memory", "regular/sub"],
              setup=file_in_way, words=("not a folder",), model=True),
        Probe("ask --memory regularfile/sub", [*ask[:3], "regular/sub"], setup=file_in_way, words=("not a folder",)),
        Probe("info regularfile/sub", ["info", "regular/sub"], setup=file_in_way, words=("not a folder",)),
        Probe("forget --memory regularfile/sub", ["forget", "a", "--memory", "regular/sub"], setup=file_in_way,
              words=("not a folder",)),
        Probe("new memory in a read-only folder", ["remember", "tale.txt", "--memory", "ro/mem"], model=True,
              setup=lambda f: (tale(f), (f / "ro-src").mkdir()), mounts=(("ro-src", "ro"),), words=("ro",)),
        Probe("new memory where mkdir is not permitted", ["remember", "tale.txt", "--memory", "/sys/kvmap-probe"],
              setup=tale, model=True),
        Probe("remember into a read-only memory", ["remember", "other.txt", "--memory", "ro"], model=True,
              setup=lambda f: (told(f), write(f / "other.txt", OTHER), os.rename(f / "mem", f / "ro-src")),
              mounts=(("ro-src", "ro"),), words=("read-only",)),
        Probe("KVMAP_CACHE a regular file", ["remember", "tale.txt", "--memory", "mem"], setup=file_in_way,
              env={"KVMAP_CACHE": "regular"}, words=("KVMAP_CACHE",), model=True, timeout=150),
        Probe("KVMAP_CACHE read-only", ["remember", "tale.txt", "--memory", "mem"], model=True, timeout=150,
              setup=lambda f: (tale(f), (f / "cache-src").mkdir()), mounts=(("cache-src", "cache"),),
              env={"KVMAP_CACHE": "cache"}, words=("cache",)),
        Probe("import --top-k 1000000000", [*ask, "--mode", "import", "--top-k", "1000000000"], setup=told,
              words=("top-k", "at most"), model=True),
        Probe("import --max-new-tokens -5", [*ask, "--mode", "import", "--max-new-tokens", "-5"], setup=told,
              words=("max-new-tokens",), model=True),
        Probe("import --max-new-tokens 0", [*ask, "--mode", "import", "--max-new-tokens", "0"], setup=told,
              words=("max-new-tokens",), model=True),
        Probe("splice --max-new-tokens 0", [*ask, "--max-new-tokens", "0"], setup=told, words=("max-new-tokens",),
              model=True),
        Probe("splice --top-k 0", [*ask, "--top-k", "0"], setup=told, words=("top-k",), model=True),
        Probe("splice --top-k 1000000000", [*ask, "--top-k", "1000000000"], setup=told, words=("top-k",), model=True),
        Probe("splice --reuse 256", [*ask, "--reuse", "256"], setup=told, words=("reuse",), model=True),
        Probe("import --top-k 0", [*ask, "--mode", "import", "--top-k", "0"], setup=told, words=("top-k",), model=True),
        Probe("import --top-k -1", [*ask, "--mode", "import", "--top-k", "-1"], setup=told, words=("top-k",), model=True),
        Probe("empty memory, default ask", ask, setup=lambda f: _empty_memory(tree, f), words=("empty",), model=True),
        Probe("empty memory, splice-attention", [*ask, "--mode", "splice-attention"],
              setup=lambda f: _empty_memory(tree, f), words=("empty",), model=True),
        Probe("empty memory, import-bm25", [*ask, "--mode", "import-bm25"],
              setup=lambda f: _empty_memory(tree, f), words=("empty",), model=True),
        Probe("import-bm25 --n-blocks 4", [*ask, "--mode", "import-bm25", "--n-blocks", "4"], setup=told,
              words=("n-blocks", "import-bm25"), model=True),
        Probe("this model's id, head_dim 32, default ask", ask, setup=lambda f: _empty_memory(tree, f, 32, 8),
              words=("layout",), model=True),
        Probe("100k-character question", ["ask", "why " * 25000, "--memory", "mem"], setup=told, words=("window",),
              model=True, timeout=180),
        Probe("ask a folder that is no memory", ask, setup=lambda f: (f / "mem").mkdir(), words=("memory",)),
        Probe("forget an unknown source", ["forget", "nope", "--memory", "mem"], setup=told, words=("tale.txt",),
              model=True),
        Probe("same file twice", ["remember", "tale.txt", "--memory", "mem", "--quiet"], expect="ok", setup=told,
              model=True, check=lambda f, out: _memory_sources(f) == {"tale.txt": _memory_sources(f)["tale.txt"]}),
        Probe("splice lists the block the answer came from", ["ask", "Where is the spare key?", "--memory", "mem",
                                                               "--json", "--max-new-tokens", "16"],
              model=True, expect="ok", timeout=180,
              setup=lambda f: (write(f / "tale.txt", TALE * 2 + PLANTED + OTHER * 2), remember(tree, f, "tale.txt")),
              check=lambda f, out: any("blue flowerpot" in m["text"] for m in json.loads(out)["memories"])),
        Probe("remember --replace killed midway", ["remember", "tale.txt", "--memory", "mem", "--replace"],
              model=True, expect="ok", kill_after="remember tale.txt", timeout=180,
              setup=lambda f: (write(f / "tale.txt", TALE * 3), remember(tree, f, "tale.txt"),
                               write(f / "before.json", json.dumps(_memory_sources(f))),
                               write(f / "tale.txt", OTHER * 3)),
              check=lambda f, out: _memory_sources(f) == json.loads((f / "before.json").read_text())),
    ]
    return p


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    os.setsid()


def _classify(probe: Probe, rc: int | None, err: str, folder: Path, out: str, killed: bool) -> str:
    if rc is None:
        return "hang"
    if "Traceback" in err:
        return "traceback"
    if killed:
        return "correct" if probe.check is None or probe.check(folder, out) else "data loss"
    if rc < 0:
        return "crash"
    lines = [ln for ln in err.splitlines() if ln.startswith("kvmap: error:") or ": error:" in ln]
    if rc == 0:
        if probe.expect == "error":
            return "silent"
        return "correct" if probe.check is None or probe.check(folder, out) else "silent"
    if probe.expect == "ok":
        return "misdiagnosed" if len(lines) == 1 else "traceback"
    if len(lines) != 1:
        return "traceback"
    return "clean" if all(w.lower() in lines[0].lower() for w in probe.words) else "misdiagnosed"


def _run(probe: Probe, tree: Path, scratch: Path) -> tuple[str, str, float]:
    folder = scratch / probe.name.replace("/", "_").replace(" ", "_")
    folder.mkdir()
    mounted = []
    try:
        if probe.setup:
            probe.setup(folder)
        for src, target in probe.mounts:
            (folder / target).mkdir(exist_ok=True)
            subprocess.run(["mount", "--bind", str(folder / src), str(folder / target)], check=True)
            mounted.append(folder / target)
            subprocess.run(["mount", "-o", "remount,ro,bind", str(folder / target)], check=True)
        env = dict(probe.env)
        cwd = folder / env.pop("_CWD", ".")
        stdin = open(probe.stdin if probe.stdin.startswith("/") else folder / probe.stdin, "rb") if probe.stdin else None
        began = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "kvmap.cli", *probe.argv], cwd=cwd, env=_env(tree, env),
                                stdin=stdin or subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_limit_memory)
        killed = False
        if probe.kill_after:
            seen = b""
            while proc.poll() is None and time.time() - began < probe.timeout:
                chunk = os.read(proc.stderr.fileno(), 4096)
                seen += chunk
                if not chunk:  # it ended by itself
                    break
                if probe.kill_after.encode() in seen:
                    time.sleep(2)  # well inside the read
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                    break
        try:
            out, err = proc.communicate(timeout=max(1, probe.timeout - (time.time() - began)))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            rc = None
        if killed:
            err = b""
        text = err.decode(errors="replace")
        verdict = _classify(probe, rc, text, folder, out.decode(errors="replace"), killed)
        last = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "")
        return verdict, last[:160], time.time() - began
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", str(target)], check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=str(ROOT), help="folder holding the kvmap package to probe")
    ap.add_argument("--only", help="comma list of probe names")
    ap.add_argument("--fast", action="store_true", help="skip the probes that load the model")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    tree = Path(args.tree).resolve()
    chosen = [p for p in probes(tree) if (not args.only or p.name in args.only.split(","))
              and not (args.fast and p.model) and (os.geteuid() == 0 or not p.mounts)]
    results = []
    with tempfile.TemporaryDirectory(prefix="kvmap-probes-") as scratch:
        for probe in chosen:
            try:
                verdict, last, seconds = _run(probe, tree, Path(scratch))
            except Exception as err:  # a setup that failed (e.g. the tree cannot remember at all)
                verdict, last, seconds = "setup failed", f"{type(err).__name__}: {err}"[:160], 0.0
            results.append({"probe": probe.name, "verdict": verdict, "seconds": round(seconds, 1), "stderr": last})
            print(f"{verdict:13s} {seconds:6.1f}s  {probe.name:45s} {last}", flush=True)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    print("totals:", ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda x: -x[1])))
    if args.json:
        Path(args.json).write_text(json.dumps({"tree": str(tree), "counts": counts, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
