"""The Llama port: parity with full attention and RoPE round trips (hook hygiene: test_gemma.py, both ports)."""
from __future__ import annotations

import torch

from kvmap.models.llama import LlamaMemoryPort
from kvmap.ports import ImportConfig
from kvmap.rope import cos_sin, rotate, unrotate
from tests.conftest import BruteForceMemory, export_kv, tiny_llama, true_placement_gap


_export = export_kv


def test_import_at_true_positions_reproduces_full_attention():
    assert true_placement_gap(LlamaMemoryPort(tiny_llama(), model_id="tiny")) <= 1e-4


def test_unrotate_then_rotate_gives_the_models_own_keys():
    model = tiny_llama()
    port = LlamaMemoryPort(model)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        pre, _ = _export(port, ids)
        out = model(ids, use_cache=True)
        cos, sin = cos_sin(port.rotary, torch.arange(12), pre[0])
        for layer in range(port.layout.n_layers):
            rotated = out.cache.layers[layer].keys[0]  # the model's own cached (rotated) keys
            assert torch.allclose(rotate(pre[layer], cos, sin), rotated, atol=1e-5)
            assert torch.allclose(unrotate(rotated, cos, sin), pre[layer], atol=1e-5)


def test_rope_helpers_score_a_key_at_distance():
    """The RoPE helpers: a key at position 0 scored by a query rotated to D equals RoPE attention at distance
    D. (The port itself, fixed placement against full attention, is checked in test_attend_fixes.py.)"""
    model = tiny_llama()
    port = LlamaMemoryPort(model)
    q, k = torch.randn(16), torch.randn(16)
    d, p = 300, 17
    c_d, s_d = cos_sin(port.rotary, torch.tensor(d), q)
    c_p, s_p = cos_sin(port.rotary, torch.tensor(p), q)
    c_pd, s_pd = cos_sin(port.rotary, torch.tensor(p - d), q)
    fixed = rotate(q, c_d, s_d) @ k
    relative = rotate(q, c_p, s_p) @ rotate(k, c_pd, s_pd)  # key really d tokens behind a query at p
    assert torch.allclose(fixed, relative, atol=1e-4)


def test_memory_changes_generation_and_trace_records_hits():
    model = tiny_llama()
    port = LlamaMemoryPort(model, model_id="tiny")
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        keys, values = _export(port, ids)
        memory = BruteForceMemory(keys, values)
        prompt = torch.randint(0, 128, (1, 5))
        with port.importing(memory, ImportConfig.from_options(top_k=4, distance=64)) as trace:
            out = model.generate(prompt, max_new_tokens=5, do_sample=False)
        assert out.shape[1] == 10
        assert trace.hits and all(0 <= i < 30 for i in trace.hits)
        with port.importing(memory, ImportConfig.from_options(top_k=4)):
            sampled = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=10)
        assert sampled.shape[1] == 10


def test_chunked_reader_with_enough_context_equals_one_pass():
    from kvmap.reader import ReaderConfig, read_tokens

    model = tiny_llama()
    port = LlamaMemoryPort(model)
    ids = torch.randint(0, 128, (1, 43))
    keys, values = _export(port, ids)
    chunks = list(read_tokens(port, ids[0].tolist(), ReaderConfig(chunk_size=10, context=100, sinks=4)))
    got_k = torch.cat([c[1] for c in chunks], dim=2)  # (L, H, T, d)
    got_v = torch.cat([c[2] for c in chunks], dim=2)
    assert [c[0] for c in chunks] == [0, 10, 20, 30, 40]
    assert torch.allclose(got_k, torch.stack(keys), atol=1e-5)
    assert torch.allclose(got_v, torch.stack(values), atol=1e-5)


def test_chunk_cache_reuses_identical_prefixes_with_identical_results():
    from kvmap.reader import ChunkCache, ReaderConfig, read_tokens

    port = LlamaMemoryPort(tiny_llama())
    config = ReaderConfig(chunk_size=8, context=8, sinks=2)
    shared = torch.randint(0, 128, (20,)).tolist()
    a, b = shared + [1, 2, 3, 4, 5, 6], shared + [9, 9, 9, 9, 9, 9]
    cache = ChunkCache()
    list(read_tokens(port, a, config, cache))
    fresh = list(read_tokens(port, b, config))
    reused = list(read_tokens(port, b, config, cache))
    assert cache.reused_tokens == 16  # the two chunks fully inside the shared prefix
    for (s1, k1, v1), (s2, k2, v2) in zip(fresh, reused):
        assert s1 == s2 and torch.equal(k1, k2) and torch.equal(v1, v2)


def test_ordered_placement_keeps_reading_order_behind_the_query():
    """With ordered placement, the newest of a query's memories sits at `distance`, older ones further."""
    model = tiny_llama()
    port = LlamaMemoryPort(model, model_id="tiny")
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        keys, values = _export(port, ids)
        memory = BruteForceMemory(keys, values)
        prompt = torch.randint(0, 128, (1, 4))
        outs = {}
        for placement in ("fixed", "ordered"):
            with port.importing(memory, ImportConfig.from_options(top_k=12, placement=placement, distance=20)):
                outs[placement] = model(prompt).logits
    assert not torch.allclose(outs["fixed"], outs["ordered"])  # order now changes the scores
    # reference: every memory (k = all 12) placed at distance 20 + (11 - id), computed by hand for layer 0
    from kvmap.models.attend import RetrievalState, _attend_with_memory

    attn = port.attentions[0]
    q = torch.randn(1, 4, 1, 16)
    local_k, local_v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    state = RetrievalState(memory=memory, config=ImportConfig.from_options(top_k=12, placement="ordered", distance=20),
                       rotary=port.rotary)
    state.query_cos_sin[q.dtype] = cos_sin(port.rotary, torch.tensor(20), q)
    got = _attend_with_memory(attn, state, q, q, local_k, local_v)  # q_rot = q: local part at position 0
    mk = torch.stack([rotate(keys[0][:, j], *cos_sin(port.rotary, torch.tensor(j - 11), q)) for j in range(12)], 1)
    qd = rotate(q[0, :, 0], *state.query_cos_sin[q.dtype])  # (4, d)
    group = torch.arange(4) // 2
    logits = torch.cat([torch.einsum("hd,hkd->hk", qd, mk[group]), (q[0, :, 0] * local_k[0, group, 0]).sum(-1, keepdim=True)], -1)
    probs = torch.softmax(logits * attn.scaling, -1)
    want = torch.einsum("hk,hkd->hd", probs[:, :12], values[0][group]) + probs[:, 12:] * local_v[0, group, 0]
    assert torch.allclose(got[0, 0], want, atol=1e-5)


def test_chunk_cache_evicts_the_oldest_chunks_first():
    from kvmap.reader import ChunkCache

    chunk = torch.zeros(1, 1, 4, 2)  # 8 floats: 64 bytes for keys + values
    cache = ChunkCache(max_bytes=128)
    for name in (b"a", b"b", b"c"):
        cache.put(name, chunk, chunk)
    assert cache.get(b"a") is None and cache.get(b"b") is not None and cache.get(b"c") is not None
    assert cache.bytes == 128
