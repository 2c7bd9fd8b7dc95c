"""Attention sinks plus a recent window (Xiao et al., "Efficient Streaming Language Models
with Attention Sinks", ICLR 2024, arXiv:2309.17453, StreamingLLM).

The first ``sink_blocks`` blocks of the sequence are always kept, everything else is a
sliding window: the oldest non-sink block goes first. Whatever lies in the middle of a
long context (a needle) is lost once the window has passed it.

Where Synapse differs from the paper, and why: sinks and window are whole blocks
(``block_tokens`` tokens; the paper keeps 4 sink tokens), and the window is whatever of
the L1 budget the sinks leave, not a set length. The paper drops what leaves the window;
with demotion to L2 a block a step reads is fetched back and, being old, is the next
victim again (the needle scenario's sinks runs move many blocks for that reason).

A block's score depends on its position only, so it is computed once, on insert, into a
column: ``scores`` is one gather, where the manager ranks every L1 and L2 block per step.
"""

from __future__ import annotations

import numpy as np

from .base import PROTECTED, Column, EvictionPolicy


class AttentionSinks(EvictionPolicy):
    name = "sinks"

    def __init__(self, sink_blocks: int = 1) -> None:
        super().__init__()
        if sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {sink_blocks}")
        self.sink_blocks = sink_blocks
        # fill: the score of position 0 (the position column's fill)
        self._score = Column(np.float64, self._score_of(np.zeros(1, np.int64))[0])

    def _score_of(self, positions):
        pos = positions.astype(np.float64)
        return np.add(pos, PROTECTED, out=pos, where=pos < self.sink_blocks)  # see H2O.scores

    def on_insert(self, ids, step, positions):
        super().on_insert(ids, step, positions)
        if len(ids):
            self._score.set(ids, self._score_of(self.position.get(ids)))

    def scores(self, ids, step):
        return self._score.get(ids)  # a new array (``Column.get`` gathers)

    def describe(self):
        return {"name": self.name, "sink_blocks": self.sink_blocks}
