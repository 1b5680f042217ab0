"""kvmap: memory-mapped key/value memory for transformers.

Export pre-RoPE keys/values while a model reads; import the top-k back into attention while it answers.
"""
from kvmap.answer import Answer, ask, generate
from kvmap.models.interface import InterfaceMemoryPort
from kvmap.models.llama import LlamaMemoryPort
from kvmap.models.loading import LoadedModel, load_model
from kvmap.ports import ImportConfig, KVLayout, MemoryEntry, MemoryPort
from kvmap.reader import ReaderConfig, read_into
from kvmap.stores import Memory

__all__ = ["Answer", "ask", "generate", "InterfaceMemoryPort", "LlamaMemoryPort", "LoadedModel", "load_model", "ImportConfig",
           "KVLayout", "MemoryEntry", "MemoryPort", "ReaderConfig", "read_into", "Memory"]
