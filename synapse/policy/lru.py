"""Least recently used: the block whose last use is oldest goes first."""

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

    def scores(self, ids, step):
        return self._tiebreak(self.last_use.get(ids), ids)
