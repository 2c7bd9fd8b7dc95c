"""Conformance: each policy makes the decisions its definition makes, alone and through the
tier manager.

The references below are written from the definitions (LRU, FIFO and Belady's MIN from the
textbook; H2O from Zhang et al. 2023, arXiv:2306.14048, and the authors' reference code),
with plain Python containers and no Synapse code, and judged on generated traces: Zipf
popularity, loops larger than the cache, scans through a hot set. A trace is a list of
block numbers, one access per step; a cache of ``cap`` blocks starts empty.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque

import numpy as np
import pytest

from synapse.blocks import BlockSpec, Tier
from synapse.kv.shape import KVShape
from synapse.kv.stack import PolicySettings, build_stack
from synapse.sim.backend import SimBackend
from synapse.sim.profile import load_profile
from synapse.policy import FIFO, H2O, LRU, Belady

SHAPE = KVShape(layers=1, kv_heads=1, head_dim=64, block_tokens=16)  # only counts matter
BLOCK = SHAPE.fp16_bytes  # 4096 bytes


# -- traces ---------------------------------------------------------------------------
def zipf_trace(n_blocks: int, length: int, alpha: float, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_blocks + 1) ** alpha
    return rng.permutation(n_blocks)[rng.choice(n_blocks, length, p=p / p.sum())].tolist()


def loop_trace(n_blocks: int, rounds: int) -> list[int]:
    return list(range(n_blocks)) * rounds


def scan_trace(hot: int, scan: int, rounds: int, seed: int) -> list[int]:
    """A hot set read at random, interrupted by scans of blocks never seen again."""
    rng = np.random.default_rng(seed)
    out, fresh = [], hot
    for _ in range(rounds):
        out += rng.integers(0, hot, 3 * hot).tolist()
        out += list(range(fresh, fresh + scan))
        fresh += scan
    return out


TRACES = {
    "zipf-0.8": (zipf_trace(200, 3000, 0.8, 1), 20),
    "zipf-1.2": (zipf_trace(500, 3000, 1.2, 2), 32),
    "loop-50-over-10": (loop_trace(50, 30), 10),
    "loop-11-over-10": (loop_trace(11, 40), 10),
    "loop-inside": (loop_trace(8, 40), 10),
    "scan": (scan_trace(12, 40, 20, 3), 16),
    "uniform": (np.random.default_rng(4).integers(0, 40, 2000).tolist(), 15),
}


# -- textbook references --------------------------------------------------------------
def lru_reference(trace, cap):
    """Evict the block whose last use is oldest; a hit or a miss is a use."""
    cache, hits = OrderedDict(), 0
    for b in trace:
        if b in cache:
            hits += 1
            cache.move_to_end(b)
            continue
        if len(cache) == cap:
            cache.popitem(last=False)
        cache[b] = True
    return hits


def fifo_reference(trace, cap):
    """Evict the block that entered the cache first; a hit changes nothing."""
    queue, cache, hits = deque(), set(), 0
    for b in trace:
        if b in cache:
            hits += 1
            continue
        if len(cache) == cap:
            cache.discard(queue.popleft())
        queue.append(b)
        cache.add(b)
    return hits


def belady_reference(trace, cap):
    """Evict the cached block whose next use lies farthest ahead (never used: farthest)."""
    cache, hits = set(), 0
    for t, b in enumerate(trace):
        if b in cache:
            hits += 1
            continue
        if len(cache) == cap:
            def next_use(x):
                rest = trace[t + 1:]
                return rest.index(x) if x in rest else len(trace)
            cache.discard(max(cache, key=next_use))
        cache.add(b)
    return hits


REFERENCES = {"lru": (LRU, lru_reference), "fifo": (FIFO, fifo_reference),
              "belady": (Belady, belady_reference)}


def future_of(trace):
    """next_use(blocks, step) for Belady: the first step > step at which each is read."""
    times: dict[int, list[int]] = {}
    for t, b in enumerate(trace):
        times.setdefault(b, []).append(t)

    def next_use(blocks, step):
        out = []
        for b in np.asarray(blocks).tolist():
            ts = times.get(b, [])
            i = bisect.bisect_right(ts, step)
            out.append(ts[i] if i < len(ts) else 2**30)
        return np.asarray(out, np.int64)
    return next_use


# -- Synapse: the policy alone, and through the tier manager --------------------------
def policy_alone_hits(policy, trace, cap):
    """A cache of ``cap`` blocks that asks the policy for every victim. A block read again
    after its eviction comes back from the lower tier (``on_fetch``)."""
    policy.bind(cap)
    if policy.needs_future:
        policy.bind_future(future_of(trace))
    resident, seen, hits = set(), set(), 0
    for t, b in enumerate(trace):
        ids = np.array([b])
        if b in resident:
            hits += 1
            policy.on_access(ids, t)
            continue
        if len(resident) == cap:
            resident.discard(int(policy.victims(np.array(sorted(resident)), 1, t)[0]))
        if b in seen:
            policy.on_fetch(ids, t)
        else:
            policy.on_insert(ids, t, positions=ids)
            seen.add(b)
        resident.add(b)
    return hits


def manager_of(policy_name, l1_blocks, *, demote="l2", heavy_ratio=0.5, high=1.0, low=1.0,
               eviction_ratio=1.0):
    settings = PolicySettings(policy_name, demote, heavy_ratio, 0, high, low, eviction_ratio, 0)
    backend = SimBackend(load_profile("h100-sxm"))  # bookkeeping-only memory
    return build_stack(SHAPE, backend, l1_blocks * BLOCK, 1 << 24, settings).manager


def manager_hits(policy_name, trace, cap):
    """The same trace through the tier manager: L1 of ``cap`` blocks, victims demoted to
    L2, a block read from L2 fetched back (demand fetch), every move committed at once."""
    mgr = manager_of(policy_name, cap)
    assert mgr.l1_capacity == cap * BLOCK
    table = mgr.table
    id_of: dict[int, int] = {}
    if mgr.policy.needs_future:
        block_of = {}
        nxt = future_of(trace)
        mgr.policy.bind_future(lambda ids, step: nxt([block_of[int(i)] for i in ids], step))
    for t, b in enumerate(trace):
        i = id_of.get(b)
        if i is not None and table.tier[i] == int(Tier.L1):
            mgr.counters.l1_hits += 1
            mgr.policy.on_access(np.array([i]), t)
            continue
        while not mgr.fits([BLOCK]):
            mgr.commit(mgr.make_room([BLOCK], np.zeros(0, np.int64), t), t)
        if i is None:
            i = int(mgr.insert([BlockSpec(BLOCK, token_start=b, token_end=b + 1)], t,
                               np.array([b]))[0])
            id_of[b] = i
            if mgr.policy.needs_future:
                block_of[i] = b
        else:
            assert table.tier[i] == int(Tier.L2)
            moves = mgr.plan_fetch(np.array([i]), t)
            assert len(moves) == 1
            mgr.commit(moves, t)
        assert len(mgr.resident()) <= cap
    mgr.check()
    return mgr.counters.l1_hits


@pytest.mark.parametrize("trace", list(TRACES))
@pytest.mark.parametrize("policy", list(REFERENCES))
def test_hits_of_the_policy_alone_equal_the_textbook_definition(policy, trace):
    cls, reference = REFERENCES[policy]
    accesses, cap = TRACES[trace]
    assert policy_alone_hits(cls(), accesses, cap) == reference(accesses, cap)


@pytest.mark.parametrize("trace", list(TRACES))
@pytest.mark.parametrize("policy", list(REFERENCES))
def test_hits_through_the_tier_manager_equal_the_textbook_definition(policy, trace):
    _, reference = REFERENCES[policy]
    accesses, cap = TRACES[trace]
    assert manager_hits(policy, accesses, cap) == reference(accesses, cap)


def test_lru_on_a_loop_larger_than_the_cache_never_hits():
    """50 blocks read in a loop, room for 10: each block is evicted 40 reads before it is
    read again, so LRU (by definition) has no hit at all; Belady keeps 9 of every 10 hits
    it can."""
    accesses = loop_trace(50, 30)
    assert lru_reference(accesses, 10) == 0
    assert policy_alone_hits(LRU(), accesses, 10) == 0
    assert manager_hits("lru", accesses, 10) == 0
    assert manager_hits("belady", accesses, 10) == belady_reference(accesses, 10) > 0


def test_a_demand_fetch_is_a_use_and_a_prefetch_is_not():
    """LRU: a block fetched back because the step reads it is the most recently used; a
    prefetched block keeps the last use it had (it was chosen because that use is more
    recent than L1's weakest, so it is not the next victim either)."""
    p = LRU()
    ids = np.arange(4)
    p.on_insert(ids, 0, ids)
    p.on_access(np.array([1, 2, 3]), 5)
    p.on_fetch(np.array([0]), 9)
    assert p.victims(ids, 1, 10).tolist() == [1]
    p.on_prefetch(np.array([1]), 11)
    assert p.victims(ids, 1, 12).tolist() == [1]


# -- H2O --------------------------------------------------------------------------------
def split(budget, heavy_ratio):
    """H2O's budget split: heavy_ratio of it for heavy hitters, the rest for recent."""
    heavy = int(heavy_ratio * budget + 0.5)
    return heavy, budget - heavy


def h2o_keep(cache, acc, budget, heavy_ratio):
    """The paper's kept set: the ``recent`` newest positions, then the ``heavy`` highest
    accumulated attention among the others."""
    heavy, recent = split(budget, heavy_ratio)
    by_age = sorted(cache, reverse=True)
    window, rest = by_age[:recent], by_age[recent:]
    return set(window) | set(sorted(rest, key=lambda p: -acc[p])[:heavy])


def attention(cache, logit, t):
    """Softmax over the blocks in the cache at step t (the attention H2O accumulates)."""
    pos = sorted(cache)
    z = np.array([logit(p, t) for p in pos])
    w = np.exp(z - z.max())
    return dict(zip(pos, (w / w.sum()).tolist()))


def h2o_reference(steps, per_step, budget, heavy_ratio, logit):
    """Zhang et al.: each step's blocks join the cache, the step's attention over the cache
    is added to every block's score, then the cache is trimmed to the budget. Returns the
    cache after every step."""
    cache, acc, out = set(), {}, []
    for t in range(steps):
        new = range(t * per_step, (t + 1) * per_step)
        cache |= set(new)
        acc.update({p: 0.0 for p in new})
        for p, m in attention(cache, logit, t).items():
            acc[p] += m
        if len(cache) > budget:
            cache = h2o_keep(cache, acc, budget, heavy_ratio)
        out.append(set(cache))
    return out


def h2o_room_first_reference(steps, per_step, budget, heavy_ratio, logit):
    """The same rule when the cache can never hold more than the budget (the authors'
    ``evict_for_space``): room for the step's blocks is made before they arrive, with the
    recent window counted over the arriving blocks too and the scores known so far."""
    cache, acc, out = set(), {}, []
    for t in range(steps):
        new = list(range(t * per_step, (t + 1) * per_step))
        if len(cache) + len(new) > budget:
            heavy, recent = split(budget, heavy_ratio)
            old = sorted(cache, reverse=True)
            window = old[:max(0, recent - len(new))]
            rest = sorted(old[len(window):], key=lambda p: -acc[p])
            cache = set(window) | set(rest[:budget - len(new) - len(window)])
        cache |= set(new)
        acc.update({p: 0.0 for p in new})
        for p, m in attention(cache, logit, t).items():
            acc[p] += m
        out.append(set(cache))
    return out


def logits_of(seed, blocks, steps):
    """Heavy hitters drawn from a heavy-tailed key weight, plus per-step noise."""
    rng = np.random.default_rng(seed)
    key = rng.standard_normal(blocks) * 1.5
    noise = rng.standard_normal((steps, blocks)) * 0.5
    return lambda p, t: key[p] + noise[t, p]


def h2o_manager_run(steps, per_step, l1_blocks, heavy_ratio, logit, high, low):
    """H2O through the tier manager (dropped victims, as in the paper): each step inserts
    its blocks (forced room first if they do not fit), reports the attention over L1, and
    trims with the background round; returns L1's positions after every step."""
    mgr = manager_of("h2o", l1_blocks, demote="drop", heavy_ratio=heavy_ratio, high=high,
                     low=low)
    table, out = mgr.table, []
    for t in range(steps):
        new = np.arange(t * per_step, (t + 1) * per_step)
        sizes = [BLOCK] * len(new)
        while not mgr.fits(sizes):
            mgr.commit(mgr.make_room(sizes, np.zeros(0, np.int64), t, arriving=new), t)
        mgr.insert([BlockSpec(BLOCK, token_start=int(p), token_end=int(p) + 1) for p in new],
                   t, new)
        resident = mgr.resident()
        pos = table.token_start[resident]
        mass = attention(set(pos.tolist()), logit, t)
        mgr.policy.on_attention(resident, np.array([mass[p] for p in pos.tolist()]), t)
        demote, prefetch = mgr.plan_background(t, np.zeros(0, np.int64))
        assert not prefetch
        mgr.commit(demote, t)
        out.append(set(table.token_start[mgr.resident()].tolist()))
    mgr.check()
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("heavy_ratio", [0.25, 0.5, 0.75])
def test_h2o_scores_then_trims_to_the_papers_kept_set(seed, heavy_ratio):
    """With room in L1 for a step's blocks above the budget (the watermarks: budget 48
    blocks = low watermark 0.75 of 64), the manager path keeps the paper's set after every
    step, the step's new blocks scored first and victims when the rule says so."""
    steps, per_step, budget = 40, 16, 48
    logit = logits_of(seed, steps * per_step, steps)
    want = h2o_reference(steps, per_step, budget, heavy_ratio, logit)
    got = h2o_manager_run(steps, per_step, budget + per_step, heavy_ratio, logit,
                          high=0.75, low=0.75)
    for t, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"step {t}: manager kept {sorted(g ^ w)} differently"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_step", [1, 3, 8, 12])
def test_h2o_makes_room_first_as_the_authors_evict_for_space(seed, per_step):
    """With no room above the budget (L1 = budget, watermarks at 1.0), room is made before
    a step's blocks arrive: the recent window counts them, heavy hitters keep their share."""
    steps, budget = 64 // per_step + 6, 16
    logit = logits_of(seed, steps * per_step, steps)
    want = h2o_room_first_reference(steps, per_step, budget, 0.5, logit)
    got = h2o_manager_run(steps, per_step, budget, 0.5, logit, high=1.0, low=1.0)
    for t, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"step {t}: manager kept {sorted(g ^ w)} differently"


@pytest.mark.parametrize("per_step", [1, 3, 4])
def test_h2o_keeps_its_heavy_share_on_the_manager_path(per_step):
    """8 heavy + 8 recent of a 16-block budget, 64 blocks arriving a few per step: at the
    end L1 holds the 8 newest blocks and 8 older ones, as the policy alone would keep."""
    steps = 64 // per_step
    logit = logits_of(7, steps * per_step, steps)
    final = h2o_manager_run(steps, per_step, 16, 0.5, logit, high=1.0, low=1.0)[-1]
    newest = set(range(steps * per_step - 8, steps * per_step))
    assert len(final) == 16 and newest <= final


def test_h2o_split_follows_what_the_round_keeps():
    """heavy_ratio applies to what L1 keeps after an eviction round."""
    p = H2O(heavy_ratio=0.25)
    p.bind(capacity_blocks=40)
    assert (p.heavy_blocks, p.recent_blocks) == (10, 30)
    p.begin_round(keep_blocks=20)
    assert (p.heavy_blocks, p.recent_blocks) == (5, 15)
