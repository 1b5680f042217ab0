"""What a memory did while the model answered: the explorer's view of one question (``kvmap explore``).

Token-level import records, at every forward, each query head's share of attention that went to memories
and the memory it attended most (:attr:`kvmap.ports.ImportTrace.keep_shares`). From that this module
builds what one debugs a wrong answer with: a layer x head map of the memories' share, for each decoded
token the memories it drew on, and those memories shown in place in their documents. The splice modes put
whole blocks into the prompt instead; for them the view lists the spliced blocks and has no map (nothing
is imported into attention).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from kvmap.answer import ASK_MODES, ask
from kvmap.models.loading import LoadedModel

CONTEXT_TOKENS = 24
"""Tokens shown on each side of a drawn-on memory in its document."""
DRAWN_PER_TOKEN = 3
"""Memories listed for each decoded token."""
PLACES_SHOWN = 24
"""Most drawn-on memory tokens placed in their documents."""


@dataclass
class TokenDraw:
    """One decoded token and the memories it drew on."""

    text: str
    share: float
    """Mean over layers and query heads of the attention share that went to memories at this step."""
    memories: list[int]
    """Memory ids it drew on most (the heads' most-attended memories, weighted by their share), best first."""


@dataclass
class Piece:
    """A run of a document's text; ``weight`` > 0 where a drawn-on memory token sits (1 = the most drawn)."""

    text: str
    weight: float = 0.0
    memory_id: int = -1


@dataclass
class Place:
    """Where drawn-on memories sit: one document, a window of its text with them highlighted."""

    source: str
    doc_id: int
    weight: float
    """Sum of its memories' weights (sorts the places)."""
    pieces: list[Piece] = field(default_factory=list)


@dataclass
class Inspection:
    """Everything the explorer shows for one question (JSON-ready through :meth:`as_dict`)."""

    question: str
    mode: str
    answer: str
    answer_without_memory: str
    seconds: float
    memories: list[dict]
    """The answer's listed memories (:attr:`kvmap.answer.Answer.memories`) as dicts."""
    layers: list[int] = field(default_factory=list)
    """The layers of :attr:`heatmap`'s rows."""
    heatmap: list[list[float]] = field(default_factory=list)
    """(layers, query heads): mean share of attention on memories over the decoded tokens; empty in splice modes."""
    tokens: list[TokenDraw] = field(default_factory=list)
    places: list[Place] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def inspect_answer(lm: LoadedModel, memory, question: str, mode: str = "import-bm25",
                   max_new_tokens: int = 48) -> Inspection:
    """Answer ``question`` with and without ``memory`` and record what the memory contributed."""
    if mode not in ASK_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(ASK_MODES)}")
    without = ask(lm, question, None, max_new_tokens=max_new_tokens)
    answer = ask(lm, question, memory, max_new_tokens=max_new_tokens, mode=mode, keep_shares=True)
    view = Inspection(question=question, mode=mode, answer=answer.text, answer_without_memory=without.text,
                      seconds=round(answer.seconds, 2),
                      memories=[asdict(m) for m in answer.memories])
    if answer.trace is None or not answer.trace.shares:
        view.note = ("splice modes put the chosen blocks into the prompt: nothing is imported into attention, "
                     "so there is no layer x head map; the spliced blocks are listed")
        view.places = [Place(m.source, m.doc_id, m.score, [Piece(m.text, 1.0)]) for m in answer.memories]
        return view
    to_memory = (lambda i: i) if answer.trace_ids is None else (lambda i: int(answer.trace_ids[i]))  # noqa: E731
    shares = answer.trace.shares  # layer -> one (share (Hq, T), top (Hq, T)) per forward
    view.layers = sorted(shares)
    n_steps = min(answer.new_tokens, min(len(shares[layer]) for layer in view.layers))
    # forward s (0 = the prompt's, at its last position) chose decoded token s
    step_share = torch.stack([torch.stack([shares[layer][s][0][:, -1] for s in range(n_steps)])
                              for layer in view.layers])  # (L, steps, Hq)
    step_top = torch.stack([torch.stack([shares[layer][s][1][:, -1] for s in range(n_steps)])
                            for layer in view.layers])  # (L, steps, Hq)
    view.heatmap = step_share.mean(1).tolist() if n_steps else []
    new_ids = lm.tokenizer(answer.text, add_special_tokens=False)["input_ids"]
    texts = [lm.tokenizer.decode([i]) for i in new_ids]
    total: Counter = Counter()
    for s in range(n_steps):
        drawn: Counter = Counter()
        for traced, share in zip(step_top[:, s].flatten().tolist(), step_share[:, s].flatten().tolist()):
            if traced >= 0:
                drawn[to_memory(traced)] += share
        total.update(drawn)
        view.tokens.append(TokenDraw(text=texts[s] if s < len(texts) else "", share=float(step_share[:, s].mean()),
                                     memories=[i for i, _ in drawn.most_common(DRAWN_PER_TOKEN)]))
    view.places = places(memory, dict(total.most_common(PLACES_SHOWN)))
    return view


def places(memory, weights: dict[int, float], context: int = CONTEXT_TOKENS) -> list[Place]:
    """The memories ``weights`` (id -> weight) in their documents: for each document, windows of ``context``
    tokens around them (windows that overlap merge), the memories' weights scaled to the largest."""
    if not weights:
        return []
    top = max(weights.values()) or 1.0
    texts = memory.token_texts()
    by_doc: dict[tuple[str, int], list[int]] = {}
    for i in sorted(weights):
        e = memory.entry(i)
        by_doc.setdefault((e.source, e.doc_id), []).append(i)
    result = []
    for (source, doc_id), ids in by_doc.items():
        same_doc = lambda j: (lambda e: e.source == source and e.doc_id == doc_id)(memory.entry(j))  # noqa: E731
        place = Place(source, doc_id, sum(weights[i] for i in ids))
        end = -1
        for i in ids:
            lo = max(0, i - context)
            while lo < i and not same_doc(lo):
                lo += 1
            if lo > end + 1 and place.pieces:
                place.pieces.append(Piece(" … "))
            for j in range(max(lo, end + 1), min(memory.n_tokens, i + context + 1)):
                if not same_doc(j):
                    break
                w = weights.get(j, 0.0) / top
                place.pieces.append(Piece(texts[j], round(w, 3), j if w else -1))
                end = j
        result.append(place)
    return sorted(result, key=lambda p: -p.weight)
