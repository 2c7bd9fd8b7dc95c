"""Least recently used: the block whose last use is oldest goes first.

A use is a step reading the block: in L1 (``on_access``), or fetched back from L2 because
the step reads it (``on_fetch``), which is the textbook miss that brings a block in and
makes it the most recently used. A prefetch is not a use: the block keeps the last use it
had (``on_prefetch``). Prefetch takes L2 blocks whose last use is more recent than L1's
weakest, so a prefetched block is not the next victim either.
"""

from __future__ import annotations

import numpy as np

from .base import Column, EvictionPolicy


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.last_use = Column(np.int64)

    def on_insert(self, ids, step, positions):
        super().on_insert(ids, step, positions)
        self.last_use.set(ids, step)

    def on_access(self, ids, step):
        self.last_use.set(ids, step)

    def on_fetch(self, ids, step):
        self.last_use.set(ids, step)

    def on_prefetch(self, ids, step):
        pass

    def scores(self, ids, step):
        return self._tiebreak(self.last_use.get(ids), ids)
