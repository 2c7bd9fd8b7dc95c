"""Prefetch scheduling.

Weights: a lookahead of ``depth`` layers, capped by how many layers the ring can hold at
once; layer i+k is issued while layer i computes. KV: the L2 blocks the eviction policy
ranks highest (the ones it would least like to have lost) are brought back into the
headroom below the high watermark, never beyond the L1 budget and never by evicting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LayerPrefetch:
    depth: int = 2

    def __post_init__(self) -> None:
        if self.depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {self.depth}")

    def effective_depth(self, max_lookahead: int) -> int:
        return max(0, min(self.depth, max_lookahead))

    def window(self, layer: int, num_layers: int, max_lookahead: int, total: int) -> range:
        """Global layer indices (across passes, < ``total``) to have in flight while
        ``layer`` computes: layer+1 .. layer+depth."""
        d = self.effective_depth(max_lookahead)
        return range(layer + 1, min(total, layer + 1 + d))


@dataclass(frozen=True)
class KVPrefetch:
    max_blocks: int = 8

    def choose(self, ranked_l2: np.ndarray, nbytes: np.ndarray, headroom_bytes: int) -> np.ndarray:
        """Take blocks in rank order while they fit in the headroom, up to max_blocks."""
        if self.max_blocks <= 0 or headroom_bytes <= 0 or len(ranked_l2) == 0:
            return ranked_l2[:0]
        cand = ranked_l2[: self.max_blocks]
        fits = np.cumsum(nbytes[: len(cand)]) <= headroom_bytes
        return cand[fits]
