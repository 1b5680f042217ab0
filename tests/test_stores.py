"""Stores and the Memory folder: search parity, recall, persistence, forget, damage, crashes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kvmap.errors import InputError, KVMapError, MemoryFormatError
from kvmap.ports import KVLayout
from kvmap.stores import STORE_KINDS, Memory, make_index

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = KVLayout(n_layers=2, n_kv_heads=3, head_dim=16)
MODEL = "test/model"

# Recall@10 against exact search, 2 segments, random Gaussian keys and queries (d=16).
# Measured with these seeds: hnsw 1.00, ivfpq 0.97 (m=8), lsh 0.93 (16 tables x 8 bits, multi-probe).
# Bars leave room for other BLAS/faiss builds but catch a broken index (which scores near 10/N).
RECALL_BAR = {"hnsw": 0.95, "ivfpq": 0.90, "lsh": 0.80}
# Parameters that make small test segments exercise the real structure (IVF-PQ needs
# min_points tokens before it stops falling back to a flat index).
SMALL_PARAMS = {"exact": {}, "flat": {}, "hnsw": {}, "ivfpq": {"min_points": 256, "m": 8}, "lsh": {}}


# ----------------------------------------------------------------------------------------------
# helpers


def make_tokens(rng: np.random.Generator, n: int, doc: int = 0, start: int = 0, layout: KVLayout = LAYOUT):
    """Random keys/values (L, H, n, d) and provenance for n tokens."""
    shape = (layout.n_layers, layout.n_kv_heads, n, layout.head_dim)
    return dict(
        keys=rng.standard_normal(shape).astype(np.float32),
        values=rng.standard_normal(shape).astype(np.float32),
        token_ids=rng.integers(0, 1000, n),
        doc_ids=np.full(n, doc),
        offsets=np.arange(start, start + n),
        texts=[f"t{doc}.{start + i}" for i in range(n)],
    )


def remember(mem: Memory, source: str, rng: np.random.Generator, sizes: list[int], doc: int = 0) -> dict:
    """Write one segment from chunks of the given sizes; return the concatenated inputs."""
    chunks = []
    with mem.writer(source) as w:
        start = 0
        for n in sizes:
            c = make_tokens(rng, n, doc=doc, start=start)
            w.append(**c)
            chunks.append(c)
            start += n
    return {
        "keys": np.concatenate([c["keys"] for c in chunks], axis=2),
        "values": np.concatenate([c["values"] for c in chunks], axis=2),
        "offsets": np.concatenate([c["offsets"] for c in chunks]),
        "texts": sum((c["texts"] for c in chunks), []),
    }


def stacked(parts: list[dict], name: str) -> np.ndarray:
    """All segments' vectors (L, H, N, d), as stored: rounded through float16."""
    return np.concatenate([p[name] for p in parts], axis=2).astype(np.float16).astype(np.float32)


def brute_force(keys: np.ndarray, layer: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference MIPS: keys (L, H, N, d), queries (H, M, d) -> scores, ids (H, M, k)."""
    sim = np.einsum("hmd,hnd->hmn", queries.astype(np.float64), keys[layer].astype(np.float64))
    ids = np.argsort(-sim, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(sim, ids, -1), ids


def recall(ref_ids: torch.Tensor, ids: torch.Tensor) -> float:
    k = ref_ids.shape[-1]
    a, b = ref_ids.reshape(-1, k).tolist(), ids.reshape(-1, k).tolist()
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def queries(seed: int, m: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.n_kv_heads, m, LAYOUT.head_dim, generator=g)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# search


def test_exact_matches_brute_force_across_segments(tmp_path):
    rng = np.random.default_rng(0)
    mem = Memory.create(tmp_path / "m", MODEL, LAYOUT)
    parts = [remember(mem, "a", rng, [60, 90]), remember(mem, "b", rng, [130], doc=1)]
    assert mem.n_tokens == 280
    keys = stacked(parts, "keys")
    q = queries(1)
    for layer in range(LAYOUT.n_layers):
        scores, ids = mem.search(layer, q, k=10)
        assert scores.shape == ids.shape == (3, 9, 10)
        assert scores.dtype == torch.float32 and ids.dtype == torch.int64
        ref_s, ref_i = brute_force(keys, layer, q.numpy(), 10)
        np.testing.assert_array_equal(ids.numpy(), ref_i)
        np.testing.assert_allclose(scores.numpy(), ref_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(STORE_KINDS))
def test_fewer_than_k_pads_with_minus_one(tmp_path, kind):
    rng = np.random.default_rng(2)
    mem = Memory.create(tmp_path / "m", MODEL, LAYOUT, store=kind)
    scores, ids = mem.search(0, queries(0), k=4)  # empty memory
    assert (ids == -1).all() and torch.isinf(scores).all()
    remember(mem, "a", rng, [3])
    remember(mem, "b", rng, [2])
    scores, ids = mem.search(1, queries(0), k=8)
    assert ids.shape == (3, 9, 8)
    found = ids >= 0
    assert torch.equal(torch.isfinite(scores), found)
    assert (found[..., :-1] >= found[..., 1:]).all()  # padding only after the hits
    assert (ids[..., 5:] == -1).all() and (ids < 5).all()
    if kind != "lsh":  # LSH may miss keys whose bucket no probe reaches
        assert sorted(ids[0, 0].tolist()) == [-1, -1, -1, 0, 1, 2, 3, 4]


def test_faiss_flat_equals_exact(tmp_path):
    mems = {}
    for kind in ("exact", "flat"):
        rng = np.random.default_rng(3)
        mems[kind] = Memory.create(tmp_path / kind, MODEL, LAYOUT, store=kind)
        remember(mems[kind], "a", rng, [100, 50])
        remember(mems[kind], "b", rng, [120])
    q = queries(4, m=20)
    for layer in range(LAYOUT.n_layers):
        s_exact, i_exact = mems["exact"].search(layer, q, 10)
        s_flat, i_flat = mems["flat"].search(layer, q, 10)
        torch.testing.assert_close(s_flat, s_exact, rtol=1e-5, atol=1e-5)
        assert torch.equal(i_flat, i_exact)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq", "lsh"])
def test_approximate_recall(tmp_path, kind):
    rng = np.random.default_rng(5)
    params = {"m": 8, "min_points": 1000} if kind == "ivfpq" else {}  # segments below are real IVF-PQ
    exact = Memory.create(tmp_path / "exact", MODEL, LAYOUT)
    approx = Memory.create(tmp_path / kind, MODEL, LAYOUT, store=kind, store_params=params)
    for source, n in (("a", 1100), ("b", 1300)):
        chunk = make_tokens(rng, n)
        for mem in (exact, approx):
            with mem.writer(source) as w:
                w.append(**chunk)
    q = queries(6, m=50)
    rec = []
    for layer in range(LAYOUT.n_layers):
        _, ref = exact.search(layer, q, 10)
        scores, ids = approx.search(layer, q, 10)
        assert (ids >= 0).all()
        assert (scores[..., :-1] >= scores[..., 1:]).all()  # best first
        rec.append(recall(ref, ids))
    print(f"{kind} recall@10 = {np.mean(rec):.3f}")
    assert np.mean(rec) >= RECALL_BAR[kind]


def test_lsh_is_deterministic_and_finds_itself():
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((500, 3, 16)).astype(np.float32)
    a, b = make_index("lsh", seed=3), make_index("lsh", seed=3)
    a.build([keys])
    b.build([keys])
    q = torch.from_numpy(keys[:40].transpose(1, 0, 2).copy())  # (H, 40, d): the keys themselves
    sa, ia = a.search(q, 5)
    sb, ib = b.search(q, 5)
    assert torch.equal(ia, ib) and torch.equal(sa, sb)
    # A key always hashes into its own bucket, so its exact score is among the candidates.
    ref = torch.from_numpy(np.einsum("mhd,mhd->hm", keys[:40], keys[:40]))
    assert (sa[..., 0] >= ref - 1e-4).all()


def test_ivfpq_falls_back_to_flat_for_small_segments():
    rng = np.random.default_rng(19)
    small, large = make_index("ivfpq", min_points=300), make_index("ivfpq", min_points=300, m=4)
    small.build([rng.standard_normal((299, 2, 16)).astype(np.float32)])
    large.build([rng.standard_normal((600, 2, 16)).astype(np.float32)])
    assert type(small.heads[0]).__name__ == "IndexFlatIP"
    assert type(large.heads[1]).__name__ == "IndexIVFPQ" and large.heads[1].pq.M == 4


def test_make_index_rejects_unknown_kind_and_params():
    with pytest.raises(InputError, match="unknown store kind"):
        make_index("annoy")
    with pytest.raises(InputError):
        make_index("hnsw", nope=1)
    assert type(make_index("faiss-hnsw")) is STORE_KINDS["hnsw"]


# ----------------------------------------------------------------------------------------------
# persistence


@pytest.mark.parametrize("kind", list(STORE_KINDS))
def test_save_load_identical(tmp_path, kind):
    rng = np.random.default_rng(8)
    path = tmp_path / "m"
    mem = Memory.create(path, MODEL, LAYOUT, store=kind, store_params=SMALL_PARAMS[kind])
    parts = [remember(mem, "a.txt", rng, [200, 150]), remember(mem, "b.txt", rng, [300], doc=1)]
    q = queries(9)
    before = [mem.search(layer, q, 10) for layer in range(LAYOUT.n_layers)]

    again = Memory.open(path, expect_model_id=MODEL, expect_layout=LAYOUT)
    assert again.store_kind == kind and again.n_tokens == 650 and again.model_id == MODEL
    assert again.sources() == [
        {"source": "a.txt", "n_tokens": 350, "n_docs": 1},
        {"source": "b.txt", "n_tokens": 300, "n_docs": 1},
    ]
    for layer, (s, i) in enumerate(before):
        s2, i2 = again.search(layer, q, 10)
        assert torch.equal(i2, i) and torch.equal(s2, s)

    # fetch returns exactly what was written (after float16 rounding); -1 gives zeros
    ids = torch.from_numpy(rng.integers(-1, 650, (3, 4, 5)))
    keys, values = stacked(parts, "keys"), stacked(parts, "values")
    for layer in range(LAYOUT.n_layers):
        k, v = again.fetch(layer, ids)
        assert k.shape == v.shape == (3, 4, 5, 16) and k.dtype == torch.float32
        for h in range(3):
            for idx in np.ndindex(4, 5):
                j = int(ids[h][idx])
                want_k = keys[layer, h, j] if j >= 0 else np.zeros(16, np.float32)
                want_v = values[layer, h, j] if j >= 0 else np.zeros(16, np.float32)
                np.testing.assert_array_equal(k[h][idx].numpy(), want_k)
                np.testing.assert_array_equal(v[h][idx].numpy(), want_v)

    offsets = np.concatenate([p["offsets"] for p in parts])
    got = again.offsets(ids).numpy()
    np.testing.assert_array_equal(got, np.where(ids.numpy() >= 0, offsets[ids.numpy()], -1))
    e = again.entry(400, score=1.5)
    assert (e.source, e.doc_id, e.offset, e.text, e.score) == ("b.txt", 1, 50, "t1.50", 1.5)


def test_fetch_of_search_results_reproduces_scores(tmp_path):
    rng = np.random.default_rng(10)
    mem = Memory.create(tmp_path / "m", MODEL, LAYOUT, dtype="float32")
    parts = [remember(mem, "a", rng, [64])]
    q = queries(11)
    scores, ids = mem.search(1, q, 5)
    keys, _ = mem.fetch(1, ids)  # (H, M, k, d)
    torch.testing.assert_close(torch.einsum("hmd,hmkd->hmk", q, keys), scores)
    np.testing.assert_array_equal(keys[0, 0, 0].numpy(), parts[0]["keys"][1, 0, int(ids[0, 0, 0])])


def _file_pages_resident_kib() -> int:
    """This process's resident file-backed pages (Linux ``RssFile``), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_fetch_with_release_unmaps_the_pages_it_read(tmp_path):
    """Retrieval reuse gathers candidates spread over a memory larger than RAM: ``release`` drops the
    touched pages from this process's resident set, and later reads still see the same data."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    rng = np.random.default_rng(12)
    layout = KVLayout(n_layers=1, n_kv_heads=3, head_dim=64)
    mem = Memory.create(tmp_path / "m", MODEL, layout, dtype="float32")
    with mem.writer("a") as w:
        w.append(**make_tokens(rng, 20_000, layout=layout))  # 15 MB of keys and of values
    ids = torch.arange(20_000).repeat(3, 1)
    before = _file_pages_resident_kib()
    kept_k, kept_v = mem.fetch(0, ids)
    held = _file_pages_resident_kib()
    released_k, released_v = mem.fetch(0, ids, release=True)
    after = _file_pages_resident_kib()
    assert held - before > 20_000  # both files' pages stayed mapped
    assert after - before < 2_000, (before, held, after)
    assert torch.equal(released_k, kept_k) and torch.equal(released_v, kept_v)
    assert torch.equal(mem.fetch(0, ids[:, :5])[0], kept_k[:, :5])  # mapped again on the next read


def test_open_or_create(tmp_path):
    path = tmp_path / "m"
    mem = Memory.open_or_create(path, MODEL, LAYOUT, store="hnsw")
    remember(mem, "a", np.random.default_rng(0), [10])
    again = Memory.open_or_create(path, MODEL, LAYOUT)
    assert again.n_tokens == 10 and again.store_kind == "hnsw"
    with pytest.raises(MemoryFormatError) as err:
        Memory.open_or_create(path, MODEL, LAYOUT, store="exact")
    assert "hnsw" in one_line(err)


def test_create_refuses_existing_folders(tmp_path):
    Memory.create(tmp_path / "m", MODEL, LAYOUT)
    with pytest.raises(MemoryFormatError) as err:
        Memory.create(tmp_path / "m", MODEL, LAYOUT)
    assert "already" in one_line(err)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(MemoryFormatError) as err:
        Memory.create(tmp_path / "other", MODEL, LAYOUT)
    one_line(err)
    (tmp_path / "empty").mkdir()
    Memory.create(tmp_path / "empty", MODEL, LAYOUT)  # an empty folder is fine
    with pytest.raises(InputError):
        Memory.create(tmp_path / "bad", MODEL, LAYOUT, store="nope")


def test_append_rejects_bad_shapes(tmp_path):
    mem = Memory.create(tmp_path / "m", MODEL, LAYOUT)
    tokens = make_tokens(np.random.default_rng(0), 4)
    with pytest.raises(InputError):
        with mem.writer("a") as w:
            w.append(**{**tokens, "keys": tokens["keys"][:, :2]})
    with pytest.raises(InputError):
        with mem.writer("a") as w:
            w.append(**{**tokens, "texts": tokens["texts"][:3]})
    with pytest.raises(InputError, match="float32"):
        with mem.writer("a") as w:
            w.append(**{**tokens, "keys": tokens["keys"] * 1e6})  # overflows float16
    assert mem.n_tokens == 0 and mem.sources() == []
    with mem.writer("caught") as w:  # a rejected chunk leaves the segment consistent
        w.append(**tokens)
        with pytest.raises(InputError):
            w.append(**{**tokens, "values": tokens["values"] * np.nan})
    k, v = mem.fetch(1, torch.arange(4).expand(3, 4))
    np.testing.assert_array_equal(v.numpy(), tokens["values"][1].astype(np.float16).astype(np.float32))
    assert mem.forget("caught") == 4
    # torch tensors are accepted too
    with mem.writer("t") as w:
        w.append(**{**tokens, "keys": torch.from_numpy(tokens["keys"]), "values": torch.from_numpy(tokens["values"])})
    assert mem.n_tokens == 4


# ----------------------------------------------------------------------------------------------
# forget


@pytest.mark.parametrize("kind", ["exact", "lsh"])
def test_forget(tmp_path, kind):
    rng = np.random.default_rng(12)
    path = tmp_path / "m"
    mem = Memory.create(path, MODEL, LAYOUT, store=kind)
    a = remember(mem, "a", rng, [80])
    b1 = remember(mem, "b", rng, [70])
    c = remember(mem, "c", rng, [90], doc=2)
    remember(mem, "b", rng, [40])
    q = queries(13)
    mem.search(0, q, 5)  # fills the caches that forget must drop
    b_folders = [p for p in (path / "segments").iterdir() if json.loads((p / "meta.json").read_text())["source"] == "b"]
    assert len(b_folders) == 2 and b1["keys"].shape[2] == 70

    assert mem.forget("b") == 110
    assert mem.n_tokens == 170 and [s["source"] for s in mem.sources()] == ["a", "c"]
    assert not any(p.exists() for p in b_folders)
    keys = stacked([a, c], "keys")
    for m in (mem, Memory.open(path)):
        for layer in range(LAYOUT.n_layers):
            ref_s, ref_i = brute_force(keys, layer, q.numpy(), 5)
            s, i = m.search(layer, q, 5)
            if kind == "exact":
                np.testing.assert_array_equal(i.numpy(), ref_i)
            else:  # approximate, but every hit must be a remaining token with its true score
                assert ((i >= 0) & (i < 170)).all()
            k, _ = m.fetch(layer, i)
            torch.testing.assert_close(torch.einsum("hmd,hmkd->hmk", q, k), s, rtol=1e-5, atol=1e-5)
        assert m.entry(100).source == "c"

    with pytest.raises(InputError) as err:
        mem.forget("zzz")
    msg = one_line(err)
    assert "'a'" in msg and "'c'" in msg


# ----------------------------------------------------------------------------------------------
# damage


def _hnsw_memory(path: Path) -> Memory:
    mem = Memory.create(path, MODEL, LAYOUT, store="hnsw")
    remember(mem, "a", np.random.default_rng(14), [50])
    return mem


def _segment(path: Path) -> Path:
    (seg,) = [p for p in (path / "segments").iterdir()]
    return seg


def _truncate(file: Path, keep: int | None = None) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _flip(file: Path, at: int) -> None:
    data = bytearray(file.read_bytes())
    data[at : at + 4] = bytes(255 - x for x in data[at : at + 4])
    file.write_bytes(bytes(data))


DAMAGE = {
    "no folder": (lambda p: shutil.rmtree(p), "not a kvmap memory"),
    "manifest truncated": (lambda p: _truncate(p / "manifest.json"), "manifest"),
    "manifest garbage": (lambda p: (p / "manifest.json").write_bytes(b"\x00\xff garbage"), "manifest"),
    "manifest wrong fields": (lambda p: (p / "manifest.json").write_text('{"format_version": 1}'), "manifest"),
    "future format": (
        lambda p: (p / "manifest.json").write_text(json.dumps({"format_version": 99})), "format version"),
    "k00 truncated": (lambda p: _truncate(_segment(p) / "k00.bin"), "k00.bin"),
    "v01 missing": (lambda p: (_segment(p) / "v01.bin").unlink(), "v01.bin"),
    "k00 flipped": (lambda p: _flip(_segment(p) / "k00.bin", 100), "k00.bin"),
    "index flipped": (lambda p: _flip(_segment(p) / "l01h02.faiss", 200), "l01h02.faiss"),
    "tokens flipped": (lambda p: _flip(_segment(p) / "tokens.npz", 30), "tokens.npz"),
    "meta changed": (lambda p: (_segment(p) / "meta.json").write_text("{}"), "meta.json"),
    "segment missing": (lambda p: shutil.rmtree(_segment(p)), "missing segment"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_memory_gives_one_line_error(tmp_path, damage):
    path = tmp_path / "m"
    _hnsw_memory(path)
    Memory.open(path)  # whole before the damage
    hurt, expect = DAMAGE[damage]
    hurt(path)
    with pytest.raises(MemoryFormatError) as err:
        Memory.open(path)
    assert expect in one_line(err)


def test_wrong_model_or_layout(tmp_path):
    path = tmp_path / "m"
    _hnsw_memory(path)
    with pytest.raises(MemoryFormatError) as err:
        Memory.open(path, expect_model_id="other/model")
    assert one_line(err) == (
        f"memory {path} was made by model {MODEL}, not other/model; use --model {MODEL} or a new --memory folder"
    )
    with pytest.raises(MemoryFormatError) as err:
        Memory.open(path, expect_layout=KVLayout(2, 3, 32))
    assert "layout" in one_line(err)
    with pytest.raises(MemoryFormatError):
        Memory.open_or_create(path, "other/model", LAYOUT)


def test_unreadable_index_without_verify_is_a_format_error(tmp_path):
    path = tmp_path / "m"
    _hnsw_memory(path)
    _flip(_segment(path) / "l00h00.faiss", 0)  # the index type tag: faiss refuses to read it
    mem = Memory.open(path, verify=False)  # sizes are fine, checksums are skipped
    with pytest.raises(MemoryFormatError) as err:
        mem.search(0, queries(0), 3)
    assert "l00h00" in one_line(err) or "layer 0" in one_line(err)


# ----------------------------------------------------------------------------------------------
# crashes


def _snapshot(mem: Memory) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [mem.search(layer, queries(15), 7) for layer in range(LAYOUT.n_layers)]


def _same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_writer_error_leaves_memory_unchanged(tmp_path):
    path = tmp_path / "m"
    mem = Memory.create(path, MODEL, LAYOUT, store="lsh")
    rng = np.random.default_rng(16)
    remember(mem, "a", rng, [40])
    before = _snapshot(mem)
    manifest = (path / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with mem.writer("b") as w:
            w.append(**make_tokens(rng, 30))
            raise RuntimeError("boom")
    assert mem.n_tokens == 40 and [s["source"] for s in mem.sources()] == ["a"]
    assert (path / "manifest.json").read_bytes() == manifest
    assert len(list((path / "segments").iterdir())) == 1  # the temporary folder is gone
    assert _same(_snapshot(mem), before) and _same(_snapshot(Memory.open(path)), before)
    with mem.writer("empty"):
        pass  # nothing appended: nothing committed
    assert mem.sources() == [{"source": "a", "n_tokens": 40, "n_docs": 1}]


def test_stray_folders_are_removed_on_open(tmp_path):
    path = tmp_path / "m"
    mem = _hnsw_memory(path)
    before = _snapshot(mem)
    seg = _segment(path)
    shutil.copytree(seg, seg.parent / "0123456789abcdef")  # renamed into place, manifest not yet replaced
    (seg.parent / ".tmp-deadbeef").mkdir()  # a writer killed while streaming
    (path / "manifest.json.tmp").write_text("{")  # killed while replacing the manifest
    again = Memory.open(path)
    assert sorted(p.name for p in seg.parent.iterdir()) == [seg.name]
    assert not (path / "manifest.json.tmp").exists()
    assert again.n_tokens == 50 and _same(_snapshot(again), before)


def test_second_writer_is_refused(tmp_path):
    mem = Memory.create(tmp_path / "m", MODEL, LAYOUT)
    other = Memory.open(tmp_path / "m")
    with mem.writer("a") as w:
        w.append(**make_tokens(np.random.default_rng(0), 5))
        with pytest.raises(KVMapError, match="being written"):
            with other.writer("b"):
                pass
        assert any(p.name.startswith(".tmp-") for p in (tmp_path / "m" / "segments").iterdir())
        Memory.open(tmp_path / "m")  # does not clean up a live writer's folder
    assert mem.n_tokens == 5


def test_two_handles_never_lose_each_others_segments(tmp_path):
    rng = np.random.default_rng(18)
    first = Memory.create(tmp_path / "m", MODEL, LAYOUT)
    second = Memory.open(tmp_path / "m")
    remember(first, "a", rng, [10])
    remember(second, "b", rng, [20])  # second's view was stale: it catches up before writing
    assert [s["source"] for s in second.sources()] == ["a", "b"]
    assert first.forget("b") == 20  # first never saw "b" but finds it on disk
    again = Memory.open(tmp_path / "m")
    assert again.n_tokens == 10 and [s["source"] for s in again.sources()] == ["a"]


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from kvmap.stores import Memory

    path, mode = sys.argv[1], sys.argv[2]
    mem = Memory.open(path)
    L, H, d = mem.layout.n_layers, mem.layout.n_kv_heads, mem.layout.head_dim
    rng = np.random.default_rng(0)

    def append(w, n):
        w.append(rng.standard_normal((L, H, n, d)), rng.standard_normal((L, H, n, d)),
                 np.zeros(n, int), np.zeros(n, int), np.arange(n), ["x"] * n)

    if mode == "streaming":  # one writer that never finishes: killed mid-append
        with mem.writer("killed") as w:
            while True:
                append(w, 16)
                print("appended", flush=True)
    else:  # many small commits: killed anywhere, often while committing
        while True:
            with mem.writer("killed") as w:
                append(w, 16)
            print("committed", flush=True)
    """
)


@pytest.mark.parametrize("mode", ["streaming", "committing"])
def test_sigkill_mid_write_leaves_memory_loadable(tmp_path, mode):
    path = tmp_path / "m"
    mem = Memory.create(path, MODEL, LAYOUT, store="hnsw")
    remember(mem, "a", np.random.default_rng(17), [60])
    before = _snapshot(mem)

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True,
    )
    try:
        for _ in range(5):  # let it get going, then kill it without warning
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    if mode == "streaming":
        assert any(p.name.startswith(".tmp-") for p in (path / "segments").iterdir())

    again = Memory.open(path, expect_model_id=MODEL, expect_layout=LAYOUT)
    assert not any(p.name.startswith(".tmp-") for p in (path / "segments").iterdir())
    if mode == "streaming":
        assert again.n_tokens == 60 and again.sources() == mem.sources()
        assert _same(_snapshot(again), before)
    else:  # whatever commits finished are whole; the first segment answers as before
        assert again.n_tokens >= 60 + 16 * 4 and (again.n_tokens - 60) % 16 == 0
        scores, ids = again.search(0, queries(15), 7)
        assert (ids >= 0).all()
        k, _ = again.fetch(0, before[0][1])
        torch.testing.assert_close(torch.einsum("hmd,hmkd->hmk", queries(15), k), before[0][0])
