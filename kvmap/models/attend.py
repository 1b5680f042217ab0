"""Attention over [memories, local K/V] in one softmax: what the causal LM port's attention function calls.

The three retrieval modes of :class:`kvmap.config.ImportConfig`, one path each, chosen when the port
attaches (:attr:`RetrievalState.mode`):

- ``tokens`` (the seed's method): each query head's pre-RoPE query, rotated so that memories stored at
  position 0 sit ``distance`` behind it, searches the memory's store; the top-k keys and values join the
  softmax (:func:`_attend_with_memory`).
- ``reuse``: the same, searching only among candidates that every prompt forward picks once by exact
  streamed search (:func:`_retrieve`); a decoded token takes the fused C kernel
  (:func:`_decode_among_candidates`).
- ``blocks``: whole blocks, chosen by the prompt's queries from the blocks' mean keys and kept while
  decoding (:func:`_attend_with_blocks`).

Candidates and blocks are chosen again at every forward of more than one token (a prompt, or a chunk
of one), so with chunked prefill the chunk holding the question chooses what decoding uses, and a new
prompt in the same import block gets its own choice.

Rotary embeddings with ``attention_scaling`` m != 1 (YaRN, LongRoPE) scale both rotated queries and
rotated keys by m, so real attention logits carry m**2. Memories stored un-rotated and scored by a
rotated query carry only m: :attr:`RetrievalState.unrotated_scale` puts the missing m back (``fixed``
placement and fixed blocks). Rope types whose frequencies depend on the sequence length (``dynamic``,
``longrope``) are refused when a port attaches: a query rotated to ``distance`` would use other
frequencies than the local keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kvmap.config import ImportConfig
from kvmap.models import kernel, levers
from kvmap.ports import PortState
from kvmap.rope import cos_sin, rotate
from kvmap.stores.clusters import Probe


@dataclass
class RetrievalState(PortState):
    """A causal LM port's attach state: the shared fields, the import settings, and what retrieval caches."""

    config: ImportConfig = field(default_factory=ImportConfig)
    rotary: nn.Module | None = None
    age_cos_sin: dict = field(default_factory=dict)
    """(k, dtype) -> cos, sin of shape (k, head_dim) at positions 0, -1, ..., -(k-1) (ordered placement)."""
    rotations: dict = field(default_factory=dict)
    """Rotation matrices cached by :func:`_rotation` (and small constants of :func:`_constant`)."""
    query_cos_sin: dict = field(default_factory=dict)
    """(dtype) -> cos, sin of shape (head_dim,) at position ``config.distance``."""
    candidates: dict = field(default_factory=dict)
    """Retrieval reuse: layer -> (ids (Hkv, C), keys (Hkv, C, d), the keys as the C kernel's panels
    (:func:`kvmap.models.kernel.key_panels`), values (Hkv, C, d), any padding): the candidate tokens the
    latest prompt forward picked (float32), kept while decoding."""
    blocks: dict = field(default_factory=dict)
    """Block retrieval: layer -> (keys, values), each (Hkv, M, d), the chosen blocks' tokens, already
    rotated to their placement (chosen at each prompt forward, kept while decoding)."""
    checked_mask: list = field(default_factory=list)
    """[mask, has padding] of the last attention mask checked: layers of one forward share the mask object,
    so it is checked once per forward, not once per layer (shared by the per-layer views)."""
    position_tables: list = field(default_factory=list)
    """[position_ids, {(rotary, dtype): (cos, sin)}] of the current forward: the interface port undoes RoPE
    with them, computed once per forward and rotary (:func:`kvmap.models.interface._position_cos_sin`)."""
    unrotated_scale: float = 1.0
    """The rotary's ``attention_scaling`` m: rotated queries and keys each carry it, so memories scored
    un-rotated (fixed placement) need it once more to get the m**2 of real attention."""

    @property
    def mode(self) -> str:
        """``tokens``, ``blocks`` or ``reuse``: the attention path, fixed for the whole attach."""
        return self.config.mode

    def imports(self, layer: int) -> bool:
        if self.memory is None or self.memory.n_tokens == 0:
            return False
        heads = self.config.heads
        if heads is not None and not any(l == layer for l, _ in heads):
            return False
        return self.config.layers is None or layer in self.config.layers

    def head_mask(self, layer: int, n_q: int) -> torch.Tensor | None:
        """(Hq,) bool: the query heads of ``layer`` that import (``None``: all of them)."""
        if self.config.heads is None:
            return None
        key = ("heads", layer, n_q)
        if key not in self.rotations:
            mask = torch.zeros(n_q, dtype=torch.bool)
            mask[[h for l, h in self.config.heads if l == layer and h < n_q]] = True
            self.rotations[key] = mask
        return self.rotations[key]


FAST_DECODE = True
"""Decode steps among reused candidates take :func:`_decode_among_candidates` (tests compare it with the
general path by turning this off)."""


def _local_mask(t: int, s: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Causal mask (T, S): the T queries are the last T of the S keys; optional sliding window."""
    q_pos = torch.arange(s - t, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _attend_with_memory(attn: nn.Module, state: RetrievalState, q: torch.Tensor, q_rot: torch.Tensor,
                        k_all: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
    """Attention over [top-k memories, local K/V] in one softmax.

    Parameters
    ----------
    q, q_rot : (1, Hq, T, d) pre-RoPE and rotated queries.
    k_all, v_all : (1, Hkv, S, d) rotated local keys (cache included) and values.

    Returns
    -------
    (1, T, Hq, d) attention output, as transformers' attention functions return it.
    """
    cfg, memory, layer = state.config, state.memory, attn.layer_idx
    _, n_q, t, d = q.shape
    n_kv, s = k_all.shape[1], k_all.shape[2]
    r = n_q // n_kv  # query heads per KV head (GQA group)
    scale = attn.scaling
    if FAST_DECODE and state.mode == "reuse" and t == 1 and layer in state.candidates and cfg.memory_cap == 100 \
            and cfg.heads is None and not state.trace.keep_shares \
            and cfg.placement == "ordered" and getattr(attn, "sliding_window", None) is None:
        return _decode_among_candidates(state, layer, q, q_rot, k_all, v_all, scale)

    # Local part: ordinary RoPE attention, causal (and windowed on sliding-window layers).
    qg = q_rot[0].reshape(n_kv, r, t, d)  # (Hkv, r, T, d)
    local = torch.matmul(qg, k_all[0].transpose(-1, -2)[:, None]) * scale  # (Hkv, r, T, S)
    window = getattr(attn, "sliding_window", None)
    if t > 1 or (window is not None and s > window):  # one new token with no window sees every key
        local = local.masked_fill(~_local_mask(t, s, window, q.device), float("-inf"))

    if state.mode == "blocks":
        return _attend_with_blocks(attn, state, q, qg, local, v_all)

    # Memory part: each query head searches with its own query, rotated so that memories
    # (stored at position 0) sit `distance` tokens behind it.
    if cfg.placement == "true":
        qm = q_rot[0]
    else:  # one matmul with the rotation matrix (cheaper per decode step than the elementwise form)
        qm = torch.matmul(q[0], _rotation(state, "query", q.dtype))  # (Hq, T, d)
    # Memory logits are computed in float32 whatever the model's dtype (memories are stored as float32
    # or float16 and fetched as float32); the softmax below runs in float32 anyway.
    queries = qm.reshape(n_kv, r * t, d).float()  # (Hkv, r*T, d): a group's queries search that KV head's store
    ids, mem_k, mem_v, in_order, padded = _retrieve(state, layer, queries, t)  # (Hkv, r*T, k), (Hkv, r*T, k, d)
    mem_k, mem_v = mem_k.float(), mem_v.float()
    k = ids.shape[-1]
    if cfg.placement == "true":
        pos_cos, pos_sin = cos_sin(state.rotary, memory.offsets(ids), mem_k)
        mem_k = rotate(mem_k, pos_cos, pos_sin)
    elif cfg.placement == "ordered" and not in_order:
        # Keep reading order among one query's memories: the newest sits `distance` behind the query,
        # each older one a position further (ids grow with reading order).
        if (k, mem_k.dtype) not in state.age_cos_sin:
            state.age_cos_sin[k, mem_k.dtype] = cos_sin(state.rotary, -torch.arange(k), mem_k)  # positions 0, -1, ...
        table_cos, table_sin = state.age_cos_sin[k, mem_k.dtype]
        age = k - 1 - ids.argsort(dim=-1).argsort(dim=-1)  # (Hkv, r*T, k): 0 = newest
        mem_k = rotate(mem_k, table_cos[age], table_sin[age])
    if cfg.placement == "ordered" and in_order:
        # Ids ascend along the last dim, so the j-th memory is k-1-j places old: rotating each query by
        # k-1-j more positions is the same as rotating that memory back by as many (RoPE is relative).
        per_slot = torch.matmul(queries, _rotation(state, ("slots", k), queries.dtype)).view(n_kv, r * t, k, d)
        mem_logits = (per_slot * mem_k).sum(-1) * scale  # (Hkv, r*T, k)
    else:  # re-score exactly: approximate stores return approximate scores
        mem_logits = torch.matmul(mem_k, queries[..., None])[..., 0] * scale  # (Hkv, r*T, k)
        if cfg.placement == "fixed":  # un-rotated memories: the rotary's attention_scaling once more
            mem_logits = mem_logits * state.unrotated_scale
    if padded:
        mem_logits = mem_logits.masked_fill(ids < 0, float("-inf"))
    mem_logits = mem_logits.reshape(n_kv, r, t, k)  # (Hkv, r, T, k)
    mem_logits = levers.mask_heads(mem_logits, state.head_mask(layer, n_q))
    state.trace.record(ids)

    probs = torch.softmax(torch.cat([mem_logits, local.float()], dim=-1), dim=-1)  # (Hkv, r, T, k + S)
    probs = levers.cap_memory_share(probs, k, cfg.memory_cap)
    if state.trace.keep_shares:
        levers.record_shares(state.trace, layer, probs[..., :k], ids.reshape(n_kv, r, t, k))
    out = torch.matmul(probs[..., None, :k], mem_v.reshape(n_kv, r, t, k, d))[..., 0, :].to(q.dtype)  # (Hkv, r, T, d)
    out = out + torch.matmul(probs[..., k:].to(q.dtype), v_all[0][:, None])
    return out.reshape(n_q, t, d).transpose(0, 1).unsqueeze(0)  # (1, T, Hq, d)


def _decode_among_candidates(state: RetrievalState, layer: int, q: torch.Tensor, q_rot: torch.Tensor,
                             k_all: torch.Tensor, v_all: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`_attend_with_memory` for one decoded token with reused candidates and ordered placement.

    The same result with far fewer tensor operations (each costs tens of microseconds on a CPU, 30
    layers a token): one matmul rotates (and scales) the pre-RoPE queries to every memory slot's
    position at once; the rest is one call of the fused C kernel (:mod:`kvmap.models.kernel`), or,
    where that cannot be built, a short PyTorch sequence.
    """
    cand, keys, panels, values, padded = state.candidates[layer]  # (Hkv, C), (Hkv, C, d), panels, (Hkv, C, d)
    n_kv, n_cand, d = keys.shape
    k = min(state.config.top_k, n_cand)
    r = q.shape[1] // n_kv
    # (Hkv, r, k, d): slot j holds the query rotated to distance + k-1-j, times the softmax scale;
    # the last slot is the search query.
    # Candidates are float32; a float16/bfloat16 model's queries and local K/V are scored in float32 too.
    dtype = q.dtype
    q, q_rot, k_all, v_all = q.float(), q_rot.float(), k_all.float(), v_all.float()
    rotation = _rotation(state, ("query-slots", k, scale), torch.float32)
    per_slot = torch.matmul(q[0, :, 0].view(n_kv, r, d), rotation).view(n_kv, r, k, d)
    q_local = q_rot[0, :, 0].reshape(n_kv, r, d)
    fused = kernel.decode_kernel() if q.device.type == "cpu" else None
    if fused is not None:
        out, ids = kernel.decode_step(fused, per_slot, keys, panels, values, cand, q_local.contiguous(),
                                      k_all[0].contiguous(), v_all[0].contiguous(), scale)
        state.trace.record(ids)
        return out.view(1, 1, n_kv * r, d).to(dtype)

    scores = torch.bmm(per_slot[:, :, -1], keys.transpose(1, 2))  # (Hkv, r, C)
    if padded:
        scores = scores.masked_fill(cand[:, None, :] < 0, float("-inf"))
    # ties go to the earliest candidate, as in the C kernel; then reading order: slot j is k-1-j places old
    pick = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values
    ids, mem_k, mem_v = _gather(state, cand, keys, values, pick)
    mem_logits = (per_slot * mem_k).sum(-1)  # (Hkv, r, k), scaled
    if padded:
        mem_logits = mem_logits.masked_fill(ids < 0, float("-inf"))
    zero = _constant(state, ("zero", torch.float32), lambda: q.new_zeros(1, 1, 1))  # baddbmm's input; beta=0 ignores it
    local = torch.baddbmm(zero, q_local, k_all[0].transpose(1, 2), beta=0, alpha=scale)
    state.trace.record(ids)
    probs = torch.softmax(torch.cat([mem_logits, local], dim=-1), dim=-1)  # (Hkv, r, k + S)
    from_memory = torch.matmul(probs[..., None, :k], mem_v)[..., 0, :]  # (Hkv, r, d)
    out = torch.baddbmm(from_memory, probs[..., k:], v_all[0])
    return out.reshape(1, 1, n_kv * r, d).to(dtype)  # (1, T, Hq, d)


def _gather(state: RetrievalState, cand: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids (Hkv, M, k), keys and values (Hkv, M, k, d) of candidates ``pick`` (Hkv, M, k), by flat
    ``index_select`` (several times cheaper on a CPU than advanced indexing)."""
    n_kv, n_cand, d = keys.shape
    offsets = _constant(state, ("head-offsets", n_kv, n_cand), lambda: (torch.arange(n_kv) * n_cand)[:, None, None])
    rows = (pick + offsets).view(-1)  # into the (Hkv*C) flattened candidates
    shape = pick.shape
    return (cand.view(-1).index_select(0, rows).view(shape), keys.view(-1, d).index_select(0, rows).view(*shape, d),
            values.view(-1, d).index_select(0, rows).view(*shape, d))


def _query_cos_sin(state: RetrievalState, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (head_dim,) at position ``distance`` in ``dtype`` (computed once per dtype from the float32 pair)."""
    if dtype not in state.query_cos_sin:
        cos, sin = state.query_cos_sin[torch.float32]
        state.query_cos_sin[dtype] = (cos.to(dtype), sin.to(dtype))
    return state.query_cos_sin[dtype]


def _constant(state: RetrievalState, key, make) -> torch.Tensor:
    """A small tensor built once per attach (``make()``) and kept in ``state.rotations`` under ``key``."""
    if key not in state.rotations:
        state.rotations[key] = make()
    return state.rotations[key]


def _rotation(state: RetrievalState, what, dtype: torch.dtype) -> torch.Tensor:
    """Cached RoPE rotations as matrices acting on row vectors (``x @ R`` equals :func:`rotate`).

    ``"query"``: (d, d), to position ``distance`` (pre-RoPE queries). ``("slots", k)``: (d, k*d), the
    j-th (d, d) block rotates by k-1-j positions (ordered placement of k memories in reading order).
    ``("query-slots", k, scale)``: both in one, times ``scale``, for pre-RoPE queries.
    """
    key = (what, dtype)
    if key not in state.rotations:
        if what == "query":
            cos, sin = _query_cos_sin(state, dtype)
            state.rotations[key] = rotate(torch.eye(cos.shape[-1], dtype=dtype, device=cos.device), cos, sin)
        elif what[0] == "query-slots":  # to distance, then by k-1-j, then scaled: (d, k*d)
            slots = _rotation(state, ("slots", what[1]), dtype)
            state.rotations[key] = torch.matmul(_rotation(state, "query", dtype), slots) * what[2]
        else:
            k = what[1]
            like = _query_cos_sin(state, dtype)[0]
            cos, sin = cos_sin(state.rotary, torch.arange(k - 1, -1, -1), like)  # (k, d)
            eye = torch.eye(cos.shape[-1], dtype=dtype, device=like.device)
            blocks = rotate(eye[None], cos[:, None, :], sin[:, None, :])  # (k, d, d)
            state.rotations[key] = blocks.permute(1, 0, 2).reshape(cos.shape[-1], k * cos.shape[-1])
    return state.rotations[key]


def _retrieve(state: RetrievalState, layer: int, queries: torch.Tensor,
              t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, bool]:
    """Top-k memory ids (Hkv, M, k) of each query (Hkv, M, d), their keys and values (Hkv, M, k, d),
    whether each query's ids come in reading order, and whether some ids may be -1 (padding).
    Queries are (r, T) flattened, T = ``t`` tokens."""
    cfg, memory = state.config, state.memory
    reuse = cfg.reuse
    if reuse is None:
        _, ids = memory.search(layer, queries, cfg.top_k)
        return (ids, *memory.fetch(layer, ids), False, True)
    if t > 1 or layer not in state.candidates:  # every prompt forward picks candidates; decode steps reuse them
        from kvmap.stores import candidates

        choosing = queries
        if 0 < reuse.select_last < t:  # only the last tokens' queries (the question's) pick candidates
            n_kv, _, d = queries.shape
            choosing = queries.reshape(n_kv, -1, t, d)[:, :, -reuse.select_last:].reshape(n_kv, -1, d)
        if reuse.blocks > 0:
            lo, hi, starts, lengths = memory.block_bounds(layer, reuse.block_size)
            blocks = candidates.candidate_blocks(choosing, lo, hi, reuse.blocks, cfg.search_chunk)
            cand = candidates.block_token_ids(blocks, starts, lengths, reuse.block_size)
        else:  # probe only when asked: a MemoryView written before ``probe`` existed still serves exact reuse
            found = (memory.search_streamed(layer, choosing, reuse.candidates,
                                            probe=Probe(clusters=reuse.probe, distance=cfg.distance))[1]
                     if reuse.probe > 0 else memory.search_streamed(layer, choosing, reuse.candidates)[1])
            cand = candidates.union_ids(found, reuse.next, memory.n_tokens, reuse.next_best)
        keys, values = memory.fetch(layer, cand, release=True)  # cand: (Hkv, C) ascending, -1 last
        state.candidates[layer] = (cand, keys.contiguous(), kernel.key_panels(keys), values.contiguous(),
                                   bool((cand < 0).any()))
    cand, keys, _, values, padded = state.candidates[layer]  # (Hkv, C), (Hkv, C, d), panels, (Hkv, C, d)
    scores = torch.bmm(queries, keys.transpose(1, 2))  # (Hkv, M, C)
    if padded:
        scores = scores.masked_fill(cand[:, None, :] < 0, float("-inf"))
    pick = scores.topk(min(cfg.top_k, cand.shape[1]), dim=-1).indices  # (Hkv, M, k)
    pick = pick.sort(dim=-1).values  # reading order (candidates ascend), pads last
    return (*_gather(state, cand, keys, values, pick), True, padded)


def _choose_blocks(state: RetrievalState, layer: int, q: torch.Tensor, like: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick blocks for ``layer`` from these queries and return their tokens' K/V, placed.

    Each query (rotated to ``distance``) spreads a softmax over the blocks' mean keys, with the attention's
    own scaling (``scale``: ``attn.scaling``, times the rotary's attention_scaling for un-rotated keys); a block's
    score is the mass all of a KV head's queries give it. The best blocks (plus ``neighbours``
    either side and ``following`` after) are imported in reading order. Returns keys, values of shape (Hkv, M, d).
    """
    cfg, memory = state.config, state.memory
    blocks = cfg.blocks
    n_kv = memory.layout.n_kv_heads
    cos, sin = _query_cos_sin(state, torch.float32)
    if blocks.select_last > 0:
        q = q[:, :, -blocks.select_last:]  # (1, Hq, T', d): only the last tokens' queries choose
    queries = rotate(q[0].float(), cos, sin).reshape(n_kv, -1, q.shape[-1])  # (Hkv, r*T', d)
    means = memory.block_means(layer, blocks.size)  # (Hkv, n_blocks, d)
    n_blocks = means.shape[1]
    logits = torch.einsum("hmd,hbd->hmb", queries, means) * (scale * state.unrotated_scale)  # (Hkv, r*T', n_blocks)
    mass = torch.softmax(logits, dim=-1).sum(1)  # (Hkv, n_blocks)
    state.trace.block_mass[layer] = mass
    span = 1 + 2 * blocks.neighbours + blocks.following  # blocks each choice brings
    want = min(n_blocks, blocks.n_blocks * span)
    if memory.n_tokens % blocks.size and n_blocks > want:
        mass[:, -1] = -1.0  # rank the short last block last, so every layer imports the same count
    if blocks.fixed is not None:
        want = min(want, len(blocks.fixed) * span)
    ids = []
    for head in range(n_kv):
        chosen: list[int] = []
        ranking = list(blocks.fixed) if blocks.fixed is not None else mass[head].argsort(descending=True).tolist()
        for b in ranking:
            for nb in range(b - blocks.neighbours, b + blocks.neighbours + blocks.following + 1):
                if 0 <= nb < n_blocks and nb not in chosen and len(chosen) < want:
                    chosen.append(nb)
            if len(chosen) >= want:
                break
        tokens = torch.cat([torch.arange(b * blocks.size, min((b + 1) * blocks.size, memory.n_tokens))
                            for b in sorted(chosen)])
        ids.append(tokens)
    m = min(len(x) for x in ids)  # the last block may be short: keep every head the same length
    ids = torch.stack([x[:m] for x in ids])  # (Hkv, M) reading order
    state.trace.record(ids)
    state.trace.blocks[layer] = ids
    mem_k, mem_v = memory.fetch(layer, ids)  # (Hkv, M, d)
    mem_k, mem_v = mem_k.to(like.dtype), mem_v.to(like.dtype)
    if cfg.placement == "contiguous":
        # Token j of M sits at position j - M: the blocks end right before the prompt's first token.
        pos_cos, pos_sin = cos_sin(state.rotary, torch.arange(m) - m, mem_k)  # (M, d)
        mem_k = rotate(mem_k, pos_cos, pos_sin)
    return mem_k, mem_v


def _attend_with_blocks(attn: nn.Module, state: RetrievalState, q: torch.Tensor, qg: torch.Tensor,
                        local: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
    """Attention over [chosen blocks, local K/V]; blocks are chosen at the first forward and kept."""
    cfg, layer = state.config, attn.layer_idx
    n_kv, r, t, _ = local.shape
    d = q.shape[-1]
    if t > 1 or layer not in state.blocks:  # every prompt forward chooses; decode steps keep the choice
        state.blocks[layer] = _choose_blocks(state, layer, q, q, attn.scaling)
    mem_k, mem_v = state.blocks[layer]  # (Hkv, M, d)
    if cfg.placement == "contiguous":
        qm = qg  # queries at their own positions; blocks just before the prompt
    else:  # fixed: blocks at position 0, queries `distance` ahead (the seed's map)
        cos, sin = _query_cos_sin(state, q.dtype)
        qm = rotate(q[0], cos, sin).reshape(n_kv, r, t, d)
    scale = attn.scaling * (1.0 if cfg.placement == "contiguous" else state.unrotated_scale)
    mem_logits = torch.einsum("hrtd,hmd->hrtm", qm, mem_k) * scale  # (Hkv, r, T, M)
    m = mem_k.shape[1]
    probs = torch.softmax(torch.cat([mem_logits, local], dim=-1).float(), dim=-1).to(q.dtype)
    out = torch.einsum("hrtm,hmd->hrtd", probs[..., :m], mem_v)
    out = out + torch.einsum("hrts,hsd->hrtd", probs[..., m:], v_all[0])
    return out.reshape(n_kv * r, t, d).transpose(0, 1).unsqueeze(0)  # (1, T, Hq, d)
