"""Property-based fuzzing of the memory folder's loaders (hypothesis).

Each case copies a small, whole memory (store kind exact, faiss flat or LSH), damages it in one
to three ways (truncated, flipped or extended files, deleted files, files replaced by symlinks,
hostile JSON values anywhere in manifest.json / meta.json / texts.json, hostile segment names,
wrong dimensions, and crafted content whose checksums were fixed up so that only the content
checks can catch it), then opens it and uses it. Every case must either work or raise a
``KVMapError`` with a one-line message: never another exception, never a hang, and never a read
or write outside the memory folder (a sentinel folder beside it must stay byte-identical).

The normal test run does ``KVMAP_FUZZ_EXAMPLES`` (default 100) cases per store kind with a fixed
seed; ``make fuzz`` runs 10,000 in all with fresh randomness and prints the counts.
"""
from __future__ import annotations

import collections
import io
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmap.errors import KVMapError
from kvmap.ports import KVLayout
from kvmap.stores import Memory
from test_memory_safety import npz, rewrite, set_meta, tree

KINDS = ("exact", "flat", "lsh")
EXAMPLES = int(os.environ.get("KVMAP_FUZZ_EXAMPLES", "300"))
PER_KIND = max(1, -(-EXAMPLES // len(KINDS)))  # at least EXAMPLES in all
FRESH = "KVMAP_FUZZ_EXAMPLES" in os.environ  # make fuzz: new randomness; the test run: a fixed seed
CASE_SECONDS = 30  # a case running longer is a hang
LAYOUT = KVLayout(n_layers=2, n_kv_heads=2, head_dim=8)
STATS = {"cases": 0, "opened": 0, "refused": 0, "hangs": 0}
REASONS: collections.Counter = collections.Counter()  # what the refusals said, roughly
OTHERS: list[str] = []  # a few refusals of no listed kind, printed for a reader to judge
REASON_WORDS = ("checksum mismatch", "symlink", "damaged manifest", "truncated or altered", "missing", "cannot read",
                "does not record", "unexpected file", "differs from", "NaN or infinite", "format version",
                "not a kvmap memory", "damaged index", "unknown to this kvmap", "made by model", "holds K/V of layout")

HOSTILE_NAMES = ["", "../x", "/abs", "a\x00b", "..", ".", "0123456789abcdef", "0123456789ABCDEF", ".tmp-x",
                 "segments", "../../sentinel", "/etc/passwd", "k00.bin", "x" * 300, "é", "a/b"]
SCALARS = st.one_of(
    st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2, 7, 2**31, 2**63, 10**12, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(HOSTILE_NAMES),
    st.sampled_from(["exact", "flat", "lsh", "hnsw", "float16", "float32", "test/model"]),
    st.booleans(), st.none(),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=3))


# ----------------------------------------------------------------------------------------------
# fixtures: one base memory per kind, a sentinel folder, a reused case folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    bases = {}
    for kind in KINDS:
        mem = Memory.create(root / "base" / kind, "test/model", LAYOUT, store=kind)
        for source, n in (("a.txt", 24), ("b.txt", 17)):
            shape = (LAYOUT.n_layers, LAYOUT.n_kv_heads, n, LAYOUT.head_dim)
            with mem.writer(source) as w:
                w.append(rng.standard_normal(shape), rng.standard_normal(shape), rng.integers(0, 500, n),
                         np.zeros(n, int), np.arange(n), [f"w{i}" for i in range(n)])
        bases[kind] = root / "base" / kind
    sentinel = root / "work" / "sentinel"
    (sentinel / "0123456789abcdef").mkdir(parents=True)
    (sentinel / "0123456789abcdef" / "k00.bin").write_bytes(b"\x00" * 64)
    (sentinel / ".tmp-1").mkdir()
    (sentinel / "secret.txt").write_text("do not touch")
    (sentinel / "manifest.json").write_text(json.dumps({"format_version": 1}))
    start = time.perf_counter()
    yield {"bases": bases, "work": root / "work", "sentinel": sentinel, "before": tree(sentinel)}
    seconds = time.perf_counter() - start
    print(f"\nfuzz: {STATS['cases']} cases ({STATS['opened']} opened and used, {STATS['refused']} refused "
          f"with a one-line KVMapError), 0 tracebacks, {STATS['hangs']} hangs, {seconds:.0f} s", file=sys.stderr)
    print("fuzz refusals: " + ", ".join(f"{n} {why}" for why, n in REASONS.most_common()), file=sys.stderr)
    for msg in OTHERS:
        print(f"fuzz other refusal: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# damage


def _files(path: Path) -> list[Path]:
    """Every file and folder of the memory, in a stable order."""
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        out += [Path(root) / n for n in sorted(dirs + files)]
    return out


def _real(path: Path, file: Path) -> bool:
    """``file`` lies below ``path`` and no part of it is a symlink: the damage itself must not
    write outside."""
    try:
        parts = file.relative_to(path).parts
    except ValueError:
        return False
    part = path
    for name in parts:
        part = part / name
        if part.is_symlink() or name in ("..", "."):
            return False
    return True


def _pick(items: list, i: int):
    return items[i % len(items)] if items else None


def _set_in(obj, path: list[int], value):
    """Replace the value found by walking ``path`` (indices into keys or items) through JSON ``obj``."""
    for depth, i in enumerate(path):
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj))) if isinstance(obj, list) else []
        if not keys:
            break
        key = keys[i % len(keys)]
        child = obj[key]
        if depth == len(path) - 1 or not isinstance(child, (dict, list)) or not child:
            obj[key] = value
            return
        obj = child


def _segments(path: Path) -> list[str]:
    with open(path / "manifest.json", "rb") as f:
        return [r["name"] for r in json.load(f)["segments"]]


def _crafted(kind: str, seg: Path, n: int, data) -> tuple[str, bytes]:
    """A file of wrong content (right name) for a segment of n tokens, drawn from ``data``."""
    what = data.draw(st.sampled_from(["tokens", "texts", "kv", "lsh", "faiss", "bounds"]))
    length = n + data.draw(st.sampled_from([0, 0, -1, 1, -n]))
    if what == "tokens":
        dtype = data.draw(st.sampled_from(["int64", "int32", "uint64", "float32", "bool", "int8"]))
        big = data.draw(st.sampled_from([0, 1, -1, 10**12, 2**63 - 1, -(2**62)]))
        cols = {k: (np.arange(max(length, 0)) * (1 if big == 0 else big)).astype(dtype, casting="unsafe")
                for k in ("token_ids", "doc_ids", "offsets")}
        if data.draw(st.booleans()):
            cols.pop(data.draw(st.sampled_from(sorted(cols))))
        return "tokens.npz", npz(**cols)
    if what == "texts":
        item = data.draw(st.one_of(st.text(max_size=3), SCALARS))
        return "texts.json", json.dumps([item] * max(length, 0)).encode()
    if what == "kv":
        values = np.random.default_rng(0).standard_normal(max(length, 0) * 2 * 8).astype(np.float16)
        if len(values):
            values[data.draw(st.integers(0, len(values) - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1.0]))
        return data.draw(st.sampled_from(["k00.bin", "v01.bin"])), values.tobytes()
    if what == "lsh" and kind == "lsh":
        h, t = LAYOUT.n_kv_heads, data.draw(st.sampled_from([16, 15]))
        order = np.tile(np.arange(max(length, 0)), (h, t, 1)) + data.draw(st.sampled_from([0, 0, n, -n, 2**40]))
        return "lsh00.npz", npz(planes=np.ones((16 * 8, 9), np.float32) * data.draw(st.sampled_from([1.0, np.nan])),
                                scale=np.ones(h, np.float32), codes=np.zeros((h, t, max(length, 0)), np.uint8),
                                order=order.astype(data.draw(st.sampled_from(["int32", "int64", "uint8", "float32"]))))
    if what == "faiss" and kind == "flat":  # the real file, cut or with a header byte changed
        name = data.draw(st.sampled_from(["l00h00.faiss", "l01h01.faiss"]))
        raw = bytearray((seg / name).read_bytes()) if (seg / name).is_file() else bytearray()
        if raw and data.draw(st.booleans()):
            raw[data.draw(st.integers(0, min(63, len(raw) - 1)))] ^= data.draw(st.integers(1, 255))
        else:
            raw = raw[: data.draw(st.integers(0, len(raw)))] + data.draw(st.binary(max_size=16))
        return name, bytes(raw)
    buf = io.BytesIO()  # a bounds cache of the wrong shape or dtype (derived data: must be ignored)
    np.save(buf, np.zeros((2, 2, data.draw(st.integers(0, 9)), 2, 8), data.draw(st.sampled_from(["float16", "float64"]))))
    return "bounds-b8.npy", buf.getvalue()


def damage(path: Path, kind: str, sentinel: Path, data) -> None:
    """Apply one drawn damage to the memory at ``path``."""
    op = data.draw(st.sampled_from(["truncate", "flip", "append", "delete", "symlink", "json", "json", "name",
                                    "crafted", "crafted", "dims", "stray", "stray"]), label="op")
    files = [f for f in _files(path) if f.is_file() and not f.is_symlink()]
    anything = _files(path)
    if op in ("truncate", "flip", "append") and files:
        file = _pick(files, data.draw(st.integers(0, 999)))
        raw = bytearray(file.read_bytes())
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "truncate":
            raw = raw[:at]
        elif op == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        else:
            raw += data.draw(st.binary(min_size=1, max_size=64))
        file.write_bytes(bytes(raw))
    elif op == "delete" and anything:
        target = _pick(anything, data.draw(st.integers(0, 999)))
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
    elif op == "symlink" and anything:
        target = _pick(anything + [path / ".lock"], data.draw(st.integers(0, 999)))
        if os.path.lexists(target):
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        target.symlink_to(_pick(sorted(sentinel.iterdir()) + [sentinel / "missing"], data.draw(st.integers(0, 9))))
    elif op == "json":
        names = _segments_safe(path)
        choices = [path / "manifest.json"] + [path / "segments" / n / f for n in names for f in ("meta.json", "texts.json")]
        file = _pick(choices, data.draw(st.integers(0, 99)))
        if not _real(path, file):
            return
        try:
            obj = json.loads(file.read_bytes())
        except (OSError, ValueError):
            return
        _set_in(obj, data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=4)), data.draw(VALUES))
        if file.name == "meta.json" and data.draw(st.booleans()) and _real(path, path / "manifest.json"):
            # consistent checksums: a crafted segment
            set_meta(path, file.parent.name, obj)
        else:
            file.write_text(json.dumps(obj))
    elif op == "name":
        manifest = _manifest_safe(path)
        if manifest and manifest.get("segments") and _real(path, path / "manifest.json"):
            manifest["segments"][data.draw(st.integers(0, 9)) % len(manifest["segments"])]["name"] = \
                data.draw(st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(max_size=20)))
            (path / "manifest.json").write_text(json.dumps(manifest))
    elif op == "crafted":
        names, manifest = _segments_safe(path), _manifest_safe(path)
        if names and manifest:
            name = names[data.draw(st.integers(0, 9)) % len(names)]
            rec = next(r for r in manifest["segments"] if r["name"] == name)
            seg = path / "segments" / rec["name"]
            if not _real(path, seg):
                return
            file, raw = _crafted(kind, seg, rec["n_tokens"], data)
            if not (_real(path, seg / file) and _real(path, seg / "meta.json") and _real(path, path / "manifest.json")):
                return
            with _tolerant():
                rewrite(path, rec["name"], file, raw)
    elif op == "stray" and (path / "segments").is_dir() and not (path / "segments").is_symlink():
        # what killed writers leave (cleanup removes them) and what is not ours (cleanup keeps it)
        name = data.draw(st.sampled_from([".tmp-0123abcd", "fedcba9876543210", "notes", "bounds-b8.npy"]))
        stray = path / "segments" / name
        if not os.path.lexists(stray):
            stray.mkdir()
            (stray / "k00.bin").write_bytes(b"\x00" * 8)
        if data.draw(st.booleans()) and not os.path.lexists(path / ".manifest.json.0badcafe.tmp"):
            (path / ".manifest.json.0badcafe.tmp").write_text("{")
    elif op == "dims":
        manifest = _manifest_safe(path)
        if manifest and _real(path, path / "manifest.json"):
            key = data.draw(st.sampled_from(["n_layers", "n_kv_heads", "head_dim"]))
            with _tolerant():
                manifest["layout"][key] = data.draw(st.sampled_from([1, 3, 4, 16, 1024, 0]))
                (path / "manifest.json").write_text(json.dumps(manifest))


class _tolerant:
    """Damage steps may find earlier damage in their way: then they just do less."""

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        return kind is not None and issubclass(kind, (OSError, ValueError, KeyError, TypeError, AttributeError))


def _manifest_safe(path: Path):
    with _tolerant():
        manifest = json.loads((path / "manifest.json").read_bytes())
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("segments"), list) and all(
            isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("n_tokens"), int)
            and 0 < r["n_tokens"] < 10**6 for r in manifest["segments"]) else None
    return None


def _segments_safe(path: Path) -> list[str]:
    manifest = _manifest_safe(path)
    names = [r["name"] for r in manifest["segments"]] if manifest else []
    return [n for n in names if len(n) == 16 and all(c in "0123456789abcdef" for c in n)]


# ----------------------------------------------------------------------------------------------
# use


def use(path: Path, verify: bool, expect: bool) -> None:
    """Open the memory and touch every read path: search, streamed search, fetch, entry, texts, blocks."""
    if expect:  # as the CLI opens it: made by this model, of this layout
        mem = Memory.open(path, expect_model_id="test/model", expect_layout=LAYOUT, verify=verify)
    else:
        mem = Memory.open(path, verify=verify)
    H, d = mem.layout.n_kv_heads, mem.layout.head_dim
    mem.sources()
    if H * d > 1 << 14:  # an empty memory may declare a big layout; queries of it are the test's cost
        return
    q = torch.randn(H, 3, d, generator=torch.Generator().manual_seed(0))
    for layer in sorted({0, mem.layout.n_layers - 1}):
        scores, ids = mem.search(layer, q, 5)
        mem.search_streamed(layer, q, 5, chunk=7)
        mem.fetch(layer, ids)
        mem.offsets(ids)
    if mem.n_tokens:
        mem.entry(0)
        mem.entry(mem.n_tokens - 1)
    mem.token_texts()
    mem.block_means(0, 8)
    mem.block_bounds(0, 8)


class Hang(BaseException):
    """Raised by the alarm: a case ran past CASE_SECONDS."""


def _alarm(signum, frame):
    raise Hang()


def run_case(world, kind: str, data) -> None:
    case = world["work"] / "case"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir()
    path = case / "m"
    shutil.copytree(world["bases"][kind], path, symlinks=True)
    for _ in range(data.draw(st.integers(1, 3), label="n_damages")):
        damage(path, kind, world["sentinel"], data)
    verify = data.draw(st.booleans(), label="verify")
    expect = data.draw(st.booleans(), label="expect model and layout")
    STATS["cases"] += 1
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        use(path, verify, expect)
        STATS["opened"] += 1
        left = os.listdir(path / "segments") if (path / "segments").is_dir() else []
        assert not [n for n in left if n.startswith(".tmp-") and not (path / "segments" / n).is_symlink()], left
        temp = path / ".manifest.json.0badcafe.tmp"  # removed when a real file; a symlink is not provably ours
        assert temp.is_symlink() or not temp.exists()
    except KVMapError as err:
        msg = str(err)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        STATS["refused"] += 1
        why = next((w for w in REASON_WORDS if w in msg), "other")
        REASONS[why] += 1
        if why == "other" and len(OTHERS) < 3:
            OTHERS.append(msg)
    except Hang:
        STATS["hangs"] += 1
        raise AssertionError(f"a case ran past {CASE_SECONDS} s") from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert tree(world["sentinel"]) == world["before"], "something outside the memory folder changed"
    assert sorted(os.listdir(case)) == ["m"], "something was written beside the memory folder"


FUZZ = settings(max_examples=PER_KIND, deadline=None, database=None, derandomize=not FRESH, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_damaged_memory_opens_and_works_or_fails_with_one_line(world, kind, data):
    run_case(world, kind, data)
