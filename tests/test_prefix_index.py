"""The prefix index: LRU per tier, capacity limits, watermarks and the moves they imply."""

from hypothesis import given, settings
from hypothesis import strategies as st

from synapse.prefix.index import Move, PrefixIndex, TierSpec

C = 100  # bytes per chunk in these tests


def key(i: int) -> bytes:
    return i.to_bytes(4, "little")


def three_tiers(l1=3, l2=5, l3=8, high=1.0, low=1.0, write_through=False):
    return PrefixIndex([TierSpec("l1", l1 * C, high, low), TierSpec("l2", l2 * C, high, low),
                        TierSpec("l3", l3 * C, high, low)], write_through)


def test_a_full_l1_demotes_its_least_recently_used_chunk_to_l2():
    ix = three_tiers()
    for i in range(3):
        ix.store(key(i), C)
    ix.touch(key(0), 0)                      # 1 is now the oldest
    moves = ix.store(key(3), C)
    assert moves == [Move("copy", key(1), 0, 1, C), Move("free", key(1), 0, -1, C),
                     Move("store", key(3), -1, 0, C)]
    assert ix.lookup([key(i) for i in range(4)]) == [0, 1, 0, 0]
    assert ix.tiers[0].counters.evictions == 1 and ix.tiers[0].counters.demotions == 1


def test_demotion_cascades_down_to_the_disk_and_the_last_tier_drops():
    ix = three_tiers(l1=1, l2=1, l3=1)
    for i in range(4):
        ix.store(key(i), C)
    assert ix.lookup([key(i) for i in range(4)]) == [-1, 2, 1, 0]
    assert ix.tiers[2].counters.drops == 1
    assert [t.used_bytes for t in ix.tiers] == [C, C, C]


def test_write_through_copies_a_new_chunk_to_every_tier_and_eviction_just_frees():
    ix = three_tiers(l1=1, write_through=True)
    assert ix.store(key(0), C) == [Move("store", key(0), -1, 0, C),
                                   Move("copy", key(0), 0, 1, C), Move("copy", key(0), 1, 2, C)]
    moves = ix.store(key(1), C)
    assert moves[0] == Move("free", key(0), 0, -1, C)   # L2 and L3 still have it
    assert ix.tiers[0].counters.demotions == 0 and ix.tiers[0].counters.drops == 0


def test_watermarks_bring_a_tier_above_high_down_to_low():
    ix = PrefixIndex([TierSpec("l1", 10 * C, 0.8, 0.5), TierSpec("l2", 20 * C, 1.0, 1.0)])
    for i in range(8):
        ix.store(key(i), C)
    assert ix.trim() == []                   # at 80%: not above the high mark
    ix.store(key(8), C)
    moves = ix.trim()
    assert ix.tiers[0].used_bytes == 5 * C   # down to the low mark, oldest first
    assert [m.key for m in moves if m.op == "free"] == [key(i) for i in range(4)]
    assert ix.lookup([key(0), key(8)]) == [1, 0]


def test_protected_chunks_are_never_victims_and_a_chunk_goes_where_there_is_room():
    ix = three_tiers(l1=2)
    ix.store(key(0), C)
    ix.store(key(1), C)
    moves = ix.store(key(2), C, protected={key(0), key(1)})
    assert moves == [Move("store", key(2), -1, 1, C)]   # L1 is all protected: straight to L2
    assert ix.lookup([key(0), key(1), key(2)]) == [0, 0, 1]


def test_a_chunk_larger_than_a_tier_skips_it():
    ix = PrefixIndex([TierSpec("l1", C), TierSpec("l2", 10 * C)])
    assert ix.store(key(0), 2 * C) == [Move("store", key(0), -1, 1, 2 * C)]


def test_promote_copies_a_disk_hit_into_every_faster_tier():
    ix = three_tiers(l1=1, l2=1)
    for i in range(3):
        ix.store(key(i), C)                  # 0 ends on L3, 1 on L2, 2 on L1
    moves = ix.promote(key(0), 2, 0)
    assert Move("copy", key(0), 2, 1, C) in moves and Move("copy", key(0), 1, 0, C) in moves
    assert ix.lookup([key(0)]) == [0]
    assert ix.holds(key(0), 1) and ix.holds(key(0), 2)


def test_lookup_and_leading_hits():
    ix = three_tiers(l1=1, l2=1, l3=1)
    for i in range(3):
        ix.store(key(i), C)
    found = ix.lookup([key(0), key(1), key(9), key(2)])
    assert found == [2, 1, -1, 0]
    assert PrefixIndex.leading(found) == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["store", "promote", "trim"]), st.integers(0, 15),
                          st.integers(1, 3)), max_size=60),
       st.booleans())
def test_any_sequence_keeps_every_tier_within_capacity_and_its_byte_count_exact(ops, wt):
    ix = PrefixIndex([TierSpec("l1", 4 * C, 0.9, 0.5), TierSpec("l2", 6 * C, 0.9, 0.6),
                      TierSpec("l3", 9 * C, 1.0, 0.8)], write_through=wt)
    held: dict[int, set] = {}                # what the moves say each tier holds
    for op, k, size in ops:
        if op == "store":
            moves = ix.store(key(k), size * C)
        elif op == "promote":
            found = ix.lookup([key(k)])[0]
            moves = ix.promote(key(k), found, 0) if found > 0 else []
        else:
            moves = ix.trim()
        for m in moves:
            if m.op == "free":
                assert m.key in held[m.src]
                held[m.src].discard(m.key)
            else:
                if m.op == "copy":
                    assert m.key in held.get(m.src, set()), "a copy from a tier without it"
                held.setdefault(m.dst, set()).add(m.key)
        for t, tier in enumerate(ix.tiers):
            assert tier.used_bytes == sum(tier.lru.values()) <= tier.spec.capacity_bytes
            assert set(tier.lru) == held.get(t, set())


def test_storing_a_recomputed_chunk_that_a_lower_tier_holds_places_it_in_l1_only():
    ix = three_tiers(l1=1, l2=2, write_through=True)
    ix.store(key(0), C)
    ix.store(key(1), C)                      # 0 leaves L1, keeps its L2 and L3 copies
    moves = ix.store(key(0), C)
    assert [m for m in moves if m.key == key(0)] == [Move("store", key(0), -1, 0, C)]
    assert ix.lookup([key(0)]) == [0] and ix.holds(key(0), 1) and ix.holds(key(0), 2)
