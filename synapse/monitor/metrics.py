"""The live metrics of ``/metrics``: prometheus_client counters and histograms.

One registry for the process (``REGISTRY``), so a scrape sees every cache, run and
allocation of it. Only counters and histograms: a scraper derives rates, hit ratios and
live bytes (allocated minus released) with PromQL, and nothing is lost between scrapes.
Children with fixed labels are bound once here, so the hot path is a plain ``inc``.

Families (all prefixed ``synapse_``):

- ``block_hits_total{tier}`` (l1, l2), ``block_misses_total``
- ``transfer_bytes_total{direction}``, ``copies_total{direction}`` (h2d, d2h)
- ``evictions_total``, ``demotions_total``, ``drops_total``, ``refusals_total``,
  ``fetches_total{kind}`` (demand, prefetch)
- ``migration_seconds{direction}``: histogram of copy op durations (scenario runs)
- ``step_seconds{clock}``: step latency (wall, or simulated on the simulator)
- ``fetch_stall_seconds``: host time per step blocked on synchronous L2 -> L1 copies
- ``int4_squared_error_total``, ``int4_squared_reference_total``,
  ``int4_elements_total``: RMSE = sqrt(error / elements), relative = sqrt(error / reference);
  ``int4_relative_rmse``: histogram, one observation per step that quantized
- ``allocated_bytes_total{purpose,kind}``, ``released_bytes_total{purpose,kind}``,
  ``allocations_total{purpose,kind}`` (the allocation tracker)
- ``pinned_pool_allocations_total``, ``pinned_pool_frees_total`` (L2 slab operations)
- ``cross_tenant_denied_total``
- ``prefix_lookups_total{result,tier}``: the prefix store calls ``prefix_lookup``
- ``residency_checks_total``, ``residency_violations_total{purpose}``,
  ``residency_check_seconds``
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

# The text format would add a "_created" gauge per counter and histogram (a timestamp):
# half the exposition, and gauges where we promise counters. Process-wide, as the library
# offers it.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

# 10 us .. 10 s: small block copies to a whole layer's weights
LATENCY_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
STEP_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
REL_ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        hits = Counter("synapse_block_hits", "Block accesses served from a tier", ["tier"],
                       registry=r)
        self.l1_hits, self.l2_hits = hits.labels("l1"), hits.labels("l2")
        self.misses = Counter("synapse_block_misses", "Block accesses no tier could serve",
                              registry=r)
        nbytes = Counter("synapse_transfer_bytes", "Bytes copied between tiers", ["direction"],
                         registry=r)
        self.bytes_h2d, self.bytes_d2h = nbytes.labels("h2d"), nbytes.labels("d2h")
        copies = Counter("synapse_copies", "Copies between tiers (one per region)",
                         ["direction"], registry=r)
        self.copies_h2d, self.copies_d2h = copies.labels("h2d"), copies.labels("d2h")
        self.evictions = Counter("synapse_evictions", "Blocks evicted from L1", registry=r)
        self.demotions = Counter("synapse_demotions", "Evicted blocks kept in L2", registry=r)
        self.drops = Counter("synapse_drops", "Evicted blocks dropped", registry=r)
        self.refusals = Counter("synapse_refusals", "Requests refused by admission control",
                                registry=r)
        fetches = Counter("synapse_fetches", "Blocks moved L2 -> L1", ["kind"], registry=r)
        self.fetches, self.prefetches = fetches.labels("demand"), fetches.labels("prefetch")
        mig = Histogram("synapse_migration_seconds", "Duration of one copy op between tiers",
                        ["direction"], buckets=LATENCY_BUCKETS, registry=r)
        self.migration = {"h2d": mig.labels("h2d"), "d2h": mig.labels("d2h")}
        step = Histogram("synapse_step_seconds", "Latency of one step", ["clock"],
                         buckets=STEP_BUCKETS, registry=r)
        self.step_wall, self.step_simulated = step.labels("wall"), step.labels("simulated")
        self.fetch_stall = Histogram("synapse_fetch_stall_seconds",
                                     "Host time per step blocked on L2 -> L1 copies",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.int4_err = Counter("synapse_int4_squared_error",
                                "Sum of squared INT4 reconstruction errors", registry=r)
        self.int4_ref = Counter("synapse_int4_squared_reference",
                                "Sum of squares of the values quantized to INT4", registry=r)
        self.int4_n = Counter("synapse_int4_elements", "Elements quantized to INT4", registry=r)
        self.int4_rel = Histogram("synapse_int4_relative_rmse",
                                  "Relative INT4 RMSE of one step's quantized blocks",
                                  buckets=REL_ERROR_BUCKETS, registry=r)
        self._alloc_bytes = Counter("synapse_allocated_bytes", "Bytes allocated, by purpose",
                                    ["purpose", "kind"], registry=r)
        self._freed_bytes = Counter("synapse_released_bytes", "Bytes released, by purpose",
                                    ["purpose", "kind"], registry=r)
        self._allocs = Counter("synapse_allocations", "Allocations tracked, by purpose",
                               ["purpose", "kind"], registry=r)
        self.pool_allocs = Counter("synapse_pinned_pool_allocations",
                                   "Slabs allocated in the pinned L2 pool", registry=r)
        self.pool_frees = Counter("synapse_pinned_pool_frees",
                                  "Slabs freed in the pinned L2 pool", registry=r)
        self.denied = Counter("synapse_cross_tenant_denied",
                              "Accesses refused because the slab belongs to another tenant",
                              registry=r)
        self._prefix = Counter("synapse_prefix_lookups", "Prefix-store chunk lookups",
                               ["result", "tier"], registry=r)
        self.checks = Counter("synapse_residency_checks", "Residency passes over every tracked "
                              "allocation", registry=r)
        self._violations = Counter("synapse_residency_violations",
                                   "Tracked allocations found in the wrong kind of memory",
                                   ["purpose"], registry=r)
        self.check_seconds = Histogram("synapse_residency_check_seconds",
                                       "Duration of one residency pass",
                                       buckets=LATENCY_BUCKETS, registry=r)

    # -- rare events: labels looked up per call --------------------------------------------
    def allocation(self, purpose: str, kind: str, nbytes: int) -> None:
        self._alloc_bytes.labels(purpose, kind).inc(nbytes)
        self._allocs.labels(purpose, kind).inc()

    def release(self, purpose: str, kind: str, nbytes: int) -> None:
        self._freed_bytes.labels(purpose, kind).inc(nbytes)

    def violation(self, purpose: str) -> None:
        self._violations.labels(purpose).inc()

    def prefix_lookup(self, hit_tier: str | None, chunks: int = 1) -> None:
        """The prefix store's hook: ``chunks`` looked up, found in ``hit_tier`` (l1, l2,
        l3) or not found (None)."""
        if hit_tier is None:
            self._prefix.labels("miss", "none").inc(chunks)
        else:
            self._prefix.labels("hit", hit_tier).inc(chunks)


METRICS = Metrics(REGISTRY)
