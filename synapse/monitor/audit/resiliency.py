"""Resiliency: the memory-tsunami scenario at 2x, 5x and 10x the capacity of L1 + L2.

Capacity is what the serving driver reserves against (whole blocks of L1 + L2); the
number of requests is chosen so that their largest footprints add up to the multiple.
Every run has the invariant checks on (every live block in exactly one tier after every
step). Graded: 0 blocks lost and every request either served or refused; on backends that
move bytes, every block swapped back in is bit-exact (fp16 round trip through L2).
"""

from __future__ import annotations

import math

from .grade import Check, equals

MULTIPLES = (2, 5, 10)


def _capacity(overrides: list) -> tuple[int, int]:
    """(capacity in blocks, largest blocks of one request) as the driver computes them."""
    from ...drivers.serving import ServingDriver
    from ...scenarios.loader import load_scenario
    from ...sim.backend import SimBackend
    from ...sim.profile import load_profile
    sc = load_scenario("tsunami", overrides)
    prof = load_profile(sc.profile)
    be = SimBackend(prof)
    try:
        d = ServingDriver(sc, be, prof)
        return d.capacity_blocks, max(r.max_blocks(d.bt) for r in d.requests)
    finally:
        be.close()


def requests_for(multiple: int, overrides: list) -> int:
    # L2 is sized to the working set when that is smaller, so settle the capacity at the
    # request count it implies (two rounds suffice: past 1x the budget is the bound).
    n = None
    for _ in range(2):
        cap, per = _capacity(overrides + ([f"workload.requests={n}"] if n else []))
        n = math.ceil(multiple * cap / per)
    return n


def run(overrides: list, run, moves_data: bool) -> tuple[list, dict]:
    checks: list[Check] = []
    details = {}
    for k in MULTIPLES:
        n = requests_for(k, overrides)
        m = run("tsunami", overrides + [f"workload.requests={n}", "checks.invariants=true"]).metrics
        checks.append(equals(f"blocks_lost_at_{k}x", m["lost_blocks"], 0, critical=True))
        checks.append(equals(f"requests_unaccounted_at_{k}x", m["unaccounted_requests"], 0,
                             critical=True, note=f"{m['served']} served + {m['refused']} refused "
                                                 f"of {m['requests']}"))
        if moves_data:
            checks.append(equals(f"swap_roundtrip_mismatches_at_{k}x", m["roundtrip_mismatches"],
                                 0, critical=True, note=f"{m['roundtrip_checked']} blocks checked"))
        details[f"{k}x"] = {"requests": n, "served": m["served"], "refused": m["refused"],
                            "peak_l1_fraction": m["peak_l1_fraction"],
                            "demotions": m["demotions"], "fetches": m["fetches"]}
    return checks, details
