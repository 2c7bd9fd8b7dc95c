"""The steps of one sequence over a tier manager, shared by the live transformers cache
and the trace replay on the simulator.

Plain Python and NumPy (no torch): ``synapse.hf.TieredCache`` runs it while a model
generates, and the ``trace`` scenario runs the very same calls on the simulator, so a
trace replayed with the same policy and budget makes the same decisions, block for block.

A step is one forward pass that adds ``q`` tokens to one sequence. A block is
``block_tokens`` consecutive tokens of K and V for every layer and KV head; block ids
are assigned in position order. Per step:

1. ``begin``: every live block is read by this step's (dense) attention: L1 blocks count
   as L1 hits, L2 blocks as L2 hits (read through); a block dropped earlier counts as a
   miss, every step, since dense attention would have read it.
2. ``admit`` (a generator): the step's new blocks go into L1; while they do not fit, the
   manager picks victims (yielded as moves, which the caller executes and commits) with
   the scores known so far, never the partial tail block (pinned until full).
3. ``observe``: the step's attention mass per live block (mean over layers of the mass
   summed over a block's tokens, averaged over heads and queries) feeds the policy:
   ``touch`` for blocks with at least ``access_factor`` x the uniform mass (the needle
   workload's definition of "used"), ``observe`` for all; then background demotion to
   the low watermark and prefetch into the headroom (returned as moves).
"""

from __future__ import annotations

import math

import numpy as np

from ..blocks import BlockSpec, Fmt, State, Tier
from ..errors import CapacityError
from ..manager import TierManager

_LIVE = int(State.LIVE)


def follow_tail(mgr: TierManager, tail: int | None, last: int, full: bool) -> int | None:
    """Keep the block still being written pinned (never a victim) until it is full.

    ``tail``: the pinned block so far (or None); ``last``: the sequence's last block now;
    ``full``: whether it holds ``block_tokens`` tokens. Returns the new tail."""
    if tail is not None and (tail != last or full):
        mgr.unpin(tail)  # full now, or no longer the last block
    new = None if full else last
    if new is not None:
        mgr.pin(new)
    return new


class SequencePlanner:
    """Steps of one sequence over a tier manager (see the module docstring)."""

    def __init__(self, manager: TierManager, block_tokens: int, access_factor: float = 4.0):
        self.mgr = manager
        self.bt = block_tokens
        self.access_factor = access_factor
        self.tokens = 0
        self.tail: int | None = None
        self.capacity_blocks = manager.l1_capacity // manager.sizes[Fmt.FP16]

    # -- queries ----------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return math.ceil(self.tokens / self.bt)

    def live_ids(self) -> np.ndarray:
        """Ids (= positions) of the blocks still in a tier, in position order."""
        t = self.mgr.table
        return np.flatnonzero(t.state[: len(t)] == _LIVE)

    def new_positions(self, q: int) -> np.ndarray:
        return np.arange(math.ceil(self.tokens / self.bt), math.ceil((self.tokens + q) / self.bt),
                         dtype=np.int64)

    # -- 1. reads -----------------------------------------------------------------------
    def begin(self, t: int) -> None:
        # counted from the page table's id lists (kept until a tier changes: most steps
        # none does); a block in neither tier is in none (Tier has no fourth value)
        table = self.mgr.table
        l1, l2 = len(table.ids_in(Tier.L1)), len(table.ids_in(Tier.L2))
        self.mgr.record_reads(l1=l1, l2=l2, misses=len(table) - l1 - l2)

    # -- 2. admission -------------------------------------------------------------------
    def step_blocks(self, q: int) -> int:
        """L1 blocks a forward pass of ``q`` new tokens needs at once (new + the tail):
        ``len(new_positions(q))`` by integer arithmetic (checked twice a step)."""
        new = -(-(self.tokens + q) // self.bt) + (self.tokens // -self.bt)
        return new + (1 if self.tail is not None else 0)

    def check_step(self, q: int) -> None:
        """CapacityError (before anything moves) when a step's new blocks cannot fit."""
        need = self.step_blocks(q)
        if need > self.capacity_blocks:
            raise CapacityError(
                f"a forward pass of {q} tokens needs {need} KV blocks of {self.bt} tokens in L1 "
                f"at once, but the L1 budget holds {self.capacity_blocks} blocks "
                f"({self.capacity_blocks * self.bt} tokens); raise l1_budget_tokens or feed the "
                f"prompt in chunks (generate(..., prefill_chunk_size={max(self.bt, (self.capacity_blocks - 1) * self.bt)}))")

    def admit(self, t: int, q: int):
        """Generator: yields lists of moves (forced evictions) that the caller must execute
        and commit before it continues; then inserts the step's new blocks."""
        mgr = self.mgr
        self.check_step(q)
        new = self.new_positions(q)
        sizes = [mgr.sizes[Fmt.FP16]] * len(new)
        protected = np.asarray([self.tail] if self.tail is not None else [], np.int64)
        while len(new) and not mgr.fits(sizes):
            yield mgr.make_room(sizes, protected, t, new)
        end = self.tokens + q
        if len(new):
            specs = [BlockSpec(mgr.sizes[Fmt.FP16], token_start=int(p) * self.bt,
                               token_end=min((int(p) + 1) * self.bt, end)) for p in new]
            ids = mgr.insert(specs, t, new)
            assert np.array_equal(ids, new), "block ids must follow positions"
        if self.tail is not None:
            mgr.extend(self.tail, min((self.tail + 1) * self.bt, end))
        self.tokens = end
        last = (end - 1) // self.bt
        self.tail = follow_tail(mgr, self.tail, last, end - last * self.bt == self.bt)

    # -- 3. observation -----------------------------------------------------------------
    def observe(self, t: int, live: np.ndarray, mass: np.ndarray):
        """Feed the step's masses (float64 of float32 values, one per live block) to the
        policy; returns the background moves (demotions, then prefetches)."""
        mgr = self.mgr
        if len(live):
            used = live[mass >= self.access_factor / len(live)]
            mgr.touch(used, t)
            mgr.observe(live, mass, t)
        protected = np.asarray([self.tail] if self.tail is not None else [], np.int64)
        demote, prefetch = mgr.plan_background(t, protected)
        return demote + prefetch
