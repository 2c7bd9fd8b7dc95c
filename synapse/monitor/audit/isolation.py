"""Isolation: cross-tenant access attempted on every path, and freed memory read back.

The tenants scenario runs on the backend until two tenants have blocks in L1 and one in
L2; then one tenant attempts, against another tenant's block, each path the data plane
has: a read of an L1 block, a read of an L2 block, attention over the block, a demotion
copy into its own L2 slab, an INT4 demotion through its own staging slab, and a forged
handle (a copy of the victim's slab tagged with the thief's name). Each must raise
``AccessDenied``; an attempt that does not is a leak (critical).

Zero on free: a slab of L1 and one of L2 are filled with random bytes, freed, allocated
again (the allocator hands the same range back: checked) and read after the next op was
submitted (on the GPU a freed device range is cleared by a memset queued before it): every
byte must be zero.
"""

from __future__ import annotations

import copy

import numpy as np

from ...blocks import Fmt, Tier
from ...errors import AccessDenied
from ...manager import Move
from ...ops import Copy, Ingest, Region, Stream
from .grade import at_least, equals

MAX_STEPS = 200


def _advance(driver, be):
    """Run the tenants driver until the probes have targets; returns the generator."""
    gen = driver.process()
    table = driver.table

    def ready() -> bool:
        ids = np.arange(len(table))
        live1 = ids[table.tier[ids] == Tier.L1]
        live2 = ids[table.tier[ids] == Tier.L2]
        return len(set(table.tenant[live1].tolist())) >= 2 and len(live2) > 0

    def steps():
        for _ in range(MAX_STEPS):
            if ready():
                return
            yield next(gen)
    be.run(steps())
    return ready()


def _attempts(driver) -> dict[str, callable]:
    table, mover, mgr = driver.table, driver.mover, driver.mgr
    sp = mgr.spaces
    ids = np.arange(len(table))
    l1 = ids[table.tier[ids] == Tier.L1]
    l2 = ids[table.tier[ids] == Tier.L2]
    victim_l1 = int(l1[0])
    victim = table.tenants[table.tenant[victim_l1]]
    thief = next(table.tenants[t] for t in table.tenant[l1].tolist() if table.tenants[t] != victim)
    victim_l2 = int(l2[0])
    l2_owner = table.tenants[table.tenant[victim_l2]]
    thief2 = thief if thief != l2_owner else victim
    bytes_fp16 = int(table.nbytes[victim_l1])
    layout = driver.sizes.layout
    m = driver.s.model
    q = np.zeros((m.layers, m.kv_heads, m.head_dim), np.float32)

    def demote_into_own_slab():
        slab = sp.l2.allocate(bytes_fp16, thief)
        try:
            mover.submit([Move(victim_l1, "demote", Tier.L1, Tier.L2, Fmt.FP16, Fmt.FP16,
                               driver.mgr.handle(victim_l1), slab)])
        finally:
            sp.l2.free(slab)

    def int4_through_own_staging():
        dst = sp.l2.allocate(driver.sizes.int4_bytes, victim)
        stage = sp.staging.allocate(driver.sizes.int4_bytes, thief)
        try:
            mover.submit([Move(victim_l1, "demote", Tier.L1, Tier.L2, Fmt.FP16, Fmt.INT4,
                               driver.mgr.handle(victim_l1), dst, stage)])
        finally:
            sp.l2.free(dst)
            sp.staging.free(stage)

    def forged_handle():  # a copy of the victim's handle that claims the thief's tenant
        forged = copy.copy(driver.mgr.handle(victim_l1))
        forged.tenant = thief
        mover.region(Tier.L1, forged, thief)

    return {
        "read_l1_block": lambda: mover.read_as(thief, victim_l1),
        "read_l2_block": lambda: mover.read_as(thief2, victim_l2),
        "attention_over_block": lambda: mover.attention([victim_l1], [1], thief, q, 1.0, layout),
        "demote_into_own_l2_slab": demote_into_own_slab,
        "int4_through_own_staging_slab": int4_through_own_staging,
        "forged_slab_handle": forged_handle,
    }


def _zero_on_free(driver, be, seed: int) -> dict:
    """Bytes left non-zero in freed-then-reallocated L1 and L2 slabs."""
    sp, size = driver.mgr.spaces, driver.sizes.fp16_bytes
    rng = np.random.default_rng([seed, 0x2E40])
    junk = rng.integers(1, 256, size, dtype=np.uint8)
    out = {}
    a = sp.l1.allocate(size, "audit-a")
    src = sp.l1.allocate(size, "audit-a")
    l2a = sp.l2.allocate(size, "audit-a")

    def fill():
        t = be.submit(Ingest(purpose="audit", dst=(Region("l1", a.offset, size),
                                                   Region("l1", src.offset, size)),
                             source=lambda i: junk), Stream.H2D)
        c = be.submit(Copy.between("demote", "d2h", Region("l1", src.offset, size),
                                   Region("l2", l2a.offset, size)), Stream.D2H, [t])
        yield be.wait([c])
    be.run(fill())
    dirty = {a.offset, src.offset}  # L1 bytes that held the junk (compaction may move src)
    sp.l1.free(a)
    sp.l2.free(l2a)
    b = sp.l1.allocate(size, "audit-b")
    l2b = sp.l2.allocate(size, "audit-b")
    probe = sp.l1.allocate(size, "audit-b")
    driver.mover.relocate()  # what compaction owes (moves, then the zero-on-free memsets)

    def next_op():  # the next tenant's first token: the op the queued memset precedes
        t = be.submit(Ingest(purpose="audit", dst=(Region("l1", probe.offset, 16),),
                             source=lambda i: junk[:16]), Stream.H2D)
        yield be.wait([t])
    be.run(next_op())
    out["l1_nonzero_bytes"] = int(np.count_nonzero(be.read_region(Region("l1", b.offset, size))))
    out["l2_nonzero_bytes"] = int(np.count_nonzero(be.read_region(Region("l2", l2b.offset, size))))
    out["ranges_reused"] = int(b.offset in dirty) + int(l2b.offset == l2a.offset)
    sp.l1.free_all((b, src, probe))
    sp.l2.free(l2b)
    return out


def run(be, overrides: list, seed: int) -> tuple[list, dict, dict]:
    """Checks, details, and the spaces the tenants driver allocated (for the residency
    audit's coverage check)."""
    from ...drivers.serving import ServingDriver
    from ...scenarios.loader import load_scenario
    from ...sim.profile import load_profile
    sc = load_scenario("tenants", overrides)
    prof = load_profile(sc.profile)
    driver = ServingDriver(sc, be, prof)
    checks = [equals("probe_targets_found", _advance(driver, be), True,
                     note="two tenants in L1 and a block in L2")]
    denied = {}
    if checks[0].passed:
        for name, attempt in _attempts(driver).items():
            try:
                attempt()
                denied[name] = False
            except AccessDenied:
                denied[name] = True
    served = [n for n, ok in denied.items() if not ok]
    checks.append(equals("cross_tenant_accesses_served", len(served), 0, critical=True,
                         note=f"{len(denied)} paths attempted: {', '.join(denied)}"
                              + (f"; served: {', '.join(served)}" if served else "")))
    checks.append(at_least("cross_tenant_paths_attempted", len(denied), 6))
    details = {"paths": denied}
    if be.moves_data:
        z = _zero_on_free(driver, be, seed)
        checks.append(equals("freed_l1_bytes_nonzero", z["l1_nonzero_bytes"], 0, critical=True))
        checks.append(equals("freed_l2_bytes_nonzero", z["l2_nonzero_bytes"], 0, critical=True))
        checks.append(equals("freed_ranges_handed_out_again", z["ranges_reused"], 2,
                             note="the reallocated slabs are the freed ones (L1 and L2)"))
        details["zero_on_free"] = z
    sp = driver.mgr.spaces
    return checks, details, {"l1": sp.l1.memory, "l2": sp.l2.memory, "staging": sp.staging.memory}
