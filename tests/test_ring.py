"""The skip-end ring against brute force: for random layer sizes, capacities and
alignments, no slot crosses the end, slots are aligned and placed in streaming order,
``overlaps`` is exactly interval intersection (and symmetric), ``max_lookahead`` is the
longest clash-free cyclic window, and ``blockers`` returns exactly the latest reads of
the overlapping layers."""

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from synapse.errors import CapacityError
from synapse.hw.ring import SkipEndRing

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)


@st.composite
def rings(draw):
    sizes = draw(st.lists(st.integers(1, 5000), min_size=1, max_size=12))
    align = draw(st.sampled_from([1, 64, 256]))
    capacity = draw(st.integers(max(sizes), 4 * sum(sizes) + align))
    return capacity, sizes, align


def intersect(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def spans(ring):
    return [(ring.slot(i)[0], ring.slot(i)[0] + ring.slot(i)[1]) for i in range(ring.num_layers)]


@SETTINGS
@given(rings())
def test_placement_never_wraps_and_is_aligned(args):
    capacity, sizes, align = args
    ring = SkipEndRing(capacity, sizes, align)
    end = 0
    for i, (start, stop) in enumerate(spans(ring)):
        assert ring.slot(i) == (start, sizes[i])
        assert start % align == 0
        assert 0 <= start and stop <= capacity, "a tensor crosses the end of the ring"
        # streaming order: right after the previous layer (aligned), or back at 0 only
        # when that would cross the end
        nxt = -(-end // align) * align
        if i == 0 or nxt + sizes[i] > capacity:
            assert start == 0
        else:
            assert start == nxt
        end = stop


@SETTINGS
@given(rings())
def test_overlaps_are_exactly_interval_intersection(args):
    ring = SkipEndRing(*args)
    s = spans(ring)
    for i in range(ring.num_layers):
        want = tuple(j for j in range(ring.num_layers) if j == i or intersect(s[i], s[j]))
        assert ring.overlaps(i) == want
        for j in want:
            assert i in ring.overlaps(j), "overlaps is not symmetric"
    assert ring.resident_all == all(len(ring.overlaps(i)) == 1 for i in range(ring.num_layers))


@SETTINGS
@given(rings())
def test_max_lookahead_is_the_shortest_clash_free_cyclic_window(args):
    ring = SkipEndRing(*args)
    n, s = ring.num_layers, spans(ring)
    best = n - 1
    for start in range(n):
        window = [start]
        while len(window) < n:
            j = (window[-1] + 1) % n
            if any(intersect(s[j], s[w]) for w in window):
                break
            window.append(j)
        best = min(best, len(window) - 1)
    assert ring.max_lookahead() == best
    if ring.resident_all:
        assert best == n - 1


@SETTINGS
@given(rings(), st.lists(st.tuples(st.integers(0, 11), st.integers()), max_size=30))
def test_blockers_are_the_latest_reads_of_overlapping_layers(args, reads):
    ring = SkipEndRing(*args)
    n = ring.num_layers
    last = {}
    for i, token in reads:
        i %= n
        ring.mark_read(i, token)
        last[i] = token
        for k in range(n):
            assert ring.blockers(k) == [last[j] for j in ring.overlaps(k) if j in last]
    ring.clear_tokens()
    assert all(ring.blockers(k) == [] for k in range(n))


@SETTINGS
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=8), st.data())
def test_a_ring_smaller_than_the_largest_layer_names_the_numbers(sizes, data):
    largest = max(sizes)
    assume(largest > 1)
    capacity = data.draw(st.integers(1, largest - 1))
    with pytest.raises(CapacityError) as e:
        SkipEndRing(capacity, sizes)
    msg = str(e.value)
    assert f"ring of {capacity} bytes" in msg
    assert f"largest layer of {largest} bytes (layer {sizes.index(largest)})" in msg


def test_a_ring_that_holds_everything_keeps_every_layer_resident():
    ring = SkipEndRing(10_000, [1000, 1000, 1000], alignment_bytes=256)
    assert [ring.slot(i)[0] for i in range(3)] == [0, 1024, 2048]
    assert ring.resident_all and ring.max_lookahead() == 2


def test_two_slots_alternate_when_only_two_layers_fit():
    ring = SkipEndRing(2048, [1024] * 4, alignment_bytes=256)
    assert [ring.slot(i)[0] for i in range(4)] == [0, 1024, 0, 1024]
    assert ring.overlaps(0) == (0, 2) and ring.overlaps(1) == (1, 3)
    assert ring.max_lookahead() == 1
    ring.mark_read(0, "read0")
    assert ring.blockers(2) == ["read0"] and ring.blockers(1) == []


@pytest.mark.parametrize("capacity,sizes,align,match", [
    (100, [], 1, "at least one layer, got none"),
    (100, [10, 0, -3], 1, r"layer sizes must be positive; \(layer, bytes\) \[\(1, 0\), \(2, -3\)\]"),
    (100, [10], 0, "alignment_bytes must be positive, got 0"),
])
def test_bad_rings_are_refused_with_the_values(capacity, sizes, align, match):
    with pytest.raises(CapacityError, match=match):
        SkipEndRing(capacity, sizes, align)


@pytest.mark.parametrize("i", [-1, 3])
def test_a_layer_out_of_range_is_named(i):
    ring = SkipEndRing(4096, [1000] * 3)
    for call in (ring.slot, ring.overlaps, ring.blockers, lambda k: ring.mark_read(k, None)):
        with pytest.raises(IndexError, match=f"layer {i} out of range for a ring of 3 layers"):
            call(i)
