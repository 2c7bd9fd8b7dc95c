"""The policy layer: eviction ranking, demotion, watermarks and prefetch scheduling.

Plain Python and NumPy only; it imports neither simpy nor pycuda (a test checks), so the
same decisions are made on every backend.
"""

from __future__ import annotations

from ..errors import ScenarioError
from .base import EvictionPolicy
from .belady import Belady
from .demotion import Demotion
from .fifo import FIFO
from .h2o import H2O
from .lru import LRU
from .prefetch import KVPrefetch, LayerPrefetch
from .sinks import AttentionSinks
from .watermarks import Watermarks

POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRU,
    "fifo": FIFO,
    "h2o": H2O,
    "sinks": AttentionSinks,
    "belady": Belady,
}


def make_policy(name: str, heavy_ratio: float = 0.5, sink_blocks: int = 1) -> EvictionPolicy:
    """Build a policy by name; the error lists the valid names."""
    if name not in POLICIES:
        raise ScenarioError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
    if name == "h2o":
        return H2O(heavy_ratio=heavy_ratio)
    if name == "sinks":
        return AttentionSinks(sink_blocks=sink_blocks)
    return POLICIES[name]()


__all__ = ["POLICIES", "make_policy", "EvictionPolicy", "LRU", "FIFO", "H2O", "AttentionSinks",
           "Belady", "Demotion", "Watermarks", "LayerPrefetch", "KVPrefetch"]
