"""Belady's MIN (L. A. Belady, "A study of replacement algorithms for a virtual-storage
computer", IBM Systems Journal 5(2), 1966): evict the block whose next use lies farthest
in the future.

Offline: it needs the workload's future accesses, which the simulator has for generated
workloads and replayed traces. With demand fetch from a lower tier (demotion to L2) it is
optimal in hits for equal-size blocks; when evicted blocks are dropped it is still the
classic upper-bound reference, though no longer provably optimal.

A block's score changes only when the block is used (its next use moves on). Where the
workload also says which blocks were used between two steps (``bind_future``'s
``used_between``), the scores are kept in a column and recomputed for those blocks only
(and for blocks inserted since): the same float64 values as computing every block's at
each call, where the manager ranks every L1 and L2 block on most steps.
"""

from __future__ import annotations

import numpy as np

from ..errors import ScenarioError
from .base import Column, EvictionPolicy, FutureFn


class Belady(EvictionPolicy):
    name = "belady"
    needs_future = True

    def __init__(self) -> None:
        super().__init__()
        self._next_use: FutureFn | None = None
        self._used_between = None
        self._key = Column(np.float64)  # each block's score as of step ``_at``
        self._at: int | None = None
        self._pending: list[np.ndarray] = []  # ids inserted since the column was updated
        self._known: list[np.ndarray] = []  # every id inserted

    def bind_future(self, next_use: FutureFn, used_between=None) -> None:
        """``next_use(ids, step)``: the first step > ``step`` at which each block is used.
        ``used_between(a, t)`` (optional): the ids of every block used at a step in
        ``(a, t]`` (repeats allowed), the only blocks whose next use after ``t`` is not
        their next use after ``a``."""
        self._next_use = next_use
        self._used_between = used_between
        self._at = None

    def on_insert(self, ids, step, positions):
        super().on_insert(ids, step, positions)
        if len(ids):
            ids = np.array(ids, np.int64)  # a copy: the caller's array may change
            self._pending.append(ids)
            self._known.append(ids)

    def _scores_now(self, ids, step):
        nxt = self._next_use(ids, step).astype(np.float64)
        np.minimum(nxt, 2.0**28, out=nxt)  # in place: the values of -np.minimum(nxt, 2**28)
        return self._tiebreak(np.negative(nxt, out=nxt), ids)

    def scores(self, ids, step):
        if self._next_use is None:
            raise ScenarioError("policy 'belady' needs a workload whose future accesses are "
                                "known (needle or a replayed trace)")
        if self._used_between is None:
            return self._scores_now(ids, step)
        at = self._at
        if at is None or step < at:  # first call, or back in time: every block's
            stale = self._known
        elif step > at:
            stale = [np.asarray(self._used_between(at, step), np.int64)] + self._pending
        else:
            stale = self._pending
        if stale:
            upd = stale[0] if len(stale) == 1 else np.concatenate(stale)
            if len(upd):
                self._key.set(upd, self._scores_now(upd, step))
        self._pending = []
        self._at = step
        return self._key.get(ids)  # a new array (``Column.get`` gathers)
