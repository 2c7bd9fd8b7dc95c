"""Operating Synapse: the allocation tracker, the residency monitor, live metrics and the
readiness audit.

    import synapse.monitor as monitor
    h = monitor.track(ptr, nbytes, "device", "kv_pages", owner="kv.arena", tenant="a")
    monitor.release(h)
    srv = monitor.serve(port=9400)     # /metrics and /health on 127.0.0.1:9400
    srv.monitor.acknowledge()          # after a violation was dealt with

Modules: ``tracker`` (every allocation with its purpose), ``residency_monitor`` (the
background pointer checks and health), ``metrics`` (the prometheus_client families),
``deltas``, ``cache_probe`` and ``run_probe`` (what a cache step or a scenario step
publishes), ``server`` (the HTTP endpoint), ``audit`` (``synapse audit``). See
docs/operate.md.
"""

from .metrics import METRICS, REGISTRY
from .residency_monitor import DEFAULT_INTERVAL_S, ResidencyMonitor, Violation
from .server import MonitorServer, serve
from .tracker import KINDS, TRACKER, Allocation, AllocationTracker, release, track, track_tensor


def prefix_lookup(hit_tier: str | None, chunks: int = 1) -> None:
    """Hook for the prefix store: ``chunks`` looked up and found in ``hit_tier`` ('l1',
    'l2', 'l3') or not found (None); counted in ``synapse_prefix_lookups_total``."""
    METRICS.prefix_lookup(hit_tier, chunks)


__all__ = ["Allocation", "AllocationTracker", "DEFAULT_INTERVAL_S", "KINDS", "METRICS",
           "MonitorServer", "REGISTRY", "ResidencyMonitor", "TRACKER", "Violation",
           "prefix_lookup", "release", "serve", "track", "track_tensor"]
