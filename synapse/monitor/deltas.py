"""Publish cumulative counters that something else keeps as deltas to /metrics.

The manager, a ``TieredCache`` and a scenario driver keep running totals (hits,
evictions, bytes). Once per step a probe hands their current values to
``CounterDeltas.publish``, which increments each bound counter by what changed since the
last call: a fixed number of integer subtractions and ``inc`` calls per step, whatever the
size of the cache. A value that went down means its owner was reset (``cache.reset()``,
a new run); counting restarts from it, so a counter never goes backwards.
"""

from __future__ import annotations

from .metrics import METRICS

# field of a manager's Counters -> the counter child it feeds
MANAGER_FIELDS = {
    "l1_hits": METRICS.l1_hits, "l2_hits": METRICS.l2_hits, "misses": METRICS.misses,
    "evictions": METRICS.evictions, "demotions": METRICS.demotions, "drops": METRICS.drops,
    "refusals": METRICS.refusals, "fetches": METRICS.fetches,
    "prefetches": METRICS.prefetches,
}
# slab allocator fields of the L2 pool, and denied accesses of every space
POOL_FIELDS = {"num_allocs": METRICS.pool_allocs, "num_frees": METRICS.pool_frees}


class CounterDeltas:
    def __init__(self, targets: dict) -> None:
        self.targets = targets
        self.last = dict.fromkeys(targets, 0)

    def publish(self, values) -> None:
        """``values``: anything with the targets' names as attributes (or a dict)."""
        get = values.get if isinstance(values, dict) else values.__getattribute__
        last = self.last
        for name, child in self.targets.items():
            now = get(name)
            d = now - last[name]
            if d > 0:
                child.inc(d)
            last[name] = now  # d < 0: the owner was reset; count from its new value


class SpaceDeltas:
    """Pinned-pool operations and denied accesses of a manager's allocators."""

    def __init__(self) -> None:
        self.pool = CounterDeltas(POOL_FIELDS)
        self.denied = CounterDeltas({"denied": METRICS.denied})

    def publish(self, spaces) -> None:
        self.pool.publish(spaces.l2)
        denied = sum(s.num_denied for s in (spaces.l1, spaces.l2, spaces.staging) if s is not None)
        self.denied.publish({"denied": denied})
