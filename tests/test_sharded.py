"""The Ray-sharded store returns the single-process store's top-k on the same data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvmap.errors import InputError
from kvmap.stores import Memory
from test_stores import LAYOUT, MODEL, remember

@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")  # only the tests that need Ray skip without it
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as err:  # a machine where Ray cannot start (no shared memory...): not a kvmap bug
        pytest.skip(f"Ray does not start here: {err}")
    yield
    ray.shutdown()


@pytest.mark.parametrize("store", ["exact", "flat"])
def test_sharded_search_equals_single_process_search(tmp_path, ray_local, store):
    from kvmap.stores.sharded import ShardedMemory

    rng = np.random.default_rng(0)
    mem = Memory.create(tmp_path / "m", MODEL, LAYOUT, store=store)
    for i, sizes in enumerate([[40], [25, 10], [60], [7]]):  # 4 segments of uneven size
        remember(mem, f"s{i}.txt", rng, sizes, doc=i)
    queries = torch.from_numpy(rng.standard_normal((LAYOUT.n_kv_heads, 9, LAYOUT.head_dim)).astype(np.float32))
    sharded = ShardedMemory(tmp_path / "m", n_shards=3, expect_model_id=MODEL, cpus_per_shard=0.1)  # 0.1: the previous case's actors may not have released theirs yet
    try:
        assert len(sharded.shards) == 3 and sharded.n_tokens == mem.n_tokens
        for layer in range(LAYOUT.n_layers):
            for k in (1, 10, 200):  # 200 > n_tokens: padding must match too
                want_s, want_i = Memory.open(tmp_path / "m").search(layer, queries, k)
                got_s, got_i = sharded.search(layer, queries, k)
                torch.testing.assert_close(got_s, want_s)
                assert torch.equal(got_i, want_i)
        # fetch goes to the local memory-mapped folder: the same vectors for the same ids
        keys, _ = sharded.fetch(0, want_i[:, :, :3])
        torch.testing.assert_close(keys, mem.fetch(0, want_i[:, :, :3])[0])
        with pytest.raises(InputError, match="read-only"):  # the shards would not see the change
            sharded.forget("s0.txt")
    finally:
        sharded.close()


def test_segment_subset_search_maps_ids_back_to_global(tmp_path):
    rng = np.random.default_rng(1)
    mem = Memory.create(tmp_path / "m", MODEL, LAYOUT)
    for i in range(3):
        remember(mem, f"s{i}.txt", rng, [20 + 5 * i], doc=i)
    q = torch.from_numpy(rng.standard_normal((LAYOUT.n_kv_heads, 4, LAYOUT.head_dim)).astype(np.float32))
    _, ids = mem.search(1, q, 5, segments=[2, 0])
    seg_of = np.searchsorted([0, 20, 45], ids.numpy(), side="right") - 1
    assert set(np.unique(seg_of)) <= {0, 2}  # nothing from the middle segment
    halves = [mem.search(1, q, 5, segments=[s]) for s in (0, 2)]
    merged = torch.cat([h[0] for h in halves], -1).topk(5, dim=-1).values
    torch.testing.assert_close(mem.search(1, q, 5, segments=[2, 0])[0], merged)
    with pytest.raises(InputError, match="segments must be in"):
        mem.search(1, q, 5, segments=[3])


def test_more_shards_than_ray_cpus_is_refused_not_a_hang(tmp_path, ray_local):
    from kvmap.stores.sharded import ShardedMemory

    mem = Memory.create(tmp_path / "m", MODEL, LAYOUT)
    for i in range(3):
        remember(mem, f"s{i}.txt", np.random.default_rng(i), [5], doc=i)
    with pytest.raises(InputError, match="CPUs Ray has free"):
        ShardedMemory(tmp_path / "m", n_shards=3)


def test_reuse_candidates_come_from_the_shards_and_equal_one_process(tmp_path, ray_local):
    """Retrieval reuse picks its candidates with search_streamed: a ShardedMemory must stream-search in its
    shards (not in its local copy) and give the single process's candidates, hence the same logits."""
    from conftest import tiny_llama
    from kvmap.models.llama import LlamaMemoryPort
    from kvmap.ports import ImportConfig
    from kvmap.reader import ReaderConfig, read_into
    from kvmap.stores.sharded import ShardedMemory

    port = LlamaMemoryPort(tiny_llama(), model_id="tiny")

    class Tok:  # token ids given as text "1 2 3"
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(x) for x in text.split()]}

        def batch_decode(self, ids):
            return [str(i[0]) for i in ids]

    mem = Memory.create(tmp_path / "m", "tiny", port.layout)
    # distinct token ids: a repeated token has the same layer-0 key, and an exact tie at the k-th place
    # may be resolved either way (torch.topk has no tie rule), which would blur what is compared here
    tokens = np.random.default_rng(0).permutation(128)[:90]
    for i in range(3):
        read_into(port, Tok(), mem, f"s{i}", [" ".join(map(str, tokens[30 * i:30 * (i + 1)]))],
                  ReaderConfig(chunk_size=8, context=8), progress=False)
    config = ImportConfig.from_options(top_k=4, reuse=6, reuse_next=2)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad(), port.importing(Memory.open(tmp_path / "m"), config):
        want = port.model(prompt).logits
    sharded = ShardedMemory(tmp_path / "m", n_shards=3, expect_model_id="tiny", cpus_per_shard=0.1)
    try:
        def refuse(*args, **kwargs):
            raise AssertionError("searched the local copy, not the shards")

        sharded.local.search_streamed = refuse
        with torch.no_grad(), port.importing(sharded, config):
            got = port.model(prompt).logits
        torch.testing.assert_close(got, want)
    finally:
        sharded.close()
