"""The manager's batches of moves and its ranking shortcut read like what they replace."""

import numpy as np
import pytest

from synapse.blocks import Fmt, Tier
from synapse.manager import _k_smallest
from synapse.moves import Move, MoveBatch


def test_a_batch_of_moves_is_the_sequence_of_its_rows():
    ids = np.array([4, 7], np.int64)
    batch = MoveBatch("fetch", Tier.L2, Tier.L1, ids, [4, 7], [Fmt.FP16] * 2, [Fmt.FP16] * 2,
                      ["s4", "s7"], ["d4", "d7"], 4096, None)
    rows = [Move(4, "fetch", Tier.L2, Tier.L1, Fmt.FP16, Fmt.FP16, "s4", "d4", None),
            Move(7, "fetch", Tier.L2, Tier.L1, Fmt.FP16, Fmt.FP16, "s7", "d7", None)]
    assert len(batch) == 2 and batch == rows and list(batch) == rows and batch[1] == rows[1]
    assert batch + [] is batch and [] + batch is batch  # demote + prefetch, one side empty
    assert batch + rows[:1] == rows + rows[:1] and rows[:1] + batch == rows[:1] + rows
    assert not ids.flags.writeable  # the busy marks, the page table and the hooks share it


def _reference(neg, k):
    idx = neg.argpartition(k - 1)[:k]
    return idx[neg[idx].argsort(kind="stable")]


@pytest.mark.parametrize("kind", ["random", "descending", "many ties", "nan", "signed zeros"])
def test_the_k_smallest_are_what_a_partition_then_a_stable_sort_gives(kind):
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(2, 9000))
        k = int(rng.integers(1, min(n, 12)))
        neg = {"random": lambda: rng.random(n),
               "descending": lambda: -np.arange(n, dtype=float),
               "many ties": lambda: rng.integers(0, 40, n).astype(float),
               "nan": lambda: np.where(rng.random(n) < 0.01, np.nan, rng.random(n)),
               "signed zeros": lambda: np.where(rng.random(n) < 0.05, -0.0,
                                                np.where(rng.random(n) < 0.05, 0.0,
                                                         rng.random(n)))}[kind]()
        assert np.array_equal(_k_smallest(neg.copy(), k), _reference(neg.copy(), k))
