"""Model families kvmap can attach to; :func:`port_for` gives the attention-interface port.

Every family in :data:`PARITY_TESTED` passes the parity check (import every token at its true position =
full attention) through :class:`kvmap.models.interface.InterfaceMemoryPort` in tests/test_interface_port.py.
"""
from __future__ import annotations

from kvmap.errors import KVMapError

PARITY_TESTED = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3_text")
"""Model types (``config.model_type``) whose parity through the interface port the tests prove."""


def port_for(model, model_id: str = "unknown"):
    """The MemoryPort for ``model`` (a causal LM or its base model), chosen by ``model.config.model_type``.

    Raises :class:`KVMapError` (one line) for a model type the tests have not proven.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PARITY_TESTED:
        known = ", ".join(PARITY_TESTED)
        raise KVMapError(f"kvmap has no port proven for model type '{model_type}' (parity-tested: {known})")
    from kvmap.models.interface import InterfaceMemoryPort

    return InterfaceMemoryPort(model, model_id)
