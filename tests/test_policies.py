"""Each eviction policy ranks blocks the way its paper says, with no backend in sight."""

import subprocess
import sys

import numpy as np
import pytest

from synapse.errors import ScenarioError
from synapse.policy import H2O, LRU, FIFO, AttentionSinks, Belady, make_policy
from synapse.policy.base import EvictionPolicy


def test_policy_layer_imports_neither_simpy_nor_pycuda():
    code = ("import sys, synapse.policy, synapse.manager, synapse.page_table; "
            "bad = [m for m in ('simpy', 'pycuda', 'torch') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_lru_evicts_least_recently_used():
    p = LRU()
    ids = np.arange(6)
    p.on_insert(ids, step=0, positions=ids)
    p.on_access(np.array([0, 1, 2]), step=5)
    p.on_access(np.array([4]), step=7)
    assert p.victims(ids, 2, step=8).tolist() == [3, 5]


def test_fifo_evicts_first_arrived_even_if_used():
    p = FIFO()
    p.on_insert(np.array([0, 1]), 0, np.array([0, 1]))
    p.on_insert(np.array([2]), 1, np.array([2]))
    p.on_access(np.array([0]), 2)
    assert p.victims(np.arange(3), 1, 3).tolist() == [0]


def test_h2o_keeps_heavy_hitters_and_protects_the_recent_window():
    p = H2O(heavy_ratio=0.5)
    p.bind(capacity_blocks=4)  # recent window = 2 blocks
    ids = np.arange(6)
    p.on_insert(ids, 0, positions=ids)
    p.on_attention(np.array([0, 1, 2, 3]), np.array([0.5, 0.05, 0.4, 0.05]), 1)
    # 4 and 5 are the newest (protected, no attention yet); 1 and 3 are the weakest.
    assert p.victims(ids, 2, 2).tolist() == [1, 3]
    # With a window covering everything, H2O still evicts the oldest first.
    assert p.victims(np.array([4, 5]), 1, 2).tolist() == [4]


def test_sinks_keep_the_first_blocks_and_a_sliding_window():
    p = AttentionSinks(sink_blocks=1)
    ids = np.arange(8)
    p.on_insert(ids, 0, ids)
    assert p.victims(ids, 3, 1).tolist() == [1, 2, 3]


def test_belady_evicts_the_farthest_next_use():
    p = Belady()
    nxt = {0: 10, 1: 3, 2: 2**30, 3: 7}
    p.bind_future(lambda ids, step: np.array([nxt[int(i)] for i in ids]))
    p.on_insert(np.arange(4), 0, np.arange(4))
    assert p.victims(np.arange(4), 2, 1).tolist() == [0, 2]


def test_belady_without_a_future_says_which_workloads_have_one():
    p = Belady()
    p.on_insert(np.arange(3), 0, np.arange(3))
    with pytest.raises(ScenarioError, match="needle or a replayed trace"):
        p.victims(np.arange(3), 1, 1)


@pytest.mark.parametrize("seed", range(5))
def test_victims_match_a_full_sort(seed):
    """argpartition picks exactly the n lowest scores (the O(n) path is not approximate)."""
    rng = np.random.default_rng(seed)

    class Scored(EvictionPolicy):
        def scores(self, ids, step):
            return s[ids]

    s = rng.permutation(1000).astype(float)
    p = Scored()
    cand = rng.choice(1000, 300, replace=False)
    got = p.victims(cand, 37, 0)
    want = np.sort(cand[np.argsort(s[cand])[:37]])
    assert got.tolist() == want.tolist()


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(ScenarioError, match="lru, fifo, h2o, sinks, belady"):
        make_policy("arc")


def _tie(primary, pos):
    return primary.astype(np.float64) * float(2**24) + pos


@pytest.mark.parametrize("seed", [0, 1])
def test_kept_score_columns_equal_the_formulas(seed):
    """LRU, FIFO and sinks keep each block's score in a column set by their hooks: the
    same float64 values as the formula over the state at the time of the call."""
    rng = np.random.default_rng(seed)
    lru, fifo, sinks = LRU(), FIFO(), AttentionSinks(sink_blocks=2)
    pos = rng.permutation(300)
    last = np.zeros(300, np.int64)
    arrival = np.zeros(300, np.int64)
    n_arrived = 0
    for step, lo in enumerate(range(0, 300, 50)):
        ids = np.arange(lo, lo + 50)
        for p in (lru, fifo, sinks):
            p.on_insert(ids, step, pos[ids])
        last[ids] = step
        arrival[ids] = np.arange(n_arrived, n_arrived + 50)
        n_arrived += 50
        used = rng.choice(lo + 50, 20, replace=False)
        lru.on_access(used, step)
        last[used] = step
        fetched = rng.choice(lo + 50, 5, replace=False)
        for p in (lru, fifo):
            p.on_fetch(fetched, step)
        last[fetched] = step
        arrival[fetched] = np.arange(n_arrived, n_arrived + 5)
        n_arrived += 5
        seen = np.arange(lo + 50)
        np.testing.assert_array_equal(lru.scores(seen, step), _tie(last[seen], pos[seen]))
        np.testing.assert_array_equal(fifo.scores(seen, step), arrival[seen].astype(np.float64))
        want = pos[seen].astype(np.float64)
        want[pos[seen] < 2] += 2.0**62
        np.testing.assert_array_equal(sinks.scores(seen, step), want)


def test_belady_kept_scores_equal_the_recomputed_ones():
    """With ``used_between`` Belady updates only the blocks used since its last call
    (and new ones); its scores are the ones computed from every block's next use."""
    rng = np.random.default_rng(3)
    steps, blocks = 40, 80
    used = rng.random((steps, blocks)) < 0.1

    def next_use(ids, step):
        later = used[step + 1:, ids]
        first = later.argmax(axis=0) + step + 1
        return np.where(later.any(axis=0), first, 2**30)

    def used_between(a, t):
        return np.flatnonzero(used[a + 1:t + 1].any(axis=0))

    kept, plain = Belady(), Belady()
    kept.bind_future(next_use, used_between)
    plain.bind_future(next_use)
    for t in range(steps - 1):
        if t % 4 == 0:  # blocks arrive in batches, as a prompt's chunks do
            ids = np.arange(t * 2, t * 2 + 8)  # (t // 4) * 8 onwards
            kept.on_insert(ids, t, ids)
            plain.on_insert(ids, t, ids)
        have = np.arange(min(blocks, (t // 4) * 8 + 8))
        for step in ([t, t] if t % 3 else [t]):  # twice at a step: nothing to update
            np.testing.assert_array_equal(kept.scores(have, step), plain.scores(have, step))
    # back in time: every block's score is recomputed
    np.testing.assert_array_equal(kept.scores(have, 5), plain.scores(have, 5))


@pytest.mark.parametrize("name", ["lru", "fifo", "h2o", "sinks", "belady"])
def test_scores_are_the_callers_to_change(name):
    """The manager negates the scores it ranks in place: a policy hands out a new array
    each call, so changing it changes no later score."""
    p = make_policy(name)
    if p.needs_future:
        p.bind_future(lambda ids, step: np.asarray(ids, np.int64) + 10 - step, None)
    ids = np.arange(40, dtype=np.int64)
    p.bind(20)
    p.on_insert(ids, 0, ids)
    p.on_access(ids[::3], 1)
    if p.needs_attention:
        p.on_attention(ids, np.linspace(0.0, 1.0, 40) / 20.0, 1)
    first = p.scores(ids, 2)
    kept = first.copy()
    np.negative(first, out=first)
    np.testing.assert_array_equal(p.scores(ids, 2), kept)
