"""Shared fixtures: tiny random-weight Llama models (fast, offline) and a brute-force memory double."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from kvmap.ports import KVLayout


def tiny_llama(seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, vocab: int = 128):
    """A random-weight LlamaForCausalLM small enough for unit tests (float32, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=512, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def export_kv(port, ids: torch.Tensor, **kw) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pre-RoPE keys and values, each (H, T, d) per layer, that ``port``'s model exports reading ``ids``."""
    keys, values = {}, {}

    def recorder(layer, k, v):
        keys[layer], values[layer] = k[0], v[0]  # (H, T, d)

    with torch.no_grad(), port.exporting(recorder):
        port.model(ids, **kw)
    n = port.layout.n_layers
    return [keys[i] for i in range(n)], [values[i] for i in range(n)]


def true_placement_gap(port, n_tokens: int = 40, prefix: int = 25, seed: int = 0) -> float:
    """The parity check of every port: the first ``prefix`` tokens exported, then imported at their true
    positions (all of them), must give the rest of the sequence full attention's logits. Returns the
    largest absolute logit difference."""
    from kvmap.ports import ImportConfig

    ids = torch.randint(0, 128, (1, n_tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = port.model(ids).logits[0, prefix:]
        memory = BruteForceMemory(*export_kv(port, ids[:, :prefix]))
        with port.importing(memory, ImportConfig.from_options(top_k=prefix, placement="true")):
            pos = torch.arange(prefix, n_tokens)[None]
            got = port.model(ids[:, prefix:], position_ids=pos, use_cache=False).logits[0]
    return (got - full).abs().max().item()


@pytest.fixture
def tiny_model():
    return tiny_llama()


class BruteForceMemory:
    """Test double with the whole MemoryView contract (kvmap.ports.MemoryView): exact inner-product
    search over RAM tensors, token offsets equal to ids, one document of one source."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], model_id: str = "tiny",
                 texts: list[str] | None = None):
        # keys[l], values[l]: (H, N, d) pre-RoPE; texts: each token's text (default "t<id>")
        self.keys, self.values = keys, values
        self.texts = texts or [f"t{i}" for i in range(keys[0].shape[1])]
        h, n, d = keys[0].shape
        self.layout = KVLayout(len(keys), h, d)
        self.model_id, self.path, self.n_tokens = model_id, "<ram>", n

    def search(self, layer, queries, k):
        scores = torch.einsum("hmd,hnd->hmn", queries, self.keys[layer])
        k = min(k, self.n_tokens)
        return scores.topk(k, dim=-1)

    def search_streamed(self, layer, queries, k, probe=None):
        return self.search(layer, queries, k)  # exact: no cluster index to probe

    def fetch(self, layer, ids, release=False):
        h = torch.arange(ids.shape[0]).view(-1, *([1] * (ids.dim() - 1))).expand_as(ids)
        safe = ids.clamp(min=0)
        keys, values = self.keys[layer][h, safe], self.values[layer][h, safe]
        pad = (ids < 0)[..., None]
        return keys.masked_fill(pad, 0.0), values.masked_fill(pad, 0.0)

    def offsets(self, ids):
        return ids.clone()

    def entry(self, id, score=0.0):
        from kvmap.ports import MemoryEntry

        return MemoryEntry(source="<ram>", doc_id=0, offset=int(id), text=self.texts[int(id)], score=float(score))

    def token_texts(self):
        return list(self.texts)

    def block_means(self, layer, block_size):
        return torch.stack([c.mean(1) for c in self.keys[layer].float().split(block_size, dim=1)], dim=1)

    def block_bounds(self, layer, block_size):
        import numpy as np

        chunks = self.keys[layer].float().split(block_size, dim=1)
        lo = torch.stack([c.amin(1) for c in chunks], dim=1)  # (H, n_blocks, d)
        hi = torch.stack([c.amax(1) for c in chunks], dim=1)
        starts = np.arange(0, self.n_tokens, block_size, dtype=np.int64)
        return lo, hi, starts, np.minimum(block_size, self.n_tokens - starts)


@pytest.fixture
def tiny_memory(tmp_path):
    """A memory folder of 30 random tokens exported by a tiny Llama (model id 'tiny')."""
    import numpy as np

    from kvmap.models.llama import LlamaMemoryPort
    from kvmap.reader import ReaderConfig, read_tokens
    from kvmap.stores import Memory

    port = LlamaMemoryPort(tiny_llama(), model_id="tiny")
    memory = Memory.create(tmp_path / "memory", "tiny", port.layout)
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    with memory.writer("a.txt") as w:
        for start, k, v in read_tokens(port, ids, ReaderConfig(chunk_size=8, context=8)):
            n = k.shape[2]
            w.append(k.numpy(), v.numpy(), np.asarray(ids[start:start + n]), np.zeros(n, int),
                     np.arange(start, start + n), [f"t{i}" for i in ids[start:start + n]])
    return tmp_path / "memory"
