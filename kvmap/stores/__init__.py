"""Stores of remembered keys/values: exact, faiss (flat, HNSW, IVF-PQ) and LSH, in a `Memory` folder."""
from kvmap.stores.base import STORE_KINDS, KVIndex, make_index
from kvmap.stores import exact, faiss_index, lsh  # noqa: F401  (each registers its store kinds)
from kvmap.stores.memory import Memory

__all__ = ["Memory", "KVIndex", "STORE_KINDS", "make_index"]
