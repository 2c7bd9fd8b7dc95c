"""H2O, heavy-hitter oracle (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", NeurIPS 2023, arXiv:2306.14048).

Score = attention accumulated by the block over every step it was resident. The rule: of
a budget of k blocks, keep the ``k - heavy`` newest positions (the recent window, which
has not had time to accumulate) and the ``heavy = round(heavy_ratio * k)`` highest
accumulated scores among the others. Eviction picks the lowest accumulated score outside
the window, O(n) with ``argpartition``.

Where the tier manager differs from the paper, and why (``synapse/manager.py``):

- The paper's cache holds k tokens between steps and k+1 while one is decoded: the new
  token arrives, is scored by the step's attention, then the lowest goes. L1 is a hard
  budget, so on the manager path k is what an eviction round leaves in L1, set by
  ``begin_round``: the low watermark for the background round that runs after the step's
  attention has been observed (there the step's new blocks are scored and are victims when
  the rule says so, as in the paper), the whole L1 budget for a forced round that must make
  room for a step's blocks before they arrive. The split applies to that k; prefetch,
  which runs in the background round, ranks L2 blocks with that round's window.
- A forced round counts the arriving blocks in the recent window (as ``evict_for_space``
  does in the authors' code, FMInference/H2O ``h2o_hf/utils_real_drop/modify_llama.py``),
  so they take the window's room, not the heavy hitters'. They cannot be victims there:
  they have no score yet, and when a step brings more blocks than the window (a prefill
  chunk at a small budget) the heavy share is what is left of the budget.
- Synapse demotes a victim to L2 (or INT4) unless ``demote: drop``; the paper drops it.
  A demoted block that a step reads is fetched back with the score it had.
- Blocks a step reads, in-flight blocks and a partial tail block are never victims.
- The paper scores tokens per head and layer; a Synapse block is ``block_tokens`` tokens
  of every layer and head, scored by the mass all of them received.
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
        self.keep_blocks = 0

    def bind(self, capacity_blocks):
        super().bind(capacity_blocks)
        self.keep_blocks = self.capacity_blocks

    def begin_round(self, keep_blocks, arriving=None):
        super().begin_round(keep_blocks, arriving)
        self.keep_blocks = max(0, int(keep_blocks))

    @property
    def heavy_blocks(self) -> int:
        return int(self.heavy_ratio * self.keep_blocks + 0.5)

    @property
    def recent_blocks(self) -> int:
        return self.keep_blocks - self.heavy_blocks

    def on_insert(self, ids, step, positions):
        super().on_insert(ids, step, positions)
        self.acc.set(ids, 0.0)

    def on_attention(self, ids, mass, step):
        if len(ids):
            self.acc.ensure(int(ids.max()))
            if (ids[1:] > ids[:-1]).all():  # distinct (the resident ids, ascending): the
                self.acc.a[ids] += mass      # same sums as add.at, several times faster
            else:
                np.add.at(self.acc.a, ids, mass)

    def scores(self, ids, step):
        s = self.acc.get(ids)  # a new array: ``Column.get`` indexes with an array
        # add where: one pass, the same sums as ``s[mask] += PROTECTED`` (gather, scatter)
        return np.add(s, PROTECTED, out=s, where=self._recent_mask(ids, self.recent_blocks))

    def describe(self):
        return {"name": self.name, "heavy_ratio": self.heavy_ratio}
