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
