"""The batch paths of the allocators and the needle ground truth (the simulator's speed
work) give what the one-at-a-time paths give: the same handles, the same bookkeeping, the
same answers, and the same errors for bad handles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from synapse.errors import AllocatorError
from synapse.hw.memory import HostMemory
from synapse.hw.slab import SlabAllocator
from synapse.kv.slots import SlotArena
from synapse.scenarios.loader import load_scenario
from synapse.workloads.needle import NeedleTrace

PAGE = 4096  # one object of 4096 bytes per page: the batch path's case
CLASSES = (1024, 4096)


class QueuedZeroMemory(HostMemory):
    """Host memory that takes its zeroing as a batch of ranges, as the simulator's does."""

    def __init__(self, nbytes):
        super().__init__(nbytes)
        self.queued = []

    def zero_ranges(self, ranges):
        self.queued += ranges
        for offset, nbytes in ranges:
            self.zero(offset, nbytes)


def plain(slabs):
    return [s._replace(allocator_id=0) for s in slabs]  # twins differ only in their id


def state(alloc):
    s = alloc.stats()
    return (s, sorted(plain(alloc.live_slabs())), list(alloc._free_pages),
            [(p.class_index, p.num_live, p.num_carved, list(p.free_objects), p.partial_pos)
             if hasattr(p, "class_index") else "page of one object" for p in alloc._pages])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 6), st.lists(st.sampled_from("ab"), max_size=5),
                          st.integers(0, 6)), min_size=1, max_size=12))
def test_a_batch_of_one_object_pages_allocates_and_frees_as_one_at_a_time(rounds):
    batch, single = (SlabAllocator(QueuedZeroMemory(8 * PAGE), CLASSES, PAGE) for _ in "ab")
    single._allocate_whole_pages = lambda sizes, tenants: None  # the general loop only
    single._free_whole_pages = lambda slabs: False
    held_b, held_s = [], []
    for n_small, tenants, n_free in rounds:
        # a few objects of a smaller class share pages, so some pages are partial
        for alloc, held in ((batch, held_b), (single, held_s)):
            held += alloc.allocate_prefix([1024] * n_small, ["a"] * n_small)
        got_b = batch.allocate_prefix([4096] * len(tenants), tenants)
        got_s = []
        for t in tenants:  # what allocate_prefix must match: one at a time, while it fits
            one = single.allocate_prefix([4096], [t])
            if not one:
                break
            got_s += one
        assert plain(got_b) == plain(got_s)
        held_b += got_b
        held_s += got_s
        k = min(n_free, len(held_b))
        batch.free_all(held_b[-k:] if k else [])
        for s in held_s[len(held_s) - k:]:
            single.free_all([s])
        del held_b[len(held_b) - k:], held_s[len(held_s) - k:]
        assert state(batch) == state(single)
        assert batch.memory.queued == single.memory.queued
        batch.audit()


def test_a_batch_of_one_object_pages_takes_the_batch_path():
    alloc = SlabAllocator(QueuedZeroMemory(4 * PAGE), CLASSES, PAGE)
    alloc.allocate_prefix([4096], ["a"])  # the first of a size goes through the loop
    got = alloc._allocate_whole_pages([4096] * 2, ["a", "b"])
    assert got is not None and len(got) == 2
    assert alloc._free_whole_pages(got)
    alloc.audit()


def test_a_batch_with_a_stale_handle_frees_in_order_up_to_it():
    alloc = SlabAllocator(QueuedZeroMemory(4 * PAGE), CLASSES, PAGE)
    a, b, c = alloc.allocate_prefix([4096] * 3, ["a"] * 3)
    alloc.free_all([a])
    with pytest.raises(AllocatorError, match="not live"):
        alloc.free_all([b, a])  # as documented: b is freed, then a raises
    assert not alloc.is_live(b) and alloc.is_live(c)
    with pytest.raises(AllocatorError, match="not live"):
        alloc.free_all([c, c])
    alloc.audit()


@pytest.mark.parametrize("alloc", [
    SlabAllocator(QueuedZeroMemory(4 * PAGE), CLASSES, PAGE),
    SlotArena(HostMemory(4 * PAGE), PAGE)], ids=["slab", "slot"])
def test_all_accessible_answers_as_check_access_would(alloc):
    h = alloc.allocate_prefix([4096] * 3, ["a", "a", "b"])
    assert alloc.all_accessible(["a", "a", "b"], h)
    assert not alloc.all_accessible(["a", "a", "a"], h)  # another tenant's handle
    assert alloc.all_accessible(["a"], h)                 # pairs, as zip makes them
    alloc.free_all([h[2]])
    assert not alloc.all_accessible(["a", "a", "b"], h)   # a freed handle
    assert not alloc.all_accessible(["a"], [object()])    # not a handle at all
    assert alloc.num_denied == 0                          # asking counts nothing


def test_the_slot_arena_frees_a_batch_as_one_at_a_time():
    batch, single = SlotArena(HostMemory(8 * PAGE), PAGE), SlotArena(HostMemory(8 * PAGE), PAGE)
    hb = batch.allocate_prefix([PAGE] * 6, list("aabbab"))
    hs = single.allocate_prefix([PAGE] * 6, list("aabbab"))
    batch.free_all([hb[1], hb[4]])
    single.free_all([hs[1], hs[4]])
    assert [(s.index, s.offset, s.tenant) for s in batch.slots] == \
        [(s.index, s.offset, s.tenant) for s in single.slots]
    assert batch.stats() == single.stats()
    assert [(s.index, a, b) for s, a, b in batch.take_relocations()] == \
        [(s.index, a, b) for s, a, b in single.take_relocations()]
    with pytest.raises(AllocatorError):
        batch.free_all([hb[0], hb[1]])  # hb[1] was freed: nothing changes
    assert batch.stats() == single.stats()


def test_the_needle_ground_truth_is_the_whole_matrix_computed_at_once():
    sc = load_scenario("scenarios/needle.yaml", ["workload.context_tokens=8192",
                                                 "workload.decode_steps=200",
                                                 "workload.prefill_chunk_tokens=512"])
    tr = NeedleTrace(sc.workload, sc.memory.block_tokens, sc.seed)
    assert tr.num_steps > NeedleTrace._ROWS  # more than one pass
    live = -(-tr._tokens // tr.bt)
    z = tr.queries.astype(np.float32) @ tr.keys.T.astype(np.float32)
    for t in range(tr.num_steps):
        z[t, live[t]:] = -np.inf
    z[np.arange(tr.num_steps), live - 1] += np.log(
        (tr._tokens - (live - 1) * tr.bt) / tr.bt).astype(np.float32)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    whole = z >= (sc.workload.access_factor / live)[:, None].astype(np.float32)
    assert np.array_equal(tr.needed_matrix(), whole)
    for t in (0, NeedleTrace._ROWS, tr.num_steps - 1):
        assert np.array_equal(tr.needed(t), np.flatnonzero(whole[t]))


def test_needle_next_use_is_the_first_later_step_that_reads_the_block():
    """Belady's oracle, kept as a row moved on from step to step: the same answer as a
    scan of the ground truth, going forward, back in time and skipping steps."""
    sc = load_scenario("scenarios/needle.yaml", ["workload.context_tokens=4096",
                                                 "workload.decode_steps=80",
                                                 "workload.prefill_chunk_tokens=512"])
    tr = NeedleTrace(sc.workload, sc.memory.block_tokens, sc.seed)
    used = tr.needed_matrix()
    blocks = np.arange(tr.num_blocks)

    def scan(t):
        later = np.vstack([used[t + 1:], np.zeros((1, tr.num_blocks), bool)])  # never
        first = later.argmax(axis=0) + t + 1
        return np.where(later.any(axis=0), first, 2**30)

    order = list(range(tr.num_steps)) + [3, 3, 40, 2, tr.num_steps - 1, 0]
    for t in order:
        assert np.array_equal(tr.next_use(blocks, t), scan(t)), t
    assert np.array_equal(tr.next_use(blocks[::7], 10), scan(10)[::7])
