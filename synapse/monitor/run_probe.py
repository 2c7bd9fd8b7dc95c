"""A scenario run, published to /metrics step by step (``synapse run --serve-metrics``).

Each step publishes the manager's counter deltas, the pinned pool's operations and the
step's latency (simulated seconds on the simulator, wall seconds elsewhere). Copy ops
(bytes and copies per direction, the migration-latency histogram) come from the backend's
op records: every step on ``sim`` and ``cpu``, whose records are a list already complete,
and once after the run on ``cuda``, where reading event times mid-run would synchronise the
streams the run is overlapping.
"""

from __future__ import annotations

from .deltas import MANAGER_FIELDS, CounterDeltas, SpaceDeltas
from .metrics import METRICS

LIVE_RECORDS = ("sim", "cpu")


class RunProbe:
    def __init__(self, driver, backend) -> None:
        self.driver, self.backend = driver, backend
        mgr = driver.mgr  # the streaming driver is its own "manager": counters, no spaces
        self.counters = mgr.counters
        self.spaces = getattr(mgr, "spaces", None)
        self.manager = CounterDeltas(MANAGER_FIELDS)
        self.space_deltas = SpaceDeltas()
        self.step_hist = METRICS.step_simulated if backend.simulated else METRICS.step_wall
        self.live = backend.name in LIVE_RECORDS
        self.seen = 0  # op records already published

    def step(self, _n: int = 1) -> None:
        self.manager.publish(self.counters)
        if self.spaces is not None:
            self.space_deltas.publish(self.spaces)
        steps = self.driver.rec.step_s
        if steps:
            self.step_hist.observe(steps[-1])
        if self.live:
            self._records(self.backend.records())

    def finish(self, records) -> None:
        """After the run: whatever op records were not published yet."""
        self.manager.publish(self.counters)
        self._records(records)

    def _records(self, records) -> None:
        for r in records[self.seen:]:
            if r.kind == "copy_h2d":
                METRICS.bytes_h2d.inc(r.nbytes)
                METRICS.copies_h2d.inc(r.count)
                METRICS.migration["h2d"].observe(r.duration_s)
            elif r.kind == "copy_d2h":
                METRICS.bytes_d2h.inc(r.nbytes)
                METRICS.copies_d2h.inc(r.count)
                METRICS.migration["d2h"].observe(r.duration_s)
        self.seen = len(records)
