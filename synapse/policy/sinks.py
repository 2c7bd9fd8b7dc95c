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
"""

from __future__ import annotations

import numpy as np

from .base import PROTECTED, EvictionPolicy


class AttentionSinks(EvictionPolicy):
    name = "sinks"

    def __init__(self, sink_blocks: int = 1) -> None:
        super().__init__()
        if sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {sink_blocks}")
        self.sink_blocks = sink_blocks

    def scores(self, ids, step):
        pos = self.position.get(ids).astype(np.float64)
        return np.add(pos, PROTECTED, out=pos, where=pos < self.sink_blocks)  # see H2O.scores

    def describe(self):
        return {"name": self.name, "sink_blocks": self.sink_blocks}
