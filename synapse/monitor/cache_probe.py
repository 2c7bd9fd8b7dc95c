"""A ``TieredCache``'s step, published to /metrics (``TieredCache`` calls
``publish_cache_step(self)`` at the end of each step).

What a step adds: the manager's counters (hits per tier, evictions, demotions, drops,
fetches), bytes per direction, INT4 error sums, pinned-pool operations and denied
accesses, the step's wall time and the host time it spent blocked on L2 -> L1 copies.
The cache keeps no per-copy count or duration (its copies are tensor ``.to`` calls, async
on CUDA), so ``copies_total`` and ``migration_seconds`` come from scenario runs only.
"""

from __future__ import annotations

from .deltas import MANAGER_FIELDS, CounterDeltas, SpaceDeltas
from .metrics import METRICS

_CACHE_FIELDS = {"h2d": METRICS.bytes_h2d, "d2h": METRICS.bytes_d2h,
                 "int4_err": METRICS.int4_err, "int4_ref": METRICS.int4_ref,
                 "int4_n": METRICS.int4_n}


class CacheProbe:
    def __init__(self) -> None:
        self.manager = CounterDeltas(MANAGER_FIELDS)
        self.spaces = SpaceDeltas()
        self.cache = CounterDeltas(_CACHE_FIELDS)
        self.last_stall = 0.0
        self.last_err = self.last_ref = 0.0

    def publish(self, cache) -> None:
        mgr = cache.planner.mgr
        self.manager.publish(mgr.counters)
        self.spaces.publish(mgr.spaces)
        totals = cache.metric_totals()
        err, ref = totals["int4_err"], totals["int4_ref"]
        self.cache.publish(totals)
        d_ref = ref - self.last_ref
        if d_ref > 0:
            METRICS.int4_rel.observe(((err - self.last_err) / d_ref) ** 0.5)
        self.last_err, self.last_ref = err, ref
        stall = cache.stall_s - self.last_stall
        if stall >= 0:
            METRICS.fetch_stall.observe(stall)
        self.last_stall = cache.stall_s
        METRICS.step_wall.observe(cache.rec.step_s[-1])


def publish_cache_step(cache) -> None:
    probe = cache.__dict__.get("_monitor_probe")
    if probe is None:
        probe = cache.__dict__["_monitor_probe"] = CacheProbe()
    probe.publish(cache)
