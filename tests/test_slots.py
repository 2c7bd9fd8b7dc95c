"""The compacting slot arena (synapse.kv.slots): live blocks stay a prefix, and carrying
out the relocations it reports keeps every block's bytes, whatever the sequence of
allocations, frees and kept-last slots (hypothesis drives random sequences)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from synapse.errors import AllocatorError, CapacityError
from synapse.hw.memory import HostMemory
from synapse.kv.slots import SlotArena, zero_runs

SLOT = 16


class Bytes:
    """Carries out what the arena reports on a byte array, as the backends do."""

    def __init__(self, slots: int):
        self.mem = HostMemory(slots * SLOT, "host")
        self.arena = SlotArena(self.mem, SLOT)

    def sync(self):
        moves = self.arena.take_relocations()
        data = [self.mem.view(src, SLOT).copy() for _, src, _ in moves]  # gather first
        for (_, _, dst), d in zip(moves, data):
            self.mem.view(dst, SLOT)[:] = d
        for off, n in self.arena.take_zero([dst for _, _, dst in moves]):
            self.mem.view(off, n)[:] = 0

    def write(self, slot, stamp):
        self.mem.view(slot.offset, SLOT)[:] = stamp

    def read(self, slot):
        return self.mem.view(slot.offset, SLOT)


ops = st.lists(st.tuples(st.sampled_from(["alloc", "free", "tail", "untail"]),
                         st.integers(0, 5), st.integers(0, 1 << 16)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_relocations_keep_every_blocks_bytes_and_the_live_prefix(seq):
    b = Bytes(12)
    stamp = {}   # id(slot) -> the byte it was written with
    live = []
    tail = None
    for kind, k, r in seq:
        if kind == "alloc":
            got = b.arena.allocate_prefix([SLOT] * (k + 1), ["t"] * (k + 1))
            b.sync()
            for s in got:  # a new slot reads zeros before its owner writes it
                assert not b.read(s).any()
                stamp[id(s)] = (r + len(stamp)) % 251 + 1
                b.write(s, stamp[id(s)])
            live += got
        elif kind == "free" and live:
            rng = np.random.default_rng(r)
            pick = [live[i] for i in sorted(rng.choice(len(live), min(k + 1, len(live)), replace=False))]
            if tail is not None and tail in pick:
                tail = None
            b.arena.free_all(pick)
            b.sync()
            live = [s for s in live if s not in pick]
        elif kind == "tail" and live:
            tail = live[r % len(live)]
            b.arena.keep_last(tail)
            b.sync()
        elif kind == "untail":
            tail = None
            b.arena.keep_last(None)
        assert sorted(s.index for s in live) == list(range(len(live)))
        for s in live:
            assert (b.read(s) == stamp[id(s)]).all(), "a block's bytes were lost in compaction"
        if tail is not None:
            assert tail.index == len(live) - 1
        assert not b.mem.view(len(live) * SLOT, (12 - len(live)) * SLOT).any(), \
            "freed bytes past the live end were not zeroed"
        b.arena.audit()


def test_a_freed_hole_is_filled_by_the_last_slot_and_the_tail_stays_last():
    b = Bytes(8)
    a, c, d, tail = b.arena.allocate_prefix([SLOT] * 4, ["t"] * 4)
    b.sync()  # their bytes are written after this: no longer fresh
    b.arena.keep_last(tail)
    b.arena.free_all([a])
    moves = b.arena.take_relocations()
    assert [(m[1], m[2]) for m in moves] == [(3 * SLOT, 2 * SLOT), (2 * SLOT, 0)]
    assert [s.index for s in (d, c, tail)] == [0, 1, 2]
    new, = b.arena.allocate_prefix([SLOT], ["t"])
    assert new.index == 2 and tail.index == 3  # the new block goes before the tail


def test_the_arena_refuses_other_sizes_and_foreign_handles():
    b = Bytes(2)
    assert b.arena.allocate_prefix([SLOT + 1], ["t"]) == []
    s1, s2 = b.arena.allocate_prefix([SLOT] * 2, ["t"] * 2)
    with pytest.raises(CapacityError, match="arena full"):
        b.arena.allocate(SLOT, "t")
    other = Bytes(2)
    with pytest.raises(AllocatorError, match="foreign"):
        other.arena.free(s1)
    b.arena.free(s1)
    with pytest.raises(AllocatorError, match="not live"):
        b.arena.free(s1)


def _zero_runs_by_slot(ranges, keep, sb):
    """The definition ``zero_runs`` must meet: every covered slot, less the kept ones,
    merged into runs of adjacent slots."""
    idx = set()
    for off, n in ranges:
        idx.update(range(off // sb, (off + n) // sb))
    idx.difference_update(o // sb for o in keep)
    out = []
    for i in sorted(idx):
        if out and out[-1][0] + out[-1][1] == i * sb:
            out[-1] = (out[-1][0], out[-1][1] + sb)
        else:
            out.append((i * sb, sb))
    return out


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12)), max_size=8),
       st.lists(st.integers(0, 50), max_size=10))
def test_zero_runs_are_the_covered_slots_less_the_kept_ones(spans, kept):
    sb = 64
    ranges = [(a * sb, n * sb) for a, n in spans]
    keep = [k * sb for k in kept]
    assert zero_runs(ranges, keep, sb) == _zero_runs_by_slot(ranges, keep, sb)
