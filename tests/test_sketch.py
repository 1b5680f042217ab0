"""The clusters' int8 key copy (kvmap.stores.sketch): within its error bound, checked on open, rebuilt, optional."""
from __future__ import annotations

import numpy as np
import torch

from test_clusters import LAYOUT, _fill, _moments, _queries
from kvmap.stores import Memory, clusters, sketch
from kvmap.stores.clusters import Probe

SPEC = (4096, clusters.CLUSTER_SIZE)


def test_codes_times_scale_is_within_half_a_step_of_every_key():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(500, 64)).astype(np.float32) * rng.uniform(0.01, 30, size=(500, 1)).astype(np.float32)
    keys[3] = 0.0  # an all-zero key
    codes, scales = sketch.quantize(keys)
    assert codes.dtype == np.int8 and scales.dtype == np.float16 and codes.shape == keys.shape
    step = scales.astype(np.float32)[:, None]
    assert np.all(np.abs(codes * step - keys) <= step * 0.5001 + 1e-7) and not codes[3].any()
    assert np.abs(codes).max() == 127  # the scale uses the whole range


def _segment(tmp_path, n=1500, seed=0):
    rng = np.random.default_rng(seed)
    moments = _moments(rng)
    mem = Memory.create(tmp_path / "m", "tiny", LAYOUT)
    _fill(mem, "a", n, rng, moments)
    return mem, mem._segments[0], moments, rng


def test_the_copy_holds_each_heads_keys_in_cluster_order(tmp_path):
    mem, seg, _, _ = _segment(tmp_path)
    layers = seg.clusters(Probe(4, 4096))
    for layer, lc in enumerate(layers):
        keys = np.asarray(seg.keys(layer), np.float32)  # (n, H, d)
        for h in range(LAYOUT.n_kv_heads):
            restored = lc.codes[h].astype(np.float32) * lc.scales[h].astype(np.float32)[:, None]
            step = lc.scales[h].astype(np.float32)[:, None]
            assert np.all(np.abs(restored - keys[lc.members[h], h]) <= step * 0.5001 + 1e-7)
    path = seg.folder / sketch.file_name(*SPEC)
    n, (L, H, d) = seg.n_tokens, (LAYOUT.n_layers, LAYOUT.n_kv_heads, LAYOUT.head_dim)
    assert path.stat().st_size == L * H * n * d + 2 * L * H * n  # int8 codes and float16 scales: 1 + 2/d bytes a channel


def test_a_truncated_foreign_or_stale_copy_is_refused_and_built_again(tmp_path):
    mem, seg, moments, rng = _segment(tmp_path)
    layers = seg.clusters(Probe(4, 4096))
    shape = (seg.n_tokens, LAYOUT.n_kv_heads, LAYOUT.head_dim)
    path = seg.folder / sketch.file_name(*SPEC)
    good = path.read_bytes()
    assert sketch.load(seg.folder, *SPEC, layers, seg.keys, *shape) is not None
    path.write_bytes(good[:-1])
    assert sketch.load(seg.folder, *SPEC, layers, seg.keys, *shape) is None  # truncated
    path.write_bytes(good[len(good) // 2:] + good[:len(good) // 2])
    assert sketch.load(seg.folder, *SPEC, layers, seg.keys, *shape) is None  # same size, other content: spot checks
    shuffled = [clusters.LayerClusters(lc.centroids, lc.members[:, ::-1].copy(), lc.starts) for lc in layers]
    path.write_bytes(good)
    assert sketch.load(seg.folder, *SPEC, shuffled, seg.keys, *shape) is None  # built for other clusters
    path.write_bytes(good[:100])
    again = Memory.open(tmp_path / "m")
    queries = _queries(moments[3], 0, 6, 4096, rng)
    again.search_streamed(0, queries, 4, probe=Probe(clusters=2, distance=4096))  # rebuilds it on first use
    assert path.read_bytes() == good and again._segments[0].clusters(Probe(2, 4096))[0].codes is not None
    assert Memory.open(tmp_path / "m", verify=True).n_tokens == seg.n_tokens  # derived: never fails verification


def test_a_memory_that_cannot_write_its_copy_searches_the_keys_themselves(tmp_path, monkeypatch):
    mem, seg, moments, rng = _segment(tmp_path)
    (seg.folder / sketch.file_name(*SPEC)).unlink()

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(sketch, "build", read_only)
    again = Memory.open(tmp_path / "m")
    queries = _queries(moments[3], 1, 8, 4096, rng)
    exact_s, exact_i = again.search_streamed(1, queries, 8)
    got_s, got_i = again.search_streamed(1, queries, 8, probe=Probe(clusters=6, distance=4096))  # 6 of 6 clusters
    assert again._segments[0].clusters(Probe(6, 4096))[1].codes is None
    assert torch.allclose(got_s, exact_s, atol=1e-4) and torch.equal(got_i, exact_i)  # exact scores from the keys


def test_forgetting_a_source_leaves_the_others_copies_in_use(tmp_path):
    rng = np.random.default_rng(5)
    moments = _moments(rng)
    mem = Memory.create(tmp_path / "m", "tiny", LAYOUT)
    for source in "abc":
        _fill(mem, source, 900, rng, moments)
    gone = mem._segments[1].folder
    mem.forget("b")
    assert not gone.exists()  # its copy went with it
    queries = _queries(moments[3], 0, 10, 4096, rng)
    got_s, got_i = mem.search_streamed(0, queries, 8, probe=Probe(clusters=2, distance=4096))
    assert all(s.clusters(Probe(2, 4096))[0].codes is not None for s in mem._segments)
    true_s = torch.einsum("hmd,hmkd->hmk", queries, mem.fetch(0, got_i)[0])
    assert got_i.min() >= 0 and got_i.max() < 1800 and (true_s - got_s).abs().max() < 0.02 * true_s.abs().max()


def test_releasing_one_layers_slice_unmaps_its_pages_and_keeps_the_others(tmp_path):
    from pathlib import Path

    import pytest

    from kvmap.stores.segment import drop_pages

    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs Linux /proc")

    def rss_file_kib() -> int:
        return next(int(x.split()[1]) for x in status.read_text().splitlines() if x.startswith("RssFile:"))

    path = tmp_path / "copy.bin"
    path.write_bytes(np.ones(2 * 8 << 20, np.int8).tobytes())  # two "layers" of 8 MiB
    mapped = np.memmap(path, np.int8, "r", shape=(2, 8 << 20))
    before = rss_file_kib()
    assert int(mapped[0].sum()) + int(mapped[1].sum()) == 2 * (8 << 20)  # both layers' pages mapped
    held = rss_file_kib()
    drop_pages(mapped[0])
    one_left = rss_file_kib()
    drop_pages(mapped[1])
    assert held - before > 12_000 and 6_000 < one_left - before < 10_000 and rss_file_kib() - before < 1_000
    assert int(mapped[0][:10].sum()) == 10  # read again after release: the same bytes
