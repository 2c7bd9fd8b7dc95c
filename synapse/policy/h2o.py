"""H2O, heavy-hitter oracle (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", NeurIPS 2023, arXiv:2306.14048).

Score = attention accumulated by the block over every step it was resident. The L1 budget
is split: ``heavy_ratio`` of it for heavy hitters (highest accumulated attention) and the
rest for a protected window of the most recent blocks, which have not had time to
accumulate. Eviction picks the lowest accumulated score outside the window, O(n) with
``argpartition``.
"""

from __future__ import annotations

import numpy as np

from .base import PROTECTED, Column, EvictionPolicy


class H2O(EvictionPolicy):
    name = "h2o"
    needs_attention = True

    def __init__(self, heavy_ratio: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= heavy_ratio <= 1.0:
            raise ValueError(f"heavy_ratio must be within [0, 1], got {heavy_ratio}")
        self.heavy_ratio = heavy_ratio
        self.acc = Column(np.float64)

    @property
    def recent_blocks(self) -> int:
        return int(round(self.capacity_blocks * (1.0 - self.heavy_ratio)))

    def on_insert(self, ids, step, positions):
        super().on_insert(ids, step, positions)
        self.acc.set(ids, 0.0)

    def on_attention(self, ids, mass, step):
        if len(ids):
            self.acc.ensure(int(ids.max()))
            np.add.at(self.acc.a, ids, mass)

    def scores(self, ids, step):
        s = self.acc.get(ids).copy()
        s[self._recent_mask(ids, self.recent_blocks)] += PROTECTED
        return s

    def describe(self):
        return {"name": self.name, "heavy_ratio": self.heavy_ratio}
