"""The score-based skeleton every eviction policy shares.

A policy keeps a little state per block id (last access, accumulated attention, ...),
turns it into a score, and evicts the lowest scores first. The tier manager owns the page
table and decides *how many* blocks must go and which are off limits (the working set of
the current step); the policy only ranks. No I/O, no clocks, no backend imports: the same
decisions come out on the simulator and on the hardware, given the same inputs.

Operations: ``bind`` (the L1 budget in blocks), ``begin_round`` (what the next eviction
round keeps, and the blocks it makes room for), ``on_insert``, ``on_access``,
``on_fetch`` / ``on_prefetch``, ``on_attention``, ``on_remove``, ``scores`` and ``victims``
(top-k lowest by ``numpy.argpartition``, O(n), not a sort).
"""

from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np

# Scores are float64: a primary key scaled by 2**24 plus the block's position as the tie
# breaker (older first), exact while steps stay below 2**29 and positions below 2**24.
_TIE = float(2**24)
PROTECTED = 2.0**62  # added to blocks a policy wants to keep whenever it can


class Column:
    """A NumPy array indexed by block id that grows on demand."""

    def __init__(self, dtype, fill=0):
        self.fill = fill
        self.a = np.full(1024, fill, dtype)

    def ensure(self, max_id: int) -> None:
        if max_id >= len(self.a):
            new = np.full(max(max_id + 1, 2 * len(self.a)), self.fill, self.a.dtype)
            new[: len(self.a)] = self.a
            self.a = new

    def set(self, ids: np.ndarray, values) -> None:
        try:  # ids within the column (NumPy checks every index before it writes any)
            self.a[ids] = values
        except IndexError:
            if not len(ids):
                raise
            self.ensure(int(ids.max()))
            self.a[ids] = values

    def get(self, ids: np.ndarray) -> np.ndarray:
        try:  # ids within the column (every inserted block): no max() over them
            return self.a[ids]
        except IndexError:
            if not len(ids):
                raise
            self.ensure(int(ids.max()))
            return self.a[ids]


class EvictionPolicy:
    """Base class: subclasses override ``scores`` and whichever hooks they need."""

    name: ClassVar[str] = "base"
    needs_attention: ClassVar[bool] = False  # wants on_attention (H2O)
    needs_future: ClassVar[bool] = False     # wants bind_future (Belady)

    def __init__(self) -> None:
        self.capacity_blocks = 0
        self.position = Column(np.int64)
        self.inserted = Column(np.int64)
        self._seq = 0
        self._newest = 0  # max of the position column (its fill is 0), kept on insert

    def bind(self, capacity_blocks: int) -> None:
        """The L1 budget in blocks, for policies whose windows are a share of it."""
        self.capacity_blocks = max(1, int(capacity_blocks))

    def on_insert(self, ids: np.ndarray, step: int, positions: np.ndarray) -> None:
        """New blocks entered the cache; ``positions`` orders them within their sequence."""
        self.position.set(ids, positions)
        if len(ids):
            self._newest = max(self._newest, int(np.max(positions)))
        self.inserted.set(ids, np.arange(self._seq, self._seq + len(ids)))
        self._seq += len(ids)

    def on_access(self, ids: np.ndarray, step: int) -> None:
        """These resident blocks were used at ``step``."""

    def begin_round(self, keep_blocks: int, arriving: np.ndarray | None = None) -> None:
        """The manager is about to ask for victims: after this round L1 holds about
        ``keep_blocks`` blocks, counting the blocks at positions ``arriving``, which the
        round makes room for and which are not inserted yet (they are the newest)."""
        if arriving is not None and len(arriving):
            self._newest = max(self._newest, int(np.max(arriving)))

    def on_fetch(self, ids: np.ndarray, step: int) -> None:
        """These blocks came back into L1 from a lower tier because ``step`` reads them."""

    def on_prefetch(self, ids: np.ndarray, step: int) -> None:
        """These blocks came back into L1 ahead of any read (prefetch); by default the
        same as a fetch."""
        self.on_fetch(ids, step)

    def on_attention(self, ids: np.ndarray, mass: np.ndarray, step: int) -> None:
        """Attention mass each resident block received at ``step`` (sums to <= 1)."""

    def on_remove(self, ids: np.ndarray) -> None:
        """The blocks left the cache for good (dropped or freed)."""

    def scores(self, ids: np.ndarray, step: int) -> np.ndarray:
        """Each block's score at ``step`` (the lowest go first), as a new float64 array
        the caller may change (the manager's prefetch ranking negates it in place)."""
        raise NotImplementedError

    def victims(self, candidates: np.ndarray, n: int, step: int) -> np.ndarray:
        """The ``n`` lowest-scoring candidates, ascending by id (all of them if n >= len)."""
        candidates = np.asarray(candidates, np.int64)
        if n <= 0:
            return candidates[:0]
        if n >= len(candidates):
            return np.sort(candidates)
        s = self.scores(candidates, step)
        part = np.argpartition(s, n - 1)[:n]
        return np.sort(candidates[part])

    def rank_for_keeping(self, candidates: np.ndarray, step: int) -> np.ndarray:
        """Candidates ordered from most to least worth having in L1 (used by prefetch)."""
        candidates = np.asarray(candidates, np.int64)
        if len(candidates) == 0:
            return candidates
        return candidates[np.argsort(-self.scores(candidates, step), kind="stable")]

    # shared helpers ----------------------------------------------------------------
    def _tiebreak(self, primary: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """``primary * 2**24 + position``, computed in place: ``primary`` is a temporary
        of the caller's, reused when it is float64 already (the same products and sums,
        without a new array per operation over thousands of blocks)."""
        s = primary.astype(np.float64, copy=False)
        s *= _TIE
        s += self.position.get(ids)
        return s

    def _recent_mask(self, ids: np.ndarray, window_blocks: int) -> np.ndarray:
        """True for blocks among the ``window_blocks`` newest positions seen so far."""
        if window_blocks <= 0 or len(ids) == 0:
            return np.zeros(len(ids), bool)
        return self.position.get(ids) > self._newest - window_blocks

    def describe(self) -> dict:
        return {"name": self.name}


FutureFn = Callable[[np.ndarray, int], np.ndarray]
