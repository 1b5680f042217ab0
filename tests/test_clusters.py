"""The query-aware cluster index (kvmap.stores.clusters): built at remember time, exact scores, graceful fallbacks."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from kvmap.config import ImportConfig
from kvmap.errors import InputError
from kvmap.ports import KVLayout
from kvmap.rope import rotate
from kvmap.stores import Memory
from kvmap.stores import clusters
from kvmap.stores.clusters import Probe

LAYOUT = KVLayout(n_layers=2, n_kv_heads=2, head_dim=8)


def _moments(rng, n_queries=400):
    """Moments of queries drawn around a shared direction (as attention queries are), and RoPE angles."""
    L, H, d = LAYOUT.n_layers, LAYOUT.n_kv_heads, LAYOUT.head_dim
    q = rng.normal(size=(L, H, n_queries, d)) + 3.0 * rng.normal(size=(L, H, 1, d))
    omega = np.tile(1.0 / 100.0 ** (np.arange(d // 2) / (d // 2)), 2)[None].repeat(L, 0)
    return np.einsum("lhnd,lhne->lhde", q, q), n_queries, omega, q


def _fill(mem, source, n, rng, moments=None):
    with mem.writer(source) as w:
        k = rng.normal(size=(LAYOUT.n_layers, LAYOUT.n_kv_heads, n, LAYOUT.head_dim)).astype(np.float32)
        w.append(k, k * 0.5, np.arange(n) % 50, np.zeros(n, np.int64), np.arange(n), ["t"] * n)
        if moments is not None:
            w.set_query_moments(*moments[:3])


def _queries(q_sample, layer, n, distance, rng):
    """Rotated queries (H, n, d) like the ones the moments came from."""
    q = torch.from_numpy(q_sample[layer][:, rng.choice(q_sample.shape[2], n, replace=False)]).float()
    angle = distance * torch.tensor(np.tile(1.0 / 100.0 ** (np.arange(4) / 4), 2)).float()
    return rotate(q, torch.cos(angle), torch.sin(angle))


def test_rotation_matrix_is_ropes_rotate():
    rng = np.random.default_rng(0)
    omega = np.tile(rng.uniform(0.01, 1.0, 4), 2)
    x = torch.from_numpy(rng.normal(size=(5, 8)))
    want = rotate(x, torch.cos(torch.tensor(77 * omega)), torch.sin(torch.tensor(77 * omega)))
    assert torch.allclose(x @ torch.from_numpy(clusters.rotation(omega, 77)), want, atol=1e-12)


def test_probing_every_cluster_is_exact_search_and_few_clusters_keep_recall(tmp_path):
    rng = np.random.default_rng(1)
    mem = Memory.create(tmp_path / "m", "tiny", LAYOUT)
    moments = _moments(rng)
    _fill(mem, "a", 3000, rng, moments)
    _fill(mem, "b", 2000, rng, moments)
    assert (mem._segments[0].folder / clusters.file_name(4096, clusters.CLUSTER_SIZE)).exists()  # built at commit
    queries = _queries(moments[3], 1, 40, 4096, rng)
    exact_s, exact_i = mem.search_streamed(1, queries, 16)
    layer = [(0, mem._segments[0].clusters(Probe(1, 4096))[1]), (3000, mem._segments[1].clusters(Probe(1, 4096))[1])]
    assert all(lc.codes is not None for _, lc in layer)  # the int8 key copy, written at commit too
    centroids = torch.from_numpy(np.concatenate([lc.centroids for _, lc in layer], axis=1))
    without_copy = [(base, dataclasses.replace(lc, codes=None, scales=None)) for base, lc in layer]
    all_s, all_i = clusters.probe_search(queries, centroids, without_copy, lambda i: mem._segments[i].keys(1),
                                         centroids.shape[1], 16)
    assert torch.allclose(all_s, exact_s, atol=1e-4) and torch.equal(all_i.sort(-1).values, exact_i.sort(-1).values)
    copy_s, copy_i = clusters.probe_search(queries, centroids, layer, None, centroids.shape[1], 16)
    found_keys = mem.fetch(1, copy_i)[0]  # (H, M, k, d)
    true_s = torch.einsum("hmd,hmkd->hmk", queries, found_keys)
    bound = queries.abs().sum(-1, keepdim=True) * (found_keys.abs().amax(-1) / 127) * 0.5  # |q| . scale/2: int8
    if clusters.bf16_matmul_is_fast():  # keys, queries and scores rounded to bfloat16 too
        bound = bound + torch.einsum("hmd,hmkd->hmk", queries.abs(), found_keys.abs()) * 3 * 2.0 ** -8
    assert torch.all((copy_s - true_s).abs() <= bound + 1e-5)  # scores within the rounding error
    assert (copy_s >= exact_s[..., -1:] - 2 * bound).all() and _recall(copy_s, copy_i, exact_s) > 0.9
    few_s, few_i = mem.search_streamed(1, queries, 16, probe=Probe(clusters=3, distance=4096))  # 3 of 20 clusters
    assert 0.6 < _recall(few_s, few_i, exact_s) <= 1.0
    assert torch.equal(mem.search_streamed(1, queries, 16, probe=Probe(clusters=12, distance=4096))[1], exact_i)
    # a segment no larger than one query's probe budget (12 x 256 >= 3000) is scanned exactly


def _recall(found_s, found_i, exact_s):
    """Share of found ids whose true score reaches the exact k-th best (ties count)."""
    return ((found_s >= exact_s[..., -1:] - 1e-2) & (found_i >= 0)).float().mean().item()


def test_a_segment_without_moments_is_searched_exactly(tmp_path):
    rng = np.random.default_rng(2)
    mem = Memory.create(tmp_path / "m", "tiny", LAYOUT)
    moments = _moments(rng)
    _fill(mem, "with", 1500, rng, moments)
    _fill(mem, "without", 1500, rng)
    queries = _queries(moments[3], 0, 10, 4096, rng)
    exact_s, _ = mem.search_streamed(0, queries, 8)
    got_s, got_i = mem.search_streamed(0, queries, 8, probe=Probe(clusters=1, distance=4096))
    from_plain = got_i >= 1500  # the segment without moments: its best keys are all found
    plain_best = mem.search_streamed(0, queries, 8, segments=[1])[0]
    assert torch.all(got_s[from_plain] >= plain_best.min() - 1e-4) and from_plain.any()
    assert torch.all(got_s <= exact_s.max() * 1.01)  # the probed segment's scores come from int8 keys: within 1%


def test_damaged_or_stale_files_are_built_again_and_other_distances_on_first_use(tmp_path):
    rng = np.random.default_rng(3)
    moments = _moments(rng)
    mem = Memory.create(tmp_path / "m", "tiny", LAYOUT)
    _fill(mem, "a", 1200, rng, moments)
    folder = mem._segments[0].folder
    f = folder / clusters.file_name(4096, clusters.CLUSTER_SIZE)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    shape = (1200, LAYOUT.n_layers, LAYOUT.n_kv_heads, LAYOUT.head_dim)
    assert clusters.load(folder, 4096, clusters.CLUSTER_SIZE, *shape) is None  # digest or zip CRC catches it
    assert clusters.load(folder, 4096, clusters.CLUSTER_SIZE, 1199, *shape[1:]) is None  # stale: other size
    again = Memory.open(tmp_path / "m")
    queries = _queries(moments[3], 0, 5, 4096, rng)
    again.search_streamed(0, queries, 4, probe=Probe(clusters=2, distance=4096))
    assert clusters.load(folder, 4096, clusters.CLUSTER_SIZE, *shape) is not None  # rebuilt and saved
    again.search_streamed(0, queries, 4, probe=Probe(clusters=2, distance=256))
    assert (folder / clusters.file_name(256, clusters.CLUSTER_SIZE)).exists()
    assert Memory.open(tmp_path / "m", verify=True).n_tokens == 1200  # derived files never fail verification


def test_forget_keeps_probed_ids_global_and_correct(tmp_path):
    rng = np.random.default_rng(4)
    moments = _moments(rng)
    mem = Memory.create(tmp_path / "m", "tiny", LAYOUT)
    for source in "abc":
        _fill(mem, source, 800, rng, moments)
    mem.forget("b")
    queries = _queries(moments[3], 1, 12, 4096, rng)
    got_s, got_i = mem.search_streamed(1, queries, 8, probe=Probe(clusters=2, distance=4096))  # 2 x 256 < 800
    assert got_i.min() >= 0 and got_i.max() < 1600
    keys = mem.fetch(1, got_i)[0]
    true_s = torch.einsum("hmd,hmkd->hmk", queries, keys)
    assert (true_s - got_s).abs().max() < 0.02 * true_s.abs().max()  # ids name these keys (scores from int8 copies)
    assert clusters.load(mem._segments[1].folder, 4096, clusters.CLUSTER_SIZE, 800, 2, 2, 8) is not None  # c's own


def test_reuse_probe_is_an_import_option_of_retrieval_reuse():
    cfg = ImportConfig.from_options(reuse=64, reuse_probe=8)
    assert cfg.reuse.probe == 8 and cfg.options()["reuse_probe"] == 8
    assert "reuse_probe" not in ImportConfig.from_options(reuse=64).options()  # old run files compare equal
    with pytest.raises(InputError, match="need retrieval reuse"):
        ImportConfig.from_options(reuse_probe=8)
    with pytest.raises(InputError, match="one of them"):
        ImportConfig.from_options(reuse=64, reuse_probe=8, reuse_blocks=16)


def test_remembering_samples_the_models_queries_and_probed_import_matches_exact(tmp_path):
    from kvmap.models.llama import LlamaMemoryPort
    from kvmap.reader import ReaderConfig, read_into

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 128 for c in text]}

        def batch_decode(self, ids):
            return [chr(i[0]) for i in ids]

    port = LlamaMemoryPort(tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16), "tiny")
    mem = Memory.create(tmp_path / "m", "tiny", port.layout)
    read_into(port, Tok(), mem, "doc", ["once upon a time " * 120], ReaderConfig(chunk_size=128), progress=False)
    folder = mem._segments[0].folder
    assert clusters.load_moments(folder, 2, 2, 16) is not None
    assert clusters.load(folder, 4096, clusters.CLUSTER_SIZE, mem.n_tokens, 2, 2, 16) is not None
    ids = torch.tensor([[ord(c) % 128 for c in "where was it?"]])
    outs = []
    for options in ({"reuse": 32}, {"reuse": 32, "reuse_probe": 7}):  # 7 of 8 clusters per query
        with torch.no_grad(), port.importing(mem, ImportConfig.from_options(**options)):
            outs.append(port.model(ids).logits)
    assert torch.isfinite(outs[1]).all() and (outs[0] - outs[1]).abs().max() < 1.0
