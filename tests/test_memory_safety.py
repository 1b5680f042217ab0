"""Memory folder safety: races between processes, symlinks, atomic replace, strict validation,
OS errors (read-only, disk full), the empty memory, and search_streamed over some segments."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kvmap.stores.memory as memory_module
import kvmap.stores.writer as segment_module  # SegmentWriter and its file writes
from kvmap.errors import InputError, KVMapError, MemoryFormatError
from kvmap.stores import Memory
from test_stores import LAYOUT, MODEL, ROOT, make_tokens, one_line, queries, remember

ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


# ----------------------------------------------------------------------------------------------
# helpers (also used by test_fuzz_loaders.py)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def segment_names(path: Path) -> list[str]:
    return [r["name"] for r in json.loads((path / "manifest.json").read_text())["segments"]]


def set_manifest(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def set_meta(path: Path, name: str, meta: dict) -> None:
    """Write a segment's meta.json and make the manifest's checksum of it match (a crafted memory)."""
    data = json.dumps(meta).encode()
    (path / "segments" / name / "meta.json").write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    for rec in manifest["segments"]:
        if rec["name"] == name:
            rec["meta_sha256"] = sha(data)
    set_manifest(path, manifest)


def rewrite(path: Path, name: str, file: str, data: bytes) -> None:
    """Replace one file of a segment and fix every checksum, so only the content is wrong."""
    (path / "segments" / name / file).write_bytes(data)
    meta = json.loads((path / "segments" / name / "meta.json").read_text())
    meta["files"][file] = {"size": len(data), "sha256": sha(data)}
    set_meta(path, name, meta)


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def snapshot(mem: Memory) -> list:
    return [mem.search(layer, queries(15), 7) for layer in range(LAYOUT.n_layers)]


def same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path`` (without following symlinks) with its bytes, for "unchanged" checks."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            out[str(p.relative_to(path))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def small_memory(path: Path, sources=("a", "b"), sizes=(40, 30), store="exact") -> Memory:
    mem = Memory.create(path, MODEL, LAYOUT, store=store)
    rng = np.random.default_rng(len(str(path)))
    for source, n in zip(sources, sizes):
        remember(mem, source, rng, [n])
    return mem


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from kvmap.errors import KVMapError
    from kvmap.stores import Memory

    path, source, n, wait_for, hold, retry = sys.argv[1:7]
    mem = Memory.open(path)  # opened before the other writer commits: a stale view
    while wait_for != "-" and not Path(wait_for).exists():
        time.sleep(0.005)
    L, H, d = mem.layout.n_layers, mem.layout.n_kv_heads, mem.layout.head_dim
    rng = np.random.default_rng(abs(hash(source)) % 1000)
    n = int(n)
    for attempt in range(400):
        try:
            with mem.writer(source) as w:
                w.append(rng.standard_normal((L, H, n, d)), rng.standard_normal((L, H, n, d)),
                         np.zeros(n, int), np.zeros(n, int), np.arange(n), ["x"] * n)
                time.sleep(float(hold))
            print("ok", flush=True)
            break
        except KVMapError as err:
            print("refused:", err, flush=True)
            if retry != "1":
                break
            time.sleep(0.02)
    """
)


def run_writer(path: Path, source: str, n: int = 12, wait_for: str = "-", hold: float = 0.0,
               retry: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), source, str(n), wait_for, str(hold),
                             "1" if retry else "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV, cwd=ROOT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out


# ----------------------------------------------------------------------------------------------
# Bug 1: a reader racing a writer


def test_reader_racing_a_writer_keeps_the_segment_it_just_committed(tmp_path, monkeypatch):
    """Another process commits a segment between this reader's manifest read and its cleanup:
    cleanup must re-read the manifest under the lock and keep the new segment."""
    path = tmp_path / "m"
    small_memory(path, sources=("a",), sizes=(20,))
    name = "read_manifest" if hasattr(memory_module, "read_manifest") else "_read_manifest"
    real = getattr(memory_module, name)
    raced = []

    def read_then_let_a_writer_commit(p):
        manifest = real(p)
        if not raced:
            raced.append(1)
            assert finish(run_writer(path, "new")).strip() == "ok"
        return manifest

    monkeypatch.setattr(memory_module, name, read_then_let_a_writer_commit)
    Memory.open(path)
    monkeypatch.undo()
    assert raced
    again = Memory.open(path)
    assert [s["source"] for s in again.sources()] == ["a", "new"] and again.n_tokens == 32
    assert all((path / "segments" / n).is_dir() for n in segment_names(path))


def test_reader_racing_a_forget_reads_the_new_manifest(tmp_path, monkeypatch):
    """Another process forgets a source between this reader's manifest read and its opening of
    the segments: the reader sees a folder gone, reads the manifest again, and opens what is left."""
    path = tmp_path / "m"
    small_memory(path)
    real = memory_module.read_manifest
    raced = []

    def read_then_forget_elsewhere(p):
        manifest = real(p)
        if not raced:
            raced.append(1)
            code = "import sys; from kvmap.stores import Memory; print(Memory.open(sys.argv[1]).forget('a'))"
            out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=ENV,
                                 cwd=ROOT, timeout=120)
            assert out.stdout.strip() == "40", out.stderr
        return manifest

    monkeypatch.setattr(memory_module, "read_manifest", read_then_forget_elsewhere)
    mem = Memory.open(path)
    assert raced and mem.sources() == [{"source": "b", "n_tokens": 30, "n_docs": 1}]


def test_two_writers_in_two_processes_both_survive_or_one_is_refused(tmp_path):
    """Two processes, each holding a Memory opened before the other wrote, add a segment at once."""
    path = tmp_path / "m"
    small_memory(path, sources=("a",), sizes=(10,))
    go = tmp_path / "go"
    # First round: both hold the writer a while, so one is refused with a clear message.
    procs = [run_writer(path, f"w{i}", wait_for=str(go), hold=0.5) for i in range(2)]
    time.sleep(1.5)  # both have opened the memory
    go.touch()
    outs = [finish(p).strip() for p in procs]
    committed = {f"w{i}" for i, out in enumerate(outs) if out == "ok"}
    assert committed, outs
    for out in outs:
        assert out == "ok" or ("being written by another writer" in out and "\n" not in out), out
    mem = Memory.open(path)
    assert {s["source"] for s in mem.sources()} == {"a"} | committed
    # Second round: both retry until they get the lock; stale views must not drop each other's segment.
    go2 = tmp_path / "go2"
    procs = [run_writer(path, f"r{i}", wait_for=str(go2), hold=0.05, retry=True) for i in range(2)]
    time.sleep(1.5)
    go2.touch()
    outs = [finish(p).strip().splitlines()[-1] for p in procs]
    assert outs == ["ok", "ok"], outs
    mem = Memory.open(path)
    assert {s["source"] for s in mem.sources()} == {"a", "r0", "r1"} | committed
    assert mem.n_tokens == 10 + 12 * (2 + len(committed))


# ----------------------------------------------------------------------------------------------
# symlinks


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    (out / "0123456789abcdef").mkdir(parents=True)
    (out / "0123456789abcdef" / "data.txt").write_text("keep me")
    (out / ".tmp-1234").mkdir()
    (out / "notes").mkdir()
    (out / "file.txt").write_text("keep me too")
    return out


def test_symlinked_segments_folder_is_refused_and_what_it_points_at_is_untouched(tmp_path):
    path = tmp_path / "m"
    small_memory(path, sources=("a",), sizes=(10,))
    outside = _outside(tmp_path)
    before = tree(outside)
    shutil.rmtree(path / "segments")
    (path / "segments").symlink_to(outside)
    with pytest.raises(MemoryFormatError) as err:
        Memory.open(path)
    assert "symlink" in one_line(err)
    assert tree(outside) == before


def test_two_memories_sharing_segments_through_a_symlink_do_not_destroy_each_other(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    small_memory(a, sources=("x",), sizes=(10,))
    Memory.create(b, MODEL, LAYOUT)
    shutil.rmtree(b / "segments")
    (b / "segments").symlink_to(a / "segments")
    before = tree(a)
    with pytest.raises(MemoryFormatError):
        Memory.open(b)
    with pytest.raises(MemoryFormatError):
        Memory.open_or_create(b, MODEL, LAYOUT)
    assert tree(a) == before and Memory.open(a).n_tokens == 10


def test_symlinked_lock_is_refused_and_creates_nothing_outside(tmp_path):
    path = tmp_path / "m"
    mem = small_memory(path, sources=("a",), sizes=(10,))
    (path / ".lock").unlink(missing_ok=True)
    target = tmp_path / "outside-lock"
    (path / ".lock").symlink_to(target)
    with pytest.raises(MemoryFormatError) as err:
        Memory.open(path)
    assert "symlink" in one_line(err)
    with pytest.raises(MemoryFormatError):
        with mem.writer("b"):
            pass
    with pytest.raises(MemoryFormatError):
        mem.forget("a")
    assert not os.path.lexists(target)


@pytest.mark.parametrize("what", ["manifest.json", "segment folder", "k00.bin", "meta.json", "tokens.npz"])
def test_symlinks_inside_a_memory_are_refused(tmp_path, what):
    path = tmp_path / "m"
    small_memory(path, sources=("a",), sizes=(10,))
    (name,) = segment_names(path)
    seg = path / "segments" / name
    target = {"manifest.json": path / "manifest.json", "segment folder": seg}.get(what, seg / what)
    copy = tmp_path / "copy"
    shutil.copytree(target, copy) if target.is_dir() else shutil.copy(target, copy)
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.symlink_to(copy)
    with pytest.raises(MemoryFormatError) as err:
        mem = Memory.open(path)
        mem.entry(0)
    assert "symlink" in one_line(err)


def test_cleanup_deletes_only_its_own_folders_never_through_a_symlink(tmp_path):
    path = tmp_path / "m"
    small_memory(path, sources=("a",), sizes=(10,))
    outside = _outside(tmp_path)
    before = tree(outside)
    (path / "segments" / "fedcba9876543210").symlink_to(outside / "0123456789abcdef")
    (path / "segments" / ".tmp-link").symlink_to(outside / ".tmp-1234")
    (path / "segments" / "notes").mkdir()  # not a name kvmap gives: not ours to delete
    (path / "segments" / "0123456789abcdef").mkdir()  # ours and stale
    (path / "segments" / ".tmp-dead").mkdir()  # ours and stale
    Memory.open(path)
    left = sorted(p.name for p in (path / "segments").iterdir())
    assert left == sorted([*segment_names(path), "fedcba9876543210", ".tmp-link", "notes"])
    assert tree(outside) == before


# ----------------------------------------------------------------------------------------------
# writer(replace=True)


def test_replace_swaps_the_source_in_one_manifest_replace(tmp_path, monkeypatch):
    path = tmp_path / "m"
    mem = Memory.create(path, MODEL, LAYOUT)
    rng = np.random.default_rng(0)
    remember(mem, "a", rng, [10])
    remember(mem, "b", rng, [20])
    remember(mem, "a", rng, [30])
    old_a = [n for n in segment_names(path)][::2]
    writes = []
    real = memory_module.write_json_atomic
    monkeypatch.setattr(memory_module, "write_json_atomic", lambda p, obj: (writes.append(obj), real(p, obj)))
    new = make_tokens(rng, 25)
    with mem.writer("a", replace=True) as w:
        w.append(**new)
    assert len(writes) == 1  # one manifest replace drops the old and adds the new
    assert mem.sources() == [{"source": "b", "n_tokens": 20, "n_docs": 1}, {"source": "a", "n_tokens": 25, "n_docs": 1}]
    assert not any((path / "segments" / n).exists() for n in old_a)
    again = Memory.open(path)
    assert again.sources() == mem.sources()
    k, v = again.fetch(0, torch.arange(20, 45).expand(3, 25))
    np.testing.assert_array_equal(v.numpy(), new["values"][0].astype(np.float16).astype(np.float32))
    with mem.writer("a", replace=True):
        pass  # nothing appended: nothing committed, the old segment stays
    assert mem.n_tokens == 45


def test_replace_killed_midway_keeps_the_old_source(tmp_path):
    path = tmp_path / "m"
    mem = small_memory(path)
    before, manifest = snapshot(mem), (path / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError, match="killed"):
        with mem.writer("a", replace=True) as w:
            w.append(**make_tokens(np.random.default_rng(1), 5))
            raise RuntimeError("killed")
    assert (path / "manifest.json").read_bytes() == manifest and same(snapshot(mem), before)
    # The same with SIGKILL in another process, while it streams the new copy.
    script = textwrap.dedent("""
        import sys, numpy as np
        from kvmap.stores import Memory
        mem = Memory.open(sys.argv[1]); L, H, d = 2, 3, 16
        with mem.writer("a", replace=True) as w:
            while True:
                w.append(np.ones((L, H, 4, d)), np.ones((L, H, 4, d)), [0] * 4, [0] * 4, range(4), ["x"] * 4)
                print("appended", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV, cwd=ROOT, text=True)
    try:
        for _ in range(3):
            assert proc.stdout.readline(), proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    again = Memory.open(path)
    assert again.sources() == mem.sources() and same(snapshot(again), before)
    assert not any(p.name.startswith(".tmp-") for p in (path / "segments").iterdir())


# ----------------------------------------------------------------------------------------------
# strict validation (risk 9)


@pytest.mark.parametrize("name", ["", "../x", "/abs", "a\x00b", "0123456789ABCDEF", "0123456789abcde", ".tmp-x",
                                  "0123456789abcdef/..", 12, None])
def test_hostile_segment_names_are_refused(tmp_path, name):
    path = tmp_path / "m"
    small_memory(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["segments"][0]["name"] = name
    set_manifest(path, manifest)
    before = tree(path / "segments")
    with pytest.raises(MemoryFormatError) as err:
        Memory.open(path)
    assert "16 hex digits" in one_line(err)
    assert tree(path / "segments") == before  # nothing was cleaned up on a damaged manifest


def _damage(manifest: dict, where: str, value) -> None:
    *keys, last = where.split(".")
    obj = manifest
    for key in keys:
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    obj[last] = value


MANIFEST_DAMAGE = [
    ("layout.n_layers", "2"), ("layout.n_layers", 2.0), ("layout.n_layers", 0), ("layout.n_layers", -1),
    ("layout.n_layers", True), ("layout.head_dim", 10**12), ("store.kind", ["exact"]), ("store.kind", None),
    ("store.params", []), ("store.params", {"nope": 1}), ("dtype", ["float16"]), ("dtype", "int8"),
    ("model_id", 5), ("segments", {}), ("n_tokens", 71), ("n_tokens", "70"), ("format_version", True),
    ("format_version", "1"), ("format_version", 1.0), ("segments.0.n_tokens", 10**30),
    ("segments.0.n_tokens", 40.0), ("segments.0.n_docs", -1), ("segments.0.meta_sha256", "x"),
    ("segments.0.source", 3),
]


@pytest.mark.parametrize("where,value", MANIFEST_DAMAGE, ids=[f"{w}={v!r}" for w, v in MANIFEST_DAMAGE])
def test_manifest_fields_are_checked_explicitly(tmp_path, where, value):
    path = tmp_path / "m"
    small_memory(path)
    manifest = json.loads((path / "manifest.json").read_text())
    _damage(manifest, where, value)
    set_manifest(path, manifest)
    with pytest.raises(MemoryFormatError) as err:
        Memory.open(path)
    msg = one_line(err)
    assert "out of range 0..-1" not in msg


def test_unknown_store_kind_asks_for_an_upgrade(tmp_path):
    path = tmp_path / "m"
    small_memory(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["store"]["kind"] = "annoy"
    set_manifest(path, manifest)
    with pytest.raises(MemoryFormatError, match="unknown to this kvmap"):
        Memory.open(path)


def test_validation_survives_python_O(tmp_path):
    """``python -O`` strips asserts: the checks must still refuse a damaged manifest."""
    path = tmp_path / "m"
    small_memory(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["segments"][0]["name"] = ""
    set_manifest(path, manifest)
    code = ("import sys; from kvmap.stores import Memory; from kvmap.errors import MemoryFormatError\n"
            "try:\n    Memory.open(sys.argv[1])\nexcept MemoryFormatError as e:\n    print('refused', e)")
    out = subprocess.run([sys.executable, "-O", "-c", code, str(path)], capture_output=True, text=True,
                         env=ENV, cwd=ROOT, timeout=120)
    assert out.stdout.startswith("refused") and "16 hex digits" in out.stdout, out.stderr


def test_meta_json_may_name_only_the_files_of_its_layout_and_store(tmp_path):
    path = tmp_path / "m"
    small_memory(path, store="lsh")
    name = segment_names(path)[0]
    meta_file = path / "segments" / name / "meta.json"
    for hostile in ["../../outside", "/etc/hostname", "", "a\x00b", "k02.bin", "l00h00.faiss", "bounds-b64.npy"]:
        meta = json.loads(meta_file.read_text())
        meta["files"][hostile] = {"size": 1, "sha256": "0" * 64}
        set_meta(path, name, meta)
        with pytest.raises(MemoryFormatError) as err:
            Memory.open(path)
        assert "unexpected file" in one_line(err), hostile
        meta["files"].pop(hostile)
        set_meta(path, name, meta)
    Memory.open(path)
    meta = json.loads(meta_file.read_text())
    meta["files"].pop("lsh01.npz")
    set_meta(path, name, meta)
    with pytest.raises(MemoryFormatError, match="lsh01.npz"):
        Memory.open(path)


def _ids(n: int) -> dict:
    return dict(token_ids=np.arange(n), doc_ids=np.zeros(n, np.int64), offsets=np.arange(n))


CRAFTED = {
    "texts holds ints": ("texts.json", lambda n: json.dumps(list(range(n))).encode()),
    "texts too short": ("texts.json", lambda n: json.dumps(["x"] * (n - 1)).encode()),
    "texts not a list": ("texts.json", lambda n: b'{"a": 1}'),
    "tokens float": ("tokens.npz", lambda n: npz(**{**_ids(n), "token_ids": np.zeros(n, np.float64)})),
    "tokens short": ("tokens.npz", lambda n: npz(**{**_ids(n), "offsets": np.arange(n - 1)})),
    "token id 1e12": ("tokens.npz", lambda n: npz(**{**_ids(n), "token_ids": np.full(n, 10**12)})),
    "negative offsets": ("tokens.npz", lambda n: npz(**{**_ids(n), "offsets": -np.arange(n) - 1})),
    "tokens pickled": ("tokens.npz", lambda n: npz(**{**_ids(n), "doc_ids": np.array([object()] * n)})),
    "tokens missing array": ("tokens.npz", lambda n: npz(token_ids=np.arange(n))),
    "tokens 2-d": ("tokens.npz", lambda n: npz(**{**_ids(n), "doc_ids": np.zeros((n, 1), np.int64)})),
}


@pytest.mark.parametrize("damage", list(CRAFTED))
def test_crafted_tokens_and_texts_are_refused(tmp_path, damage):
    """Damage with matching checksums: only the content check can find it."""
    path = tmp_path / "m"
    small_memory(path)
    file, make = CRAFTED[damage]
    rewrite(path, segment_names(path)[0], file, make(40))
    mem = Memory.open(path)
    with pytest.raises(MemoryFormatError) as err:
        mem.entry(0)
    assert file in one_line(err)
    with pytest.raises(MemoryFormatError):
        mem.token_texts() if file == "texts.json" else mem.offsets(torch.zeros(1, dtype=torch.int64))
    assert mem.entry(45).source == "b"  # the other segment is fine


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_keys_are_refused_when_verifying(tmp_path, bad):
    path = tmp_path / "m"
    small_memory(path)
    name = segment_names(path)[0]
    keys = np.fromfile(path / "segments" / name / "k01.bin", np.float16)
    keys[7] = bad
    rewrite(path, name, "k01.bin", keys.tobytes())
    with pytest.raises(MemoryFormatError) as err:
        Memory.open(path)
    assert "NaN or infinite" in one_line(err) and "k01.bin" in one_line(err)
    Memory.open(path, verify=False)  # sizes only: the documented cost of skipping verification


def test_lsh_order_out_of_range_is_a_format_error(tmp_path):
    path = tmp_path / "m"
    small_memory(path, store="lsh")
    name = segment_names(path)[0]
    file = path / "segments" / name / "lsh00.npz"
    with np.load(file) as z:
        tables = {k: z[k] for k in z.files}
    tables["order"] = tables["order"] + 1000
    rewrite(path, name, "lsh00.npz", npz(**tables))
    mem = Memory.open(path)
    with pytest.raises(MemoryFormatError) as err:
        mem.search(0, queries(0), 3)
    assert "layer 0" in one_line(err)
    mem.search(1, queries(0), 3)  # the other layer's index is whole


# ----------------------------------------------------------------------------------------------
# OS errors: read-only, not a folder, disk full


def _refuse(monkeypatch, func: str, code: int, when=lambda p: True):
    real = getattr(os, func)

    def fake(p, *args, **kwargs):
        if when(str(p)):
            raise OSError(code, os.strerror(code), str(p))
        return real(p, *args, **kwargs)

    monkeypatch.setattr(os, func, fake)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_memory_opens_and_says_it_is_read_only(tmp_path, monkeypatch, code):
    path = tmp_path / "m"
    mem = small_memory(path)
    before = snapshot(mem)
    _refuse(monkeypatch, "open", code, when=lambda p: p.endswith(".lock"))
    again = Memory.open(path)
    assert same(snapshot(again), before)
    for change in (lambda: again.writer("c").__enter__(), lambda: again.forget("a")):
        with pytest.raises(KVMapError) as err:
            change()
        assert "read-only" in one_line(err) and "another writer" not in one_line(err)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_creating_a_memory_in_a_read_only_folder_is_one_line(tmp_path, monkeypatch, code):
    _refuse(monkeypatch, "mkdir", code)
    with pytest.raises(KVMapError) as err:
        Memory.open_or_create(tmp_path / "ro" / "m", MODEL, LAYOUT)
    assert "cannot create memory" in one_line(err)


def test_memory_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for make in (lambda p: Memory.create(p, MODEL, LAYOUT), lambda p: Memory.open_or_create(p, MODEL, LAYOUT),
                 lambda p: Memory.open(p)):
        with pytest.raises(KVMapError) as err:
            make(tmp_path / "file" / "sub")
        one_line(err)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["append", "commit", "manifest", "replace", "forget"])
def test_disk_full_is_one_line_and_leaves_the_memory_intact(tmp_path, monkeypatch, where):
    path = tmp_path / "m"
    mem = small_memory(path)
    before, manifest = snapshot(mem), (path / "manifest.json").read_bytes()
    target = {"append": (segment_module, "write_all"), "commit": (segment_module, "write_bytes_atomic")}.get(
        where, (memory_module, "write_json_atomic"))
    monkeypatch.setattr(*target, _disk_full)
    with pytest.raises(KVMapError) as err:
        if where == "forget":
            mem.forget("a")
        else:
            with mem.writer("a" if where == "replace" else "c", replace=where == "replace") as w:
                w.append(**make_tokens(np.random.default_rng(3), 8))
    assert "disk is full" in one_line(err)
    monkeypatch.undo()
    assert (path / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in (path / "segments").iterdir()) == sorted(segment_names(path))
    assert same(snapshot(mem), before) and same(snapshot(Memory.open(path)), before)
    remember(mem, "c", np.random.default_rng(4), [5])  # and it still works
    assert mem.n_tokens == 75


# ----------------------------------------------------------------------------------------------
# the empty memory (what a killed first `remember` leaves)


@pytest.mark.parametrize("store", ["exact", "flat", "lsh"])
def test_empty_memory_opens_and_answers_empty(tmp_path, store):
    path = tmp_path / "m"
    Memory.create(path, MODEL, LAYOUT, store=store)
    (path / "segments" / ".tmp-0123456789abcdef").mkdir()  # the killed writer's folder
    mem = Memory.open(path)
    assert mem.n_tokens == 0 and mem.n_segments == 0 and mem.sources() == [] and mem.token_texts() == []
    assert not any((path / "segments").iterdir())
    q = queries(0)
    s, i = mem.search(0, q, 4)
    assert s.shape == (3, 9, 4) and (i == -1).all()
    s, i = mem.search_streamed(1, q, 4)
    assert s.shape == i.shape == (3, 9, 0)
    k, v = mem.fetch(0, torch.full((3, 2), -1))
    assert k.shape == (3, 2, 16) and not k.any()
    assert mem.block_means(0, 8).shape == (3, 0, 16)
    lo, hi, starts, lengths = mem.block_bounds(1, 8)
    assert lo.shape == hi.shape == (3, 0, 16) and len(starts) == len(lengths) == 0
    assert mem.offsets(torch.full((2,), -1)).tolist() == [-1, -1]
    for bad in (lambda: mem.fetch(0, torch.zeros(3, 1, dtype=torch.int64)), lambda: mem.entry(0)):
        with pytest.raises(InputError) as err:
            bad()
        assert "empty" in one_line(err)


# ----------------------------------------------------------------------------------------------
# search_streamed over some segments (the sharded memory's shards)


def test_search_streamed_over_a_partition_of_segments_merges_to_the_full_search(tmp_path):
    path = tmp_path / "m"
    mem = small_memory(path, sources=("a", "b", "c", "d"), sizes=(30, 7, 50, 21))
    q = queries(3, m=11)
    for layer in range(LAYOUT.n_layers):
        full_s, full_i = mem.search_streamed(layer, q, 10, chunk=16)
        parts = [mem.search_streamed(layer, q, 10, chunk=16, segments=seg) for seg in ([0, 2], [3], [1])]
        s, pick = torch.cat([p[0] for p in parts], dim=-1).topk(10, dim=-1)
        i = torch.cat([p[1] for p in parts], dim=-1).gather(-1, pick)
        assert torch.equal(i, full_i) and torch.equal(s, full_s)
        ref_s, ref_i = mem.search(layer, q, 10)
        assert torch.equal(i, ref_i)
        torch.testing.assert_close(s, ref_s)
    s, i = mem.search_streamed(0, q, 10, segments=[1])  # 7 tokens: k clipped to what the shard holds
    assert s.shape == (3, 11, 7) and ((i >= 30) & (i < 37)).all()
    with pytest.raises(InputError):
        mem.search_streamed(0, q, 10, segments=[4])


def test_segment_sizes_and_kv(tmp_path):
    path = tmp_path / "m"
    mem = Memory.create(path, MODEL, LAYOUT)
    tokens = make_tokens(np.random.default_rng(5), 9)
    with mem.writer("a") as w:
        w.append(**tokens)
    assert mem.segment_sizes() == [9]
    k, v = mem.segment_kv(0, 1)
    assert k.shape == (9, 3, 16) and not k.flags.writeable
    np.testing.assert_array_equal(v, tokens["values"][1].transpose(1, 0, 2).astype(np.float16))


def test_crafted_flat_faiss_file_is_refused_not_a_crash(tmp_path):
    """faiss parses index files natively: the first 27 bytes of a real flat index (checksums fixed
    up) crash ``faiss.read_index`` with SIGSEGV. The flat header is checked byte for byte first."""
    path = tmp_path / "m"
    small_memory(path, store="flat")
    name = segment_names(path)[0]
    rewrite(path, name, "l00h01.faiss", (path / "segments" / name / "l00h01.faiss").read_bytes()[:27])
    code = ("import sys, torch; from kvmap.stores import Memory; from kvmap.errors import MemoryFormatError\n"
            "mem = Memory.open(sys.argv[1])\n"
            "try:\n    mem.search(0, torch.ones(3, 1, 16), 3)\nexcept MemoryFormatError as e:\n    print('refused', e)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=ENV,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, f"rc {out.returncode}: {out.stderr[-300:]}"
    assert out.stdout.startswith("refused") and "l00h01.faiss" in out.stdout and out.stdout.count("\n") == 1


@pytest.mark.parametrize("field,value", [("token_ids", 10**12), ("offsets", -1), ("doc_ids", -3), ("offsets", 0.5)])
def test_writer_refuses_what_the_loader_would_refuse(tmp_path, field, value):
    mem = Memory.create(tmp_path / "m", MODEL, LAYOUT)
    tokens = make_tokens(np.random.default_rng(0), 4)
    tokens[field] = np.full(4, value)
    with pytest.raises(InputError) as err:
        with mem.writer("a") as w:
            w.append(**tokens)
    assert field in one_line(err) and mem.n_tokens == 0
