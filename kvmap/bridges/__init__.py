"""Cross-model memory: linear adapters between two models' K/V spaces, and ``connect`` to join them."""
from kvmap.bridges.adapters import KVAdapter, same_depth_pairs
from kvmap.bridges.connect import Bridge, connect

__all__ = ["Bridge", "KVAdapter", "connect", "same_depth_pairs"]
