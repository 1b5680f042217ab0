"""The whole text path on a tiny model: reader -> Memory folder -> import, against full attention."""
from __future__ import annotations

import torch

from kvmap.models.llama import LlamaMemoryPort
from kvmap.ports import ImportConfig
from kvmap.reader import ReaderConfig, read_into
from kvmap.stores import Memory
from tests.conftest import tiny_llama


class IdTokenizer:
    """Text '12 7 99' <-> token ids [12, 7, 99]: enough tokenizer for the reader."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(x) for x in text.split()]}

    def batch_decode(self, seqs):
        return [" ".join(map(str, s)) for s in seqs]


def _read_prefix(tmp_path, seed: int):
    """A tiny model, its port, 60 random token ids and a memory holding the model's own K/V of the first 44."""
    model = tiny_llama()
    port = LlamaMemoryPort(model, model_id="tiny")
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(seed))
    prefix = 44
    memory = Memory.create(tmp_path / "m", "tiny", port.layout, dtype="float32")
    read_into(port, IdTokenizer(), memory, "doc", [" ".join(map(str, ids[0, :prefix].tolist()))],
              ReaderConfig(chunk_size=16, context=64, sinks=4, remember_sinks=True), progress=False)
    return model, port, ids, prefix, memory


def test_reader_and_memory_folder_reproduce_full_attention(tmp_path):
    model = tiny_llama()
    port = LlamaMemoryPort(model, model_id="tiny")
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(1))
    prefix = 44
    memory = Memory.create(tmp_path / "m", "tiny", port.layout, dtype="float32")
    text = " ".join(map(str, ids[0, :prefix].tolist()))
    # context covers the whole prefix, sinks stored: the memory holds exactly the model's own K/V
    read_into(port, IdTokenizer(), memory, "doc", [text],
              ReaderConfig(chunk_size=16, context=64, sinks=4, remember_sinks=True), progress=False)
    assert memory.n_tokens == prefix
    reopened = Memory.open(tmp_path / "m", expect_model_id="tiny")
    with torch.no_grad():
        full = model(ids).logits[0, prefix:]
        with port.importing(reopened, ImportConfig.from_options(top_k=prefix, placement="true")):
            got = model(ids[:, prefix:], position_ids=torch.arange(prefix, 60)[None], use_cache=False).logits[0]
    assert (got - full).abs().max().item() <= 1e-4


def test_sinks_are_not_remembered_by_default(tmp_path):
    port = LlamaMemoryPort(tiny_llama(), model_id="tiny")
    memory = Memory.create(tmp_path / "m", "tiny", port.layout)
    read_into(port, IdTokenizer(), memory, "doc", ["1 2 3 4 5 6 7 8 9 10"], ReaderConfig(chunk_size=4, sinks=4),
              progress=False)
    assert memory.n_tokens == 6
    assert memory.entry(0).offset == 4


def test_port_refuses_a_memory_from_another_model(tmp_path):
    import pytest

    from kvmap.errors import MemoryFormatError

    port = LlamaMemoryPort(tiny_llama(), model_id="tiny")
    memory = Memory.create(tmp_path / "m", "other-model", port.layout)
    with pytest.raises(MemoryFormatError, match="other-model"):
        port.importing(memory)


def test_all_blocks_contiguous_reproduce_full_attention(tmp_path):
    """Block retrieval choosing every block, placed contiguously before the prompt = full attention."""
    model, port, ids, prefix, memory = _read_prefix(tmp_path, seed=2)
    config = ImportConfig.from_options(block_size=4, n_blocks=11, placement="contiguous")
    with torch.no_grad():
        full = model(ids).logits[0, prefix:]
        with port.importing(memory, config) as trace:
            got = model(ids[:, prefix:], use_cache=False).logits[0]  # prompt at positions 0..15
    assert (got - full).abs().max().item() <= 1e-4
    assert len(trace.hits) == prefix


def test_blocks_are_chosen_once_and_kept_while_decoding(tmp_path):
    model = tiny_llama()
    port = LlamaMemoryPort(model, model_id="tiny")
    memory = Memory.create(tmp_path / "m", "tiny", port.layout)
    read_into(port, IdTokenizer(), memory, "doc", [" ".join(str(i % 100) for i in range(200))],
              ReaderConfig(chunk_size=32, sinks=4), progress=False)
    config = ImportConfig.from_options(block_size=8, n_blocks=2, neighbours=1)
    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad(), port.importing(memory, config) as trace:
        out = model(prompt, use_cache=True)
        chosen = {layer: ids.clone() for layer, ids in trace.blocks.items()}
        token = out.logits[0, -1].argmax().view(1, 1)
        for _ in range(4):  # decode steps keep the prompt's choice
            out = model(token, cache=out.cache, use_cache=True)
            token = out.logits[0, -1].argmax().view(1, 1)
    assert set(chosen) == set(range(port.layout.n_layers))
    for layer, ids in trace.blocks.items():
        assert torch.equal(ids, chosen[layer])
        assert ids.shape == (port.layout.n_kv_heads, 6 * 8)  # 2 blocks + 1 neighbour each side, 8 tokens each
        assert all(len(set(row.tolist())) == 6 for row in ids // 8)
    # recorded once, at the choice: exactly 6 x 8 tokens per layer and KV head
    per_layer_head = sum(trace.hits.values()) / (port.layout.n_layers * port.layout.n_kv_heads)
    assert per_layer_head == 6 * 8


def test_a_memory_of_some_tokens_imports_what_the_folder_would(tmp_path):
    """``TensorMemory.of_tokens``: token import restricted to some memory tokens (kvmap:bm25_blocks) reads
    their stored K/V; with every token it reproduces full attention as the folder does."""
    from kvmap.stores.tensor import TensorMemory

    model, port, ids, prefix, memory = _read_prefix(tmp_path, seed=1)
    whole = TensorMemory.of_tokens(memory, torch.arange(prefix))
    with torch.no_grad():
        full = model(ids).logits[0, prefix:]
        with port.importing(whole, ImportConfig.from_options(top_k=prefix, placement="true")):
            got = model(ids[:, prefix:], position_ids=torch.arange(prefix, 60)[None], use_cache=False).logits[0]
    assert (got - full).abs().max().item() <= 1e-4
    some = torch.tensor([3, 9, 10, 30])
    part = TensorMemory.of_tokens(memory, some)
    heads = some[None].expand(port.layout.n_kv_heads, -1)
    for layer in (0, port.layout.n_layers - 1):
        assert torch.equal(part.fetch(layer, torch.arange(4)[None].expand_as(heads))[0], memory.fetch(layer, heads)[0])
    assert part.token_texts() == [memory.token_texts()[i] for i in some.tolist()]
