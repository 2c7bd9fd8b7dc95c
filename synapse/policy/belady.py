"""Belady's MIN (L. A. Belady, "A study of replacement algorithms for a virtual-storage
computer", IBM Systems Journal 5(2), 1966): evict the block whose next use lies farthest
in the future.

Offline: it needs the workload's future accesses, which the simulator has for generated
workloads and replayed traces. With demand fetch from a lower tier (demotion to L2) it is
optimal in hits for equal-size blocks; when evicted blocks are dropped it is still the
classic upper-bound reference, though no longer provably optimal.
"""

from __future__ import annotations

import numpy as np

from ..errors import ScenarioError
from .base import EvictionPolicy, FutureFn


class Belady(EvictionPolicy):
    name = "belady"
    needs_future = True

    def __init__(self) -> None:
        super().__init__()
        self._next_use: FutureFn | None = None

    def bind_future(self, next_use: FutureFn) -> None:
        """``next_use(ids, step)``: the first step > ``step`` at which each block is used."""
        self._next_use = next_use

    def scores(self, ids, step):
        if self._next_use is None:
            raise ScenarioError("policy 'belady' needs a workload whose future accesses are "
                                "known (needle or a replayed trace)")
        nxt = self._next_use(ids, step).astype(np.float64)
        np.minimum(nxt, 2.0**28, out=nxt)  # in place: the values of -np.minimum(nxt, 2**28)
        return self._tiebreak(np.negative(nxt, out=nxt), ids)
