"""Least recently used: the block whose last use is oldest goes first.

A use is a step reading the block: in L1 (``on_access``), or fetched back from L2 because
the step reads it (``on_fetch``), which is the textbook miss that brings a block in and
makes it the most recently used. A prefetch is not a use: the block keeps the last use it
had (``on_prefetch``). Prefetch takes L2 blocks whose last use is more recent than L1's
weakest, so a prefetched block is not the next victim either.

The score of a block changes only when it is used, so it is kept in a column, set by the
hooks (``last_use * 2**24 + position``, the same float64 as computed from the last use):
``scores`` is one gather, where the manager ranks every L1 and L2 block on most steps.
"""

from __future__ import annotations

import numpy as np

from .base import Column, EvictionPolicy


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.last_use = Column(np.int64)
        self._score = Column(np.float64)  # fill: the score of last use 0 at position 0

    def _use(self, ids, step):
        self.last_use.set(ids, step)
        if len(ids):
            self._score.set(ids, self._tiebreak(np.full(len(ids), step, np.int64), ids))

    def on_insert(self, ids, step, positions):
        super().on_insert(ids, step, positions)
        self._use(ids, step)

    def on_access(self, ids, step):
        self._use(ids, step)

    def on_fetch(self, ids, step):
        self._use(ids, step)

    def on_prefetch(self, ids, step):
        pass

    def scores(self, ids, step):
        return self._score.get(ids)  # a new array (``Column.get`` gathers)
