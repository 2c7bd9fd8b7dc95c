"""``ops.merged_ranges``: the memsets a Zero op becomes clear exactly its regions' bytes."""

from hypothesis import given, settings, strategies as st

from synapse.ops import Region, merged_ranges


def _bytes(runs):
    return {(sp, b) for sp, o, n in runs for b in range(o, o + n)}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["l1", "l2"]), st.integers(0, 200),
                          st.integers(0, 40)), max_size=30))
def test_the_same_bytes_in_fewer_disjoint_runs(raw):
    regions = [Region(sp, o, n) for sp, o, n in raw]
    runs = merged_ranges(regions)
    assert _bytes(runs) == _bytes((r.space, r.offset, r.nbytes) for r in regions)
    for (sa, oa, na), (sb, ob, _) in zip(runs, runs[1:]):
        assert (sa, oa) < (sb, ob)
        assert sa != sb or oa + na < ob  # neither overlapping nor touching: one memset each
    assert len(runs) <= len([r for r in regions if r.nbytes > 0])


def test_the_tail_freed_block_by_block_is_one_memset():
    # compaction frees the last slot each time: [n-1, n), [n-2, n-1), ...
    regions = [Region("l1", 4096 * i, 4096) for i in range(63, 31, -1)]
    assert merged_ranges(regions) == [("l1", 32 * 4096, 32 * 4096)]
