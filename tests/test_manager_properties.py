"""Property tests: random sequences of allocate / access / evict / prefetch / free keep
the tier manager's invariants (every live block in exactly one tier, byte counts and
allocators agree, no slab shared, in-flight moves never double-booked)."""

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from synapse.blocks import BlockSpec, Fmt, State, Tier
from synapse.errors import CapacityError
from synapse.hw.memory import HostMemory
from synapse.hw.slab import SlabAllocator
from synapse.manager import Spaces, TierManager
from synapse.page_table import PageTable
from synapse.policy import Demotion, KVPrefetch, Watermarks, make_policy

FP16, INT4 = 4096, 1280


class TierMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.step = 0
        self.pending = []
        self.owned = set()
        self.table = PageTable()
        l1 = SlabAllocator(HostMemory(16 * FP16), (INT4, FP16), FP16)
        l2 = SlabAllocator(HostMemory(64 * FP16), (INT4, FP16), FP16)
        stg = SlabAllocator(HostMemory(4 * FP16), (INT4,), FP16)
        self.mgr = TierManager(self.table, Spaces(l1, l2, stg), make_policy("lru"),
                               Demotion.L2_INT4, Watermarks(0.9, 0.6, 0.5), KVPrefetch(3),
                               {Fmt.FP16: FP16, Fmt.INT4: INT4})

    @rule(n=st.integers(1, 4))
    def insert(self, n):
        self.step += 1
        sizes = [FP16] * n
        protected = np.zeros(0, np.int64)
        try:
            while not self.mgr.fits(sizes):
                moves = self.mgr.make_room(sizes, protected, self.step)
                self.mgr.commit(moves, self.step)
        except CapacityError:
            return
        ids = self.mgr.insert([BlockSpec(FP16)] * n, self.step, np.arange(n) + self.step * 10)
        self.owned.update(ids.tolist())

    @rule(data=st.data())
    def access(self, data):
        self.step += 1
        live = self.table.live_ids()
        if not len(live):
            return
        ids = np.asarray(data.draw(st.lists(st.sampled_from(live.tolist()), max_size=4, unique=True)),
                         np.int64)
        l1 = ids[self.table.tier[ids] == Tier.L1]
        self.mgr.policy.on_access(l1, self.step)
        l2 = ids[self.table.tier[ids] == Tier.L2]
        self.pending += self.mgr.plan_fetch(l2, self.step)

    @rule()
    def background(self):
        self.step += 1
        demote, prefetch = self.mgr.plan_background(self.step, np.zeros(0, np.int64))
        self.pending += demote + prefetch

    @precondition(lambda self: self.pending)
    @rule(ok=st.booleans())
    def complete(self, ok):
        moves, self.pending = self.pending, []
        if ok:
            self.mgr.commit(moves, self.step)
        else:
            self.mgr.abort(moves)  # a failed op: every block stays where it was

    @precondition(lambda self: not self.pending)
    @rule(data=st.data())
    def free(self, data):
        live = self.table.live_ids()
        if not len(live):
            return
        b = data.draw(st.sampled_from(live.tolist()))
        self.mgr.release(np.array([b]))
        self.owned.discard(b)

    @invariant()
    def consistent(self):
        self.mgr.check()
        t = self.table
        # Every block we still own is live (demoted or not): nothing vanished.
        assert all(t.state[b] == State.LIVE for b in self.owned)
        # Committed bytes never exceed what the allocators hold (moves keep both ends).
        assert t.bytes_in(Tier.L1) <= self.mgr.spaces.l1.stats().used_bytes
        assert t.bytes_in(Tier.L2) <= self.mgr.spaces.l2.stats().used_bytes
        # No two live blocks share a slab.
        offs = {}
        for b in t.live_ids().tolist():
            key = (int(t.tier[b]), t.handle[b].offset)
            assert key not in offs, f"blocks {offs.get(key)} and {b} share a slab"
            offs[key] = b
        if not self.pending:
            for tier, space in ((Tier.L1, self.mgr.spaces.l1), (Tier.L2, self.mgr.spaces.l2)):
                assert t.bytes_in(tier) == space.stats().requested_bytes


TierMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestTierManager = TierMachine.TestCase
