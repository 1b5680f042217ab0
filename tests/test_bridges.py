"""Bridges: identity adapters reproduce a model's own import path; adapters save alone; nothing is left attached."""
from __future__ import annotations

import pytest
import torch

from conftest import BruteForceMemory, tiny_llama
from kvmap.bridges import KVAdapter, connect
from kvmap.bridges.connect import ALL_ENTRIES
from kvmap.errors import InputError, MemoryFormatError
from kvmap.models.llama import LlamaMemoryPort
from kvmap.ports import ImportConfig, KVLayout
from kvmap.stores.tensor import TensorMemory, recording

MEMORY_IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 61, 23, 7, 70, 11, 2]])
PROMPT_IDS = torch.tensor([[9, 31, 4, 88, 15]])


def _attached(port: LlamaMemoryPort) -> bool:
    return any("forward" in vars(a) or "_kvmap_state" in vars(a) for a in port.attentions)


def test_identity_adapter_reproduces_own_import_path():
    source = LlamaMemoryPort(tiny_llama(), "tiny")
    target = LlamaMemoryPort(tiny_llama(), "tiny")  # same weights, a second instance
    with torch.no_grad(), recording(source) as kv:
        source.model(MEMORY_IDS)
    memory = BruteForceMemory([kv[l][0][0] for l in sorted(kv)], [kv[l][1][0] for l in sorted(kv)])
    config = ImportConfig.from_options(top_k=ALL_ENTRIES, placement="fixed", distance=64)
    with torch.no_grad(), target.importing(memory, config):
        expected = target.model(PROMPT_IDS).logits

    bridge = connect(source, target, a_to_b="identity", distance=64)
    with torch.no_grad(), bridge:
        source.model(MEMORY_IDS)
        got = target.model(PROMPT_IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = target.model(PROMPT_IDS).logits
    assert (got - plain).abs().max() > 1e-3  # the bridged memory really changed the output
    assert not _attached(source) and not _attached(target)


def test_bridge_leaves_nothing_attached_after_an_error():
    source, target = LlamaMemoryPort(tiny_llama(), "tiny"), LlamaMemoryPort(tiny_llama(), "tiny")
    bridge = connect(source, target, a_to_b="identity")
    with pytest.raises(RuntimeError), bridge:
        source.model(MEMORY_IDS)
        raise RuntimeError("boom")
    assert not _attached(source) and not _attached(target)
    with bridge:  # reusable after the error
        pass


def test_adapter_gradients_flow_from_the_target_loss():
    source = LlamaMemoryPort(tiny_llama(seed=1), "src")
    target = LlamaMemoryPort(tiny_llama(seed=2, layers=3, kv_heads=1, head_dim=8, heads=2).requires_grad_(False), "dst")
    adapter = KVAdapter(source.layout, target.layout, source_id="src", target_id="dst")
    with torch.no_grad(), recording(source) as kv:
        source.model(MEMORY_IDS)
    memory = TensorMemory(target.layout, "dst", adapter(kv))
    config = ImportConfig.from_options(top_k=ALL_ENTRIES, placement="fixed", layers=tuple(adapter.target_layers))
    with target.importing(memory, config):
        target.model(PROMPT_IDS).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters() if p.dim() == 2)
    assert all(p.grad is None for p in target.model.parameters())  # frozen target: nothing else is touched


def test_adapter_saves_alone_and_refuses_other_models(tmp_path):
    src, dst = KVLayout(4, 2, 8), KVLayout(3, 1, 16)
    adapter = KVAdapter(src, dst, source_id="a", target_id="b")
    path = adapter.save(tmp_path / "a_to_b.safetensors")
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(adapter.state_dict())  # adapter weights only
    loaded = KVAdapter.load(path, source_id="a", target_id="b")
    for name, tensor in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert loaded.pairs == adapter.pairs == {0: (0,), 1: (2,), 2: (3,)}
    with pytest.raises(MemoryFormatError, match="not the target 'c'"):
        KVAdapter.load(path, target_id="c")
    with pytest.raises(InputError, match="kvmap bridge train"):
        KVAdapter.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(MemoryFormatError, match="not a kvmap adapter"):
        KVAdapter.load(tmp_path / "junk.safetensors")


def test_connect_refuses_an_adapter_for_other_layouts():
    source, target = LlamaMemoryPort(tiny_llama(), "tiny"), LlamaMemoryPort(tiny_llama(layers=3), "other")
    with pytest.raises(InputError, match="identity adapter needs"):
        connect(source, target, a_to_b="identity")
    wrong = KVAdapter(KVLayout(5, 2, 16), target.layout)
    with pytest.raises(InputError, match="train an adapter for these models"):
        connect(source, target, a_to_b=wrong)


def test_connect_an_llm_and_a_limb_policy_both_ways():
    """bridge.connect(llm, vision_model): each side's output changes only through the other's exports."""
    from kvmap.models.limb import LimbPolicy

    llm = LlamaMemoryPort(tiny_llama(), "tiny")
    torch.manual_seed(0)
    limb = LimbPolicy(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    images, no_target = torch.rand(1, 3, 16, 16), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        plain_pose, plain_logits = limb(images, no_target), llm.model(PROMPT_IDS).logits
    bridge = connect(llm, limb, a_to_b="random", b_to_a="random", distance=64)
    with torch.no_grad(), bridge:
        llm.model(MEMORY_IDS)  # the LLM reads; the limb policy imports its K/V through a_to_b
        pose = limb(images, no_target)  # ... and exports its own, which the LLM then imports
        logits = llm.model(PROMPT_IDS).logits
    assert (pose - plain_pose).abs().max() > 1e-4
    assert (logits - plain_logits).abs().max() > 1e-4
    assert not _attached(llm)
    with torch.no_grad():  # outside the block both models are themselves again
        torch.testing.assert_close(limb(images, no_target), plain_pose)
        torch.testing.assert_close(llm.model(PROMPT_IDS).logits, plain_logits)
