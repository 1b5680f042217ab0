"""The timm ViT port: export/import parity, gradients into memory, and hook hygiene."""
from __future__ import annotations

import pytest
import torch

from kvmap.errors import KVMapError, MemoryFormatError
from kvmap.models.vit import ViTMemoryPort
from kvmap.ports import ImportConfig, KVLayout
from kvmap.stores.tensor import TensorMemory, recording


def tiny_vit(seed: int = 0, fused: bool = True):
    """A random-weight ViT: 32x32 images, 8x8 patches (16 + 1 tokens), 2 blocks, 3 heads of 64."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=0).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model


def _export(port, model, images):
    with torch.no_grad(), recording(port) as kv:
        out = model(images)
    return out, kv


@pytest.mark.parametrize("fused", [True, False])
def test_exporting_changes_nothing_and_records_every_token(fused):
    model = tiny_vit(fused=fused)
    port = ViTMemoryPort(model, model_id="tiny-vit")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
    after, kv = _export(port, model, images)
    assert torch.equal(before, after)
    assert port.layout == KVLayout(2, 3, 64)
    assert sorted(kv) == [0, 1]
    for k, v in kv.values():
        assert k.shape == v.shape == (2, 3, 17, 64)  # (B, H, N, d)


@pytest.mark.parametrize("fused", [True, False])
def test_importing_the_blocks_own_kv_changes_nothing(fused):
    """Memory = the block's own K/V: every key appears twice with the same value, so the softmax
    average is unchanged. An empty memory (M = 0) changes nothing either."""
    model = tiny_vit(fused=fused)
    port = ViTMemoryPort(model.blocks, model_id="tiny-vit")
    images = torch.rand(2, 3, 32, 32)
    before, kv = _export(port, model, images)
    with torch.no_grad():
        with port.importing(TensorMemory(port.layout, "tiny-vit", kv)):
            own = model(images)
        empty = {layer: (k[:, :, :0], v[:, :, :0]) for layer, (k, v) in kv.items()}
        with port.importing(TensorMemory(port.layout, "tiny-vit", empty)):
            nothing = model(images)
    assert torch.allclose(own, before, atol=1e-5)
    assert torch.allclose(nothing, before, atol=1e-5)


def test_memory_changes_outputs_and_layers_without_entries_are_untouched():
    model = tiny_vit()
    port = ViTMemoryPort(model, model_id="tiny-vit")
    images = torch.rand(2, 3, 32, 32)
    before, _ = _export(port, model, images)
    _, other = _export(port, model, torch.rand(1, 3, 32, 32))  # one memory shared by the batch
    with torch.no_grad():
        with port.importing(TensorMemory(port.layout, "tiny-vit", other)):
            changed = model(images)
        with port.importing(TensorMemory(port.layout, "tiny-vit", {})):
            same = model(images)
        with port.importing(TensorMemory(port.layout, "tiny-vit", other), ImportConfig.from_options(layers=())):
            skipped = model(images)
    assert not torch.allclose(changed, before, atol=1e-3)
    assert torch.equal(same, before) and torch.equal(skipped, before)


def test_import_with_a_recorder_also_exports():
    model = tiny_vit()
    port = ViTMemoryPort(model, model_id="tiny-vit")
    images = torch.rand(1, 3, 32, 32)
    _, kv = _export(port, model, images)
    seen = []
    with torch.no_grad(), port.importing(TensorMemory(port.layout, "tiny-vit", kv), recorder=lambda l, k, v: seen.append((l, k.shape))):
        model(images)
    assert seen == [(0, (1, 3, 17, 64)), (1, (1, 3, 17, 64))]


def test_a_memory_batch_must_match_the_image_batch():
    model = tiny_vit()
    port = ViTMemoryPort(model, model_id="tiny-vit")
    _, kv = _export(port, model, torch.rand(3, 3, 32, 32))
    with pytest.raises(KVMapError, match="3 sequences but the batch has 2"):
        with torch.no_grad(), port.importing(TensorMemory(port.layout, "tiny-vit", kv)):
            model(torch.rand(2, 3, 32, 32))


def test_gradients_reach_the_memory_tensors():
    model = tiny_vit()
    port = ViTMemoryPort(model, model_id="tiny-vit")
    mem = {layer: (torch.randn(1, 3, 5, 64, requires_grad=True), torch.randn(1, 3, 5, 64, requires_grad=True))
           for layer in range(2)}
    with port.importing(TensorMemory(port.layout, "tiny-vit", mem)):
        model(torch.rand(2, 3, 32, 32)).pow(2).sum().backward()
    for k, v in mem.values():
        assert k.grad is not None and k.grad.abs().sum() > 0
        assert v.grad is not None and v.grad.abs().sum() > 0


def test_nothing_is_left_after_the_block_even_after_an_exception():
    model = tiny_vit()
    port = ViTMemoryPort(model, model_id="tiny-vit")
    images = torch.rand(1, 3, 32, 32)
    before, kv = _export(port, model, images)
    with pytest.raises(RuntimeError, match="boom"):
        with port.importing(TensorMemory(port.layout, "tiny-vit", kv)):
            raise RuntimeError("boom")
    for block in model.blocks:
        assert not {"forward", "_kvmap_state", "_kvmap_layer"} & set(vars(block.attn))
    with torch.no_grad():
        assert torch.equal(model(images), before)


def test_nesting_is_refused_and_the_outer_block_survives():
    model = tiny_vit()
    port = ViTMemoryPort(model, model_id="tiny-vit")
    with port.exporting(lambda *a: None):
        with pytest.raises(KVMapError, match="already attached"):
            with port.exporting(lambda *a: None):
                pass
        assert all("forward" in vars(block.attn) for block in model.blocks)
    assert not any("forward" in vars(block.attn) for block in model.blocks)


def test_foreign_memories_are_refused_in_one_line():
    model = tiny_vit()
    port = ViTMemoryPort(model, model_id="tiny-vit")
    wrong_layout = TensorMemory(KVLayout(2, 3, 32), "tiny-vit", {})
    wrong_model = TensorMemory(port.layout, "other", {})
    for memory, words in ((wrong_layout, "layout"), (wrong_model, "other")):
        with pytest.raises(MemoryFormatError, match=words) as err:
            with port.importing(memory):
                pass
        assert "\n" not in str(err.value)
    assert not any("forward" in vars(block.attn) for block in model.blocks)


def test_unsupported_attention_is_refused():
    with pytest.raises(KVMapError, match="Attention"):
        ViTMemoryPort([_FakeBlock()], model_id="x")


class _FakeBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(2, 2)
