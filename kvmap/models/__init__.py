"""Model families kvmap can attach to; :func:`port_for` picks the port by ``model.config.model_type``."""
from __future__ import annotations

from kvmap.errors import KVMapError

LLAMA_LIKE = ("llama", "qwen2", "qwen3")
"""Model types whose attention :class:`kvmap.models.llama.LlamaMemoryPort` reproduces exactly."""
GEMMA3 = ("gemma3_text",)
"""Gemma 3 text models (``Gemma3ForCausalLM``): :class:`kvmap.models.gemma.Gemma3MemoryPort`."""


def port_for(model, model_id: str = "unknown"):
    """The MemoryPort for ``model`` (a causal LM or its base model), chosen by ``model.config.model_type``.

    Raises :class:`KVMapError` (one line) for a model type no port reproduces.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in GEMMA3:
        from kvmap.models.gemma import Gemma3MemoryPort

        return Gemma3MemoryPort(model, model_id)
    if model_type in LLAMA_LIKE:
        from kvmap.models.llama import LlamaMemoryPort

        return LlamaMemoryPort(model, model_id)
    known = ", ".join(LLAMA_LIKE + GEMMA3)
    raise KVMapError(f"kvmap has no port for model type '{model_type}' (supported: {known})")
