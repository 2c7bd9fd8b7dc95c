"""First in, first out: the block that entered the cache first goes first.

A block fetched back from L2 (demand fetch or prefetch) counts as entering again, so FIFO
over a tiered cache is "oldest arrival in L1", not "oldest token"; a hit changes nothing.

The score (the arrival, as float64) is kept in a column set on arrival: ``scores`` is
one gather, where the manager ranks every L1 and L2 block on most steps.
"""

from __future__ import annotations

import numpy as np

from .base import Column, EvictionPolicy


class FIFO(EvictionPolicy):
    name = "fifo"

    def __init__(self) -> None:
        super().__init__()
        self.arrival = Column(np.int64)
        self._score = Column(np.float64)  # arrival as float64 (fill: arrival 0)
        self._n = 0

    def _arrive(self, ids):
        order = np.arange(self._n, self._n + len(ids))
        self.arrival.set(ids, order)
        self._score.set(ids, order.astype(np.float64))
        self._n += len(ids)

    def on_insert(self, ids, step, positions):
        super().on_insert(ids, step, positions)
        self._arrive(ids)

    def on_fetch(self, ids, step):
        self._arrive(ids)

    def scores(self, ids, step):
        return self._score.get(ids)  # a new array (``Column.get`` gathers)
