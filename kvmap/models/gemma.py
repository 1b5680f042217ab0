"""The Gemma 3 port (``Gemma3ForCausalLM``, e.g. the built-in Gemma 3 270M): the attention-interface port.

Gemma 3 is Llama plus q/k RMS norms before RoPE, ``scaling = query_pre_attn_scalar ** -0.5``, two RoPEs
(local ``sliding_attention`` layers rope_theta 10k, global ``full_attention`` layers 1M; the rotary takes
the layer type) and sliding windows on the local layers. :class:`kvmap.models.interface.InterfaceMemoryPort`
reads all of these off the model:

- **Two RoPEs.** Each layer gets its own rotary (:class:`~kvmap.models.interface.LayerRotary`), so the query
  rotation to ``distance`` and the memory rotation to its offset (true placement) use the frequencies the
  layer's local keys were rotated with.
- **Sliding windows.** A local layer sees only the keys less than ``sliding_window`` tokens behind a
  query. Memories obey the same rule: with fixed placement every memory sits ``distance`` tokens (ordered: up
  to ``distance + top_k - 1``) behind, so a local layer imports nothing when ``distance >= sliding_window``
  (Gemma 3 270M: window 512, default distance 4096, so only its 3 global layers import); with true placement
  each memory is dropped from the top-k of a query it is too far behind (after the search, so a local layer
  may get fewer than ``top_k``; true placement is for parity tests).

``attn_logit_softcapping``: transformers' ``Gemma3Attention`` does not pass it to the attention function,
so Gemma 3 never soft-caps attention logits; neither does this port (exact parity).
"""
from __future__ import annotations

from kvmap.models.interface import InterfaceMemoryPort, LayerRotary, _WindowedMemory  # noqa: F401 (re-exported)


class Gemma3MemoryPort(InterfaceMemoryPort):
    """:class:`~kvmap.models.interface.InterfaceMemoryPort` for Gemma 3 under its former name; ``rotary`` is the
    global (``full_attention``) rotary and :meth:`layer_rotary` the one a given layer uses."""
