"""The block bookkeeping of a tiered KV cache, shared by the live cache and trace replay.

Plain Python and NumPy (no torch): ``synapse.hf.TieredCache`` runs it while a model
generates, and the ``trace`` scenario runs the very same calls on the simulator, so a
trace replayed with the same policy and budget makes the same decisions, block for block.

A step is one forward pass that adds ``q`` tokens to one sequence. A block is
``block_tokens`` consecutive tokens of K and V for every layer and KV head (Synapse's
KV block); block ids are assigned in position order. Per step:

1. ``begin``: every live block is read by this step's (dense) attention: L1 blocks count
   as L1 hits, L2 blocks as L2 hits (read through, see ``synapse.hf.cache``); a block
   dropped earlier counts as a miss, every step, since dense attention would have read it.
2. ``admit`` (a generator): the step's new blocks go into L1; while they do not fit, the
   manager picks victims (yielded as moves, which the caller executes and commits) with
   the scores known so far, never the partial tail block (pinned until full).
3. ``observe``: the step's attention mass per live block (mean over layers of the mass
   summed over a block's tokens, averaged over heads and queries) feeds the policy:
   ``on_access`` for blocks with at least ``access_factor`` x the uniform mass (the
   needle workload's definition of "used"), ``on_attention`` for all; then background
   demotion to the low watermark and prefetch into the headroom (returned as moves).
"""

from __future__ import annotations

import math

import numpy as np

from ..blocks import BlockSpec, Fmt, State, Tier
from ..errors import CapacityError
from ..manager import DecisionLog, Spaces, TierManager
from ..page_table import PageTable
from ..policy import Demotion, KVPrefetch, Watermarks, make_policy

_L1, _L2, _NONE = int(Tier.L1), int(Tier.L2), int(Tier.NONE)
_LIVE = int(State.LIVE)

DEMOTE_NAMES = {"int4": "l2_int4", "l2_int4": "l2_int4", "l2": "l2", "drop": "drop"}


class AccountingMemory:
    """A ``synapse.hw.memory.Memory`` that holds no bytes: the live cache keeps its data
    in torch tensors and uses the slab allocators for byte accounting only."""

    def __init__(self, nbytes: int, kind: str) -> None:
        self._nbytes, self._kind = int(nbytes), kind

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def kind(self) -> str:
        return self._kind

    def zero(self, offset: int, nbytes: int) -> None:
        pass

    def zero_ranges(self, ranges) -> None:
        pass

    def address(self, offset: int) -> int:
        return offset


def build_manager(full_bytes: int, int4_bytes: int, l1_bytes: int, l2_bytes: int, *,
                  policy: str, demote: str, heavy_ratio: float, sink_blocks: int,
                  high_watermark: float, low_watermark: float, eviction_ratio: float,
                  prefetch_blocks: int, staging_blocks: int = 64) -> TierManager:
    """A tier manager built as ``drivers.kv_common.build_kv`` builds one (same page sizes,
    size classes, policy and watermarks), over accounting-only memories."""
    from ..drivers.kv_common import page_bytes_for
    from ..hw.slab import SlabAllocator
    page = page_bytes_for(full_bytes, l1_bytes)
    classes = (int4_bytes, full_bytes)
    l1 = SlabAllocator(AccountingMemory(l1_bytes, "device"), classes, page)
    l2 = SlabAllocator(AccountingMemory(max(l2_bytes, page), "pinned_host"), classes,
                       page_bytes_for(full_bytes, max(l2_bytes, page)))
    from ..hw.slab import round_up
    stage_page = round_up(page_bytes_for(int4_bytes, staging_blocks * int4_bytes), 256)
    staging = SlabAllocator(AccountingMemory(max(stage_page, staging_blocks * int4_bytes), "device"),
                            (int4_bytes,), stage_page)
    pol = make_policy(policy, heavy_ratio=heavy_ratio, sink_blocks=sink_blocks)
    return TierManager(PageTable(), Spaces(l1, l2, staging), pol,
                       Demotion.parse(DEMOTE_NAMES.get(demote, demote)),
                       Watermarks(high_watermark, low_watermark, eviction_ratio),
                       KVPrefetch(prefetch_blocks), {Fmt.FP16: full_bytes, Fmt.INT4: int4_bytes},
                       DecisionLog())


class BlockPlanner:
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
        tiers = self.mgr.table.tier[: len(self.mgr.table)]
        c = self.mgr.counters
        c.l1_hits += int((tiers == _L1).sum())
        c.l2_hits += int((tiers == _L2).sum())
        c.misses += int((tiers == _NONE).sum())

    # -- 2. admission -------------------------------------------------------------------
    def check_step(self, q: int) -> None:
        """CapacityError (before anything moves) when a step's new blocks cannot fit."""
        need = len(self.new_positions(q)) + (1 if self.tail is not None else 0)
        if need > self.capacity_blocks:
            raise CapacityError(
                f"a forward pass of {q} tokens needs {need} KV blocks of {self.bt} tokens in L1 "
                f"at once, but the L1 budget holds {self.capacity_blocks} blocks "
                f"({self.capacity_blocks * self.bt} tokens); raise l1_budget_tokens or feed the "
                f"prompt in chunks (generate(..., prefill_chunk_size={max(self.bt, (self.capacity_blocks - 1) * self.bt)}))")

    def admit(self, t: int, q: int):
        """Generator: yields lists of moves (forced evictions) that the caller must execute
        and commit before it continues; then inserts the step's new blocks."""
        mgr, table = self.mgr, self.mgr.table
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
            table.token_end[self.tail] = min((self.tail + 1) * self.bt, end)
        self.tokens = end
        last = (end - 1) // self.bt
        full = end - last * self.bt == self.bt
        if self.tail is not None and (self.tail != last or full):
            mgr.unpin(self.tail)  # full now, or no longer the last block
        self.tail = None if full else last
        if self.tail is not None:
            mgr.pin(self.tail)

    # -- 3. observation -----------------------------------------------------------------
    def observe(self, t: int, live: np.ndarray, mass: np.ndarray):
        """Feed the step's masses (float64 of float32 values, one per live block) to the
        policy; returns the background moves (demotions, then prefetches)."""
        mgr = self.mgr
        if len(live):
            used = live[mass >= self.access_factor / len(live)]
            mgr.policy.on_access(used, t)
            mgr.policy.on_attention(live, mass, t)
        protected = np.asarray([self.tail] if self.tail is not None else [], np.int64)
        demote, prefetch = mgr.plan_background(t, protected)
        return demote + prefetch
