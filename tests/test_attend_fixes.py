"""Defects of the import path (REVIEW-T2 bugs 2, 4, 5, 6, 7 and risk 12), each pinned by a test that
failed before its fix."""
from __future__ import annotations

import pytest
import torch

from conftest import BruteForceMemory, export_kv, tiny_llama
from kvmap.errors import InputError, KVMapError
from kvmap.models.llama import LlamaMemoryPort
from kvmap.ports import ImportConfig, ImportTrace
from kvmap.rope import cos_sin, rotate

MEMORY_IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 61, 23, 7, 70, 11, 2, 90, 33, 64, 12]])


_export = export_kv


def _yarn_llama():
    """A tiny Llama whose rotary has attention_scaling != 1 (YaRN, factor 4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      attn_implementation="eager",
                      rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                       "original_max_position_embeddings": 128})
    return LlamaForCausalLM(cfg).eval()


def _fixed_reference(port, keys, values, query_ids, distance):
    """Full attention with every memory's key rotated to position 0 in the cache and the query tokens at
    ``distance`` and after: what fixed placement (memories at 0, queries ``distance`` ahead) must equal."""
    from transformers import DynamicCache

    cache = DynamicCache(config=port.model.config)
    n = keys[0].shape[1]
    for layer in range(port.layout.n_layers):
        cos, sin = cos_sin(port.layer_rotary(layer), torch.zeros(n, dtype=torch.long), keys[layer])
        cache.update(rotate(keys[layer], cos, sin)[None], values[layer][None], layer)
    t = query_ids.shape[1]
    positions = torch.arange(distance, distance + t)[None]
    mask = torch.ones(1, n + t, dtype=torch.long)
    with torch.no_grad():
        return port.model(query_ids, cache=cache, position_ids=positions, attention_mask=mask).logits


@pytest.mark.parametrize("make", [tiny_llama, _yarn_llama], ids=["rope", "yarn"])
def test_fixed_placement_equals_attention_to_keys_at_distance(make):
    """Bug 4: with attention_scaling m != 1 real attention carries m**2; fixed placement gave memories m.
    Every memory imported (top_k = all) at fixed placement must equal full attention with the memory
    keys placed ``distance`` behind the queries."""
    port = LlamaMemoryPort(make(), model_id="tiny")
    keys, values = _export(port, MEMORY_IDS)
    query = torch.tensor([[9]])  # one query token: its local attention is itself only, at distance 0
    distance = 40
    want = _fixed_reference(port, keys, values, query, distance)
    config = ImportConfig.from_options(top_k=MEMORY_IDS.shape[1], placement="fixed", distance=distance)
    with torch.no_grad(), port.importing(BruteForceMemory(keys, values), config):
        got = port.model(query).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sequence_dependent_rope_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    port = LlamaMemoryPort(LlamaForCausalLM(cfg).eval(), model_id="tiny")
    keys, values = _export(port, MEMORY_IDS)
    with pytest.raises(KVMapError, match="rope type 'dynamic'"):
        with port.importing(BruteForceMemory(keys, values)):
            pass


def test_block_choice_uses_the_attention_scaling():
    """Bug 2: the softmax over block mean keys had no attn.scaling (8x too sharp at head_dim 64)."""
    port = LlamaMemoryPort(tiny_llama(), model_id="tiny")
    keys, values = _export(port, MEMORY_IDS)
    memory = BruteForceMemory(keys, values)
    config = ImportConfig.from_options(block_size=4, n_blocks=2, placement="fixed", distance=32)
    prompt = torch.tensor([[9, 31, 4]])
    with torch.no_grad(), port.importing(memory, config) as trace:
        port.model(prompt)
    # recompute layer 0's choosing softmax by hand from its pre-RoPE queries
    attn = port.attentions[0]
    with torch.no_grad():
        hidden = port.base.layers[0].input_layernorm(port.base.embed_tokens(prompt))
        q = attn.q_proj(hidden).view(1, 3, -1, 16).transpose(1, 2)  # (1, Hq, T, d)
        cos, sin = cos_sin(port.rotary, torch.tensor(32), q)
        queries = rotate(q[0], cos, sin).reshape(2, -1, 16)  # (Hkv, r*T, d)
        means = memory.block_means(0, 4)
        want = torch.softmax(torch.einsum("hmd,hbd->hmb", queries, means) * attn.scaling, dim=-1).sum(1)
    torch.testing.assert_close(trace.block_mass[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reuse_runs_in_half_precision_models(dtype):
    """Bug 5: model-dtype queries met float32 candidate keys in bmm (a crash for float16/bfloat16)."""
    port = LlamaMemoryPort(tiny_llama().to(dtype), model_id="tiny")
    keys, values = _export(port, MEMORY_IDS)
    memory = BruteForceMemory([k.float() for k in keys], [v.float() for v in values])
    prompt = torch.tensor([[9, 31, 4]])
    with torch.no_grad():
        with port.importing(memory, ImportConfig.from_options(top_k=4)):
            exact = port.model(prompt).logits.float()
        with port.importing(memory, ImportConfig.from_options(top_k=4, reuse=16)):  # all 16: same top-k
            out = port.model(prompt, use_cache=True)
            step = port.model(torch.tensor([[7]]), cache=out.cache, use_cache=True).logits
    assert out.logits.dtype == dtype and torch.isfinite(step.float()).all()
    torch.testing.assert_close(out.logits.float(), exact, atol=0.05, rtol=0.05)


def _first_layer_choice(port, memory, config, chunks):
    """Layer 0's chosen blocks (block retrieval) after feeding ``chunks`` through one cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=port.model.config)
    with torch.no_grad(), port.importing(memory, config) as trace:
        for chunk in chunks:
            port.model(chunk, cache=cache, use_cache=True)
    return trace.blocks[0]


def test_blocks_are_chosen_by_the_last_prefill_chunk():
    """Bug 6: with chunked prefill the blocks were chosen by the first chunk, so a question at the end of
    the prompt never voted. Layer 0's queries depend only on the tokens, so the last chunk's last tokens
    must choose what one forward of the whole prompt chooses."""
    port = LlamaMemoryPort(tiny_llama(), model_id="tiny")
    memory = BruteForceMemory(*_export(port, MEMORY_IDS))
    config = ImportConfig.from_options(block_size=2, n_blocks=2, placement="fixed", distance=32, select_last=2)
    prompt = torch.tensor([[99, 3, 42, 9, 31, 4, 88, 15]])
    whole = _first_layer_choice(port, memory, config, [prompt])
    chunked = _first_layer_choice(port, memory, config, [prompt[:, :4], prompt[:, 4:]])
    first_chunk_only = _first_layer_choice(port, memory, config, [prompt[:, :4]])
    assert not torch.equal(whole, first_chunk_only)  # the data make the two choices differ
    assert torch.equal(chunked, whole)


def test_a_new_prompt_in_the_same_block_chooses_again():
    """Bug 6: one import block reused over several prompts kept the first prompt's candidates."""
    port = LlamaMemoryPort(tiny_llama(), model_id="tiny")
    memory = BruteForceMemory(*_export(port, MEMORY_IDS))
    config = ImportConfig.from_options(top_k=2, reuse=2)
    a, b = torch.tensor([[99, 3, 42]]), torch.tensor([[9, 31, 4]])
    with torch.no_grad():
        with port.importing(memory, config):
            port.model(a)
            second = port.model(b).logits
        with port.importing(memory, config):
            alone = port.model(b).logits
    torch.testing.assert_close(second, alone)


def test_padding_mask_is_refused_on_the_import_path():
    """Risk 12: a padding attention_mask with zeros was silently ignored while importing."""
    port = LlamaMemoryPort(tiny_llama(), model_id="tiny")
    memory = BruteForceMemory(*_export(port, MEMORY_IDS))
    ids = torch.tensor([[0, 0, 9, 31, 4]])
    with torch.no_grad(), port.importing(memory, ImportConfig.from_options(top_k=4)):
        port.model(ids, attention_mask=torch.ones_like(ids))  # no padding: fine
        with pytest.raises(KVMapError, match="padded"):
            port.model(ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1]]))


def test_import_trace_counts_stay_bounded(monkeypatch):
    """Risk 12: ImportTrace._pending grew by one tensor per layer and decode step, without bound."""
    monkeypatch.setattr(ImportTrace, "PENDING_LIMIT", 100)
    trace = ImportTrace()
    for _ in range(50):
        trace.record(torch.tensor([[1, 2, 3, -1]]))
    assert trace._pending_size < 100 and len(trace._pending) < 25
    assert trace.hits == {1: 50.0, 2: 50.0, 3: 50.0}


def test_gemma_window_view_refuses_reuse_and_blocks():
    """Bug 7: Gemma's sliding-window filter wrapped only search; with reuse, search_streamed and fetch went
    through unwindowed. The windowed view now refuses what it cannot honour."""
    from kvmap.models.gemma import Gemma3MemoryPort
    from test_gemma import tiny_gemma

    port = Gemma3MemoryPort(tiny_gemma(), model_id="tiny")
    memory = BruteForceMemory(*_export(port, MEMORY_IDS))
    for options in ({"reuse": 8}, {"block_size": 4}):
        config = ImportConfig.from_options(placement="true", **options)
        with torch.no_grad(), port.importing(memory, config):
            with pytest.raises(KVMapError, match="cannot honour the window"):
                port.model(torch.tensor([[9, 31, 4]]))


@pytest.mark.parametrize("options,message", [
    ({"top_k": 0}, "top_k must be 1 or more"),
    ({"top_k": -1}, "top_k must be 1 or more"),
    ({"block_size": 8, "n_blocks": 0}, "n_blocks must be 1 or more"),
    ({"reuse": 4, "reuse_next": -1}, "reuse_next must be 0 or more"),
    ({"reuse": 4, "block_size": 8}, "exclude each other"),
    ({"reuse_next": 8}, "need retrieval reuse"),
    ({"n_blocks": 4}, "need block retrieval"),
    ({"placement": "contiguous"}, "block retrieval only"),
    ({"placement": "sideways"}, "placement must be one of"),
    ({"distance": -3}, "distance must be 0 or more"),
    ({"top_k": 2.5}, "whole number"),
    ({"frobnicate": 1}, "unknown import option"),
])
def test_import_config_refuses_bad_settings(options, message):
    with pytest.raises(InputError, match=message) as err:
        ImportConfig.from_options(**options)
    assert "\n" not in str(err.value)


def test_import_config_round_trips_its_flat_options():
    for options in ({}, {"reuse": 256, "reuse_next": 8, "reuse_next_best": 16},
                    {"block_size": 64, "n_blocks": 8, "placement": "contiguous", "neighbours": 1, "select_last": 3}):
        config = ImportConfig.from_options(**options)
        assert ImportConfig.from_options(**config.options()) == config
    assert ImportConfig().mode == "tokens"
    assert ImportConfig.from_options(reuse=4).mode == "reuse"
    assert ImportConfig.from_options(block_size=4).mode == "blocks"


def test_the_trace_records_each_heads_share_of_attention_on_memories():
    import torch

    from kvmap.models.llama import LlamaMemoryPort
    from kvmap.ports import ImportConfig
    from tests.conftest import BruteForceMemory, export_kv, tiny_llama

    model = tiny_llama()
    port = LlamaMemoryPort(model, model_id="tiny")
    ids = torch.randint(1, 128, (1, 12))
    keys, values = export_kv(port, ids)
    memory = BruteForceMemory(keys, values)
    with torch.no_grad(), port.importing(memory, ImportConfig.from_options(top_k=4)) as trace:
        trace.keep_shares = True
        model(torch.randint(1, 128, (1, 5)))
    assert set(trace.shares) == {0, 1}
    share, top = trace.shares[0][0]
    assert share.shape == (4, 5) and top.shape == (4, 5)  # (query heads, tokens)
    assert bool(((share > 0) & (share < 1)).all()) and bool(((top >= 0) & (top < 12)).all())


def test_memory_cap_bounds_the_memories_share_and_keeps_rows_normalised():
    import torch

    from kvmap.errors import InputError
    from kvmap.models.levers import cap_memory_share
    from kvmap.ports import ImportConfig

    probs = torch.softmax(torch.randn(2, 3, 4, 9) * 3, dim=-1)  # (Hkv, r, T, k + S), k = 4
    capped = cap_memory_share(probs, 4, 30)
    assert torch.allclose(capped.sum(-1), torch.ones(2, 3, 4), atol=1e-6)
    assert bool((capped[..., :4].sum(-1) <= 0.3 + 1e-6).all())
    under = probs[..., :4].sum(-1) <= 0.3
    assert torch.allclose(capped[under], probs[under])  # rows under the cap are left as they were
    for bad in (0, 101):
        with pytest.raises(InputError):
            ImportConfig.from_options(memory_cap=bad)
    assert ImportConfig().options() == ImportConfig(memory_cap=100).options() and "memory_cap" not in ImportConfig().options()

    model, port, memory = _tiny_port_with_memory()
    prompt = torch.randint(1, 128, (1, 5))
    with torch.no_grad():
        for cap in (100, 10):
            with port.importing(memory, ImportConfig.from_options(top_k=4, memory_cap=cap)) as trace:
                trace.keep_shares = True
                model(prompt)
            share = torch.stack([s for layer in trace.shares.values() for s, _ in layer])
            assert bool((share <= cap / 100 + 1e-5).all()), cap


def test_only_the_listed_heads_read_memories():
    import torch

    from kvmap.config import format_heads, parse_heads
    from kvmap.errors import InputError
    from kvmap.ports import ImportConfig

    assert parse_heads("1.3+0.2+0.2") == ((0, 2), (1, 3)) and format_heads(((0, 2), (1, 3))) == "0.2+1.3"
    for bad in ("3", "a.b", "1.2.3", ""):
        with pytest.raises(InputError):
            parse_heads(bad)
    model, port, memory = _tiny_port_with_memory()
    prompt = torch.randint(1, 128, (1, 5))
    with torch.no_grad():
        plain = model(prompt).logits
        with port.importing(memory, ImportConfig.from_options(top_k=4, heads=((0, 1),))) as trace:
            trace.keep_shares = True
            listed = model(prompt).logits
        with port.importing(memory, ImportConfig.from_options(top_k=4)):
            every = model(prompt).logits
    assert set(trace.shares) == {0}  # layer 1 lists no head: it does not import
    share = trace.shares[0][0][0]  # (query heads, tokens)
    assert bool((share[1] > 0).all()) and float(share[[0, 2, 3]].abs().max()) == 0.0
    assert not torch.allclose(listed, plain) and not torch.allclose(listed, every)


def _tiny_port_with_memory():
    """A tiny Llama, its port, and a 12-token memory it exported."""
    import torch

    from kvmap.models.llama import LlamaMemoryPort
    from tests.conftest import BruteForceMemory, export_kv, tiny_llama

    model = tiny_llama()
    port = LlamaMemoryPort(model, model_id="tiny")
    keys, values = export_kv(port, torch.randint(1, 128, (1, 12)))
    return model, port, BruteForceMemory(keys, values)
