"""The attention-interface port on tiny random models of six families: importing every exported token at its
true position is full attention (the parity check of every port), with eager and sdpa attention, GQA,
q/k norms, fused projections and sliding windows; the model is left as it was."""
from __future__ import annotations

import pytest
import torch

from kvmap.errors import KVMapError
from kvmap.models.interface import InterfaceMemoryPort
from kvmap.ports import ImportConfig
from tests.conftest import BruteForceMemory, export_kv, true_placement_gap

HEADS, KV_HEADS, HEAD_DIM, WINDOW = 4, 2, 16, 8


def _common(impl: str) -> dict:
    return dict(vocab_size=128, hidden_size=HEADS * HEAD_DIM, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                attn_implementation=impl, pad_token_id=0)


def _llama(impl):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(head_dim=HEAD_DIM, **_common(impl)))


def _qwen2(impl):  # sliding windows on the upper layers (use_sliding_window, max_window_layers)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                        **_common(impl)))


def _qwen3(impl):  # q/k RMS norms before RoPE
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM(Qwen3Config(head_dim=HEAD_DIM, **_common(impl)))


def _mistral(impl):  # one sliding window on every layer
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(head_dim=HEAD_DIM, sliding_window=WINDOW, **_common(impl)))


def _phi3(impl):  # fused qkv projection
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(**_common(impl)))


def _gemma3(impl):  # local and global layers with their own RoPE bases, query_pre_attn_scalar, q/k norms
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=HEAD_DIM, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                               layer_types=["sliding_attention", "full_attention",
                                                            "sliding_attention"], **_common(impl)))
    with torch.no_grad():  # Gemma inits its RMSNorm weights to 0 (scale 1); randomise them so q/k norms matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


FAMILIES = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral, "phi3": _phi3, "gemma3": _gemma3}
"""The families the README lists as passing parity (every one of them through InterfaceMemoryPort)."""


def tiny(family: str, impl: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family](impl).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_importing_everything_at_true_positions_is_full_attention(family, impl):
    port = InterfaceMemoryPort(tiny(family, impl), model_id="tiny")
    assert true_placement_gap(port, n_tokens=40, prefix=25) < 1e-4


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3"])
def test_sliding_windows_are_real_in_the_parity_check(family):
    """The windowed families' memories lie beyond their window for most queries: without the window
    honoured on memories, the true-placement check above would fail. Shown here by the model itself:
    its output changes when the window is widened."""
    model = tiny(family)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        windowed = model(ids).logits
        for attn in model.model.layers:
            if getattr(attn.self_attn, "sliding_window", None):
                attn.self_attn.sliding_window = 1000
        model.config.sliding_window = 1000
        wide = model(ids).logits
    assert (windowed - wide).abs().max() > 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exported_keys_are_the_modules_pre_rope_keys(family):
    """The port undoes RoPE on the keys the module rotated: the exported keys match k_proj (and k_norm)."""
    model = tiny(family)
    port = InterfaceMemoryPort(model, model_id="tiny")
    ids = torch.randint(0, 128, (1, 12))
    captured = {}
    attn = port.attentions[1]

    def keep_input(module, args, kwargs):
        captured["hidden"] = kwargs.get("hidden_states", args[0] if args else None)

    handle = attn.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        keys, values = export_kv(port, ids)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    with torch.no_grad():
        if hasattr(attn, "k_proj"):
            k = attn.k_proj(hidden).view(1, 12, KV_HEADS, -1).transpose(1, 2)
        else:  # Phi-3: one fused projection, queries first
            qkv = attn.qkv_proj(hidden)
            q_size = HEADS * port.layout.head_dim
            k = qkv[..., q_size:q_size + KV_HEADS * port.layout.head_dim].view(1, 12, KV_HEADS, -1).transpose(1, 2)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
    assert torch.allclose(keys[1], k[0], atol=1e-5)
    assert keys[1].shape == values[1].shape == (KV_HEADS, 12, port.layout.head_dim)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_imports_and_leaves_the_model_as_it_was(family):
    model = tiny(family)
    port = InterfaceMemoryPort(model, model_id="tiny")
    ids = torch.randint(1, 128, (1, 16))
    config_before = model.config._attn_implementation
    with torch.no_grad():
        before = model(ids).logits
        memory = BruteForceMemory(*export_kv(port, ids))
        with port.importing(memory, ImportConfig.from_options(top_k=4, distance=4)) as trace:
            out = model.generate(ids[:, :5], attention_mask=torch.ones_like(ids[:, :5]), max_new_tokens=4,
                                 do_sample=False)
            assert model.config._attn_implementation == f"kvmap_{config_before}"
        with pytest.raises(KVMapError, match="already attached"):
            with port.importing(memory):
                with port.exporting(lambda *a: None):
                    pass
        after = model(ids).logits
    assert out.shape[1] == 9 and trace.hits
    assert model.config._attn_implementation == config_before
    assert all("_kvmap_state" not in vars(a) and "_kvmap_view" not in vars(a) for a in port.attentions)
    assert torch.equal(before, after)


def test_partial_rotary_and_other_attention_implementations_are_refused_with_one_line():
    from transformers import Phi3Config, Phi3ForCausalLM

    partial = Phi3ForCausalLM(Phi3Config(partial_rotary_factor=0.5, **_common("eager")))
    with pytest.raises(KVMapError, match="partial rotary"):
        InterfaceMemoryPort(partial)
    model = tiny("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(KVMapError, match="eager or sdpa"):
        InterfaceMemoryPort(model)


def test_a_yarn_rotary_with_attention_scaling_is_undone_exactly():
    """YaRN scales cos and sin by m != 1: rotating back must divide by m**2, or parity fails."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvmap.rope import cos_sin

    torch.manual_seed(0)
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 128}
    port = InterfaceMemoryPort(LlamaForCausalLM(LlamaConfig(head_dim=HEAD_DIM, rope_parameters=rope,
                                                            **_common("eager"))).eval(), model_id="tiny")
    assert cos_sin(port.rotary, torch.tensor(0), torch.zeros(()))[0][0] > 1.1  # the scaling is really there
    assert true_placement_gap(port) < 1e-4


def test_a_module_passing_another_window_than_its_attribute_gets_a_view_for_that_window():
    """The window each call passes is the truth: a view made for the attribute's window is remade from the
    attach's state (so a layer that imported nothing at its guessed window still sees the memory)."""
    model = tiny("mistral")
    model.config.sliding_window = None  # what Mistral passes to its attention function
    port = InterfaceMemoryPort(model, model_id="tiny")
    for attn in port.attentions:  # an attribute Mistral's forward does not read, but the port's guess does
        attn.sliding_window = WINDOW
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    prefix = 20
    with torch.no_grad():
        memory = BruteForceMemory(*export_kv(port, ids[:, :prefix]))
        full = model(ids).logits[0, prefix:]
        with port.importing(memory, ImportConfig.from_options(top_k=prefix, placement="true")):
            pos = torch.arange(prefix, 30)[None]
            got = model(ids[:, prefix:], position_ids=pos, use_cache=False).logits[0]
    assert (got - full).abs().max() < 1e-4


def test_a_batch_whose_rows_have_other_positions_is_refused():
    model = tiny("llama")
    port = InterfaceMemoryPort(model, model_id="tiny")
    ids = torch.randint(0, 128, (2, 6))
    with pytest.raises(KVMapError, match="share positions"), torch.no_grad():
        export_kv(port, ids, position_ids=torch.stack([torch.arange(6), torch.arange(1, 7)]))
