"""The Llama-family port (Llama, SmolLM2, Qwen2, Qwen3, Mistral, Phi-3): the attention-interface port.

It used to swap each attention module's ``forward`` for a copy of transformers' Llama forward; that copy
is gone. :class:`kvmap.models.interface.InterfaceMemoryPort` does the same work inside the attention
function transformers calls, for every family whose attention goes through ``AttentionInterface``. The name
stays because memories, benchmarks and users' code construct it.
"""
from __future__ import annotations

from kvmap.models.interface import InterfaceMemoryPort


class LlamaMemoryPort(InterfaceMemoryPort):
    """:class:`~kvmap.models.interface.InterfaceMemoryPort` under its former name; nothing added."""
