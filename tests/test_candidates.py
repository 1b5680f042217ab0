"""Retrieval reuse: candidates picked once (streamed exact search or block key bounds), top-k among them."""
from __future__ import annotations

import shutil

import numpy as np
import torch

from kvmap.models.llama import LlamaMemoryPort
from kvmap.ports import ImportConfig
from kvmap.stores import Memory
from kvmap.stores.candidates import block_token_ids, candidate_blocks, key_bounds, union_ids, upper_bounds
from tests.conftest import tiny_llama


def _two_segment_memory(tmp_path, sizes=(45, 30)) -> tuple[Memory, LlamaMemoryPort]:
    port = LlamaMemoryPort(tiny_llama(), model_id="tiny")
    memory = Memory.create(tmp_path / "m", "tiny", port.layout, dtype="float32")
    g = torch.Generator().manual_seed(0)
    L, H, d = port.layout.n_layers, port.layout.n_kv_heads, port.layout.head_dim
    for i, n in enumerate(sizes):
        with memory.writer(f"s{i}") as w:
            w.append(torch.randn(L, H, n, d, generator=g), torch.randn(L, H, n, d, generator=g),
                     np.arange(n), np.zeros(n, int), np.arange(n), ["x"] * n)
    return memory, port


def test_key_bounds_bound_every_score_of_their_block():
    keys = np.random.default_rng(0).standard_normal((70, 2, 8)).astype(np.float16)
    lo, hi = key_bounds(keys, 16)
    assert lo.shape == (5, 2, 8)  # 4 full blocks and a short one of 6 tokens
    np.testing.assert_array_equal(lo[4], keys[64:].min(0))
    np.testing.assert_array_equal(hi[1], keys[16:32].max(0))
    q = torch.randn(2, 5, 8)
    bound = upper_bounds(q, torch.from_numpy(lo).float().transpose(0, 1), torch.from_numpy(hi).float().transpose(0, 1))
    scores = torch.einsum("hmd,nhd->hmn", q, torch.from_numpy(keys).float())  # (H, M, 70)
    best = torch.stack([scores[..., b * 16:(b + 1) * 16].amax(-1) for b in range(5)], -1)
    assert (bound >= best - 1e-4).all()


def test_candidates_include_every_querys_best_block_first():
    lo = torch.randn(1, 50, 4)
    hi = lo + torch.rand(1, 50, 4)
    q = torch.randn(1, 6, 4)
    best = upper_bounds(q, lo, hi).argmax(-1)[0]  # each query's top block
    picked = candidate_blocks(q, lo, hi, budget=6)[0]
    assert set(best.tolist()) <= set(picked.tolist()) and len(picked) <= 6
    ids = block_token_ids([torch.tensor([0, 2]), torch.tensor([0, 1])], np.array([0, 4, 8]), np.array([4, 4, 3]), 4)
    assert ids.tolist() == [[0, 1, 2, 3, 8, 9, 10, -1], [0, 1, 2, 3, 4, 5, 6, 7]]


def test_memory_block_bounds_stay_inside_segments_and_are_cached(tmp_path):
    memory, _ = _two_segment_memory(tmp_path)
    lo, hi, starts, lengths = memory.block_bounds(1, 16)
    assert starts.tolist() == [0, 16, 32, 45, 61] and lengths.tolist() == [16, 16, 13, 16, 14]
    keys = memory.fetch(1, torch.arange(45, 61).expand(memory.layout.n_kv_heads, -1))[0]  # (H, 16, d)
    torch.testing.assert_close(hi[:, 3], keys.amax(1))
    files = sorted(p.name for p in (tmp_path / "m" / "segments").glob("*/bounds-b16.npy"))
    assert len(files) == 2
    # a damaged cache file is computed again, not trusted
    next((tmp_path / "m" / "segments").glob("*/bounds-b16.npy")).write_bytes(b"junk")
    again = Memory.open(tmp_path / "m")
    torch.testing.assert_close(again.block_bounds(1, 16)[1], hi)


def test_streamed_search_equals_the_exact_store(tmp_path):
    memory, _ = _two_segment_memory(tmp_path)
    q = torch.randn(memory.layout.n_kv_heads, 7, memory.layout.head_dim)
    want_s, want_i = memory.search(1, q, 9)
    got_s, got_i = memory.search_streamed(1, q, 9, chunk=10)  # chunks and segments both split the keys
    torch.testing.assert_close(got_s, want_s)
    assert torch.equal(got_i, want_i)
    assert union_ids(torch.tensor([[[3, 1], [1, -1]], [[2, 2], [5, 0]]])).tolist() == [[1, 3, -1], [0, 2, 5]]
    best_first = torch.tensor([[[3, 1], [8, -1]], [[2, 6], [5, 0]]])  # (H=2, queries=2, 2 ids each, best first)
    assert union_ids(best_first, 1, 9).tolist() == [[1, 2, 3, 4, 8, -1, -1], [0, 1, 2, 3, 5, 6, 7]]  # 8's follower is past the end
    assert union_ids(best_first, 2, 20, followed=1).tolist() == [[1, 3, 4, 5, 8, 9, 10], [0, 2, 3, 4, 5, 6, 7]]


def test_reuse_on_the_prompt_equals_searching_every_time(tmp_path):
    """On the forward that picks them, candidates hold every query's top-k: the output is exact search's."""
    memory, port = _two_segment_memory(tmp_path)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with port.importing(memory, ImportConfig.from_options(top_k=8)):
            exact = port.model(ids).logits
        with port.importing(memory, ImportConfig.from_options(top_k=8, reuse=8)):
            reused = port.model(ids).logits
        with port.importing(memory, ImportConfig.from_options(top_k=8, reuse=8, reuse_blocks=100, reuse_block_size=16)):
            every_block = port.model(ids).logits
        with port.importing(memory, ImportConfig.from_options(top_k=8, reuse=8, reuse_blocks=1, reuse_block_size=16)):
            one_block = port.model(ids).logits
    torch.testing.assert_close(reused, exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(every_block, exact, atol=1e-5, rtol=1e-5)
    assert (one_block - exact).abs().max() > 1e-3  # one block of 16 cannot hold every query's top 8


def test_candidates_are_picked_once_and_reused_while_decoding(tmp_path):
    memory, port = _two_segment_memory(tmp_path)
    calls = []
    real = memory.block_bounds
    memory.block_bounds = lambda *a: calls.append(a) or real(*a)
    model = port.model
    streamed = []
    memory.search_streamed = lambda *a: streamed.append(a) or Memory.search_streamed(memory, *a)
    for config in (ImportConfig.from_options(reuse=4, reuse_blocks=2, reuse_block_size=16), ImportConfig.from_options(reuse=4)):
        with torch.no_grad(), port.importing(memory, config):
            out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
            model(torch.tensor([[4]]), cache=out.cache, use_cache=True)
    # once per layer, at the first forward: bounds for the first config, a streamed search for the second
    assert len(calls) == len(streamed) == port.layout.n_layers


def test_decode_fast_path_equals_the_general_path(tmp_path, monkeypatch):
    """A decoded token among reused candidates: the fused C kernel and the few-ops PyTorch path both
    give the general path's logits and take the same memories (padded candidates included)."""
    import kvmap.models.attend as attend
    from kvmap.models import kernel

    if shutil.which("cc") or shutil.which("gcc"):
        assert kernel.decode_kernel() is not None, "a C compiler is on PATH, so the decode kernel should build"
    memory, port = _two_segment_memory(tmp_path)
    logits, taken = {}, {}
    for path in ("kernel", "torch", "general"):
        monkeypatch.setattr(attend, "FAST_DECODE", path != "general")
        if path == "torch":
            monkeypatch.setattr(kernel, "decode_kernel", lambda: None)
        for reuse, nxt in ((6, 2), (1, 0)):  # (1, 0): fewer distinct candidates than top_k, so padding
            with torch.no_grad(), port.importing(memory, ImportConfig.from_options(top_k=8, reuse=reuse, reuse_next=nxt)) as trace:
                out = port.model(torch.tensor([[1, 2, 3, 4]]), use_cache=True)
                before = dict(trace.hits)
                logits[path, reuse] = port.model(torch.tensor([[5]]), cache=out.cache, use_cache=True).logits
                taken[path, reuse] = {i: n - before.get(i, 0) for i, n in trace.hits.items() if n != before.get(i, 0)}
    for reuse in (6, 1):
        for path in ("kernel", "torch"):
            torch.testing.assert_close(logits[path, reuse], logits["general", reuse], atol=1e-5, rtol=1e-5)
            assert taken[path, reuse] == taken["general", reuse]


def test_key_panels_are_float16_only_where_that_is_exact():
    from kvmap.models.kernel import PANEL, key_panels

    keys = torch.randn(2, 13, 16)
    panels = key_panels(keys)
    assert panels.dtype == torch.float32 and panels.shape == (2, 2, 16, PANEL)
    assert torch.equal(panels[1, 1, :, 4], keys[1, 12]) and not panels[:, 1, :, 5:].any()  # zero padding
    assert key_panels(keys.half().float()).dtype == torch.float16  # keys stored as float16: exact
