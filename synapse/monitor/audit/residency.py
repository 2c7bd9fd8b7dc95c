"""Residency: every space the backend allocated is in the tracker, and the memory is the
kind it should be.

- coverage: each space the audit's runs allocated (L1 arena, L2 pool, INT4 staging) has
  a live tracker record at its address, of at least its size;
- a residency pass with the driver's pointer attributes over every tracked allocation:
  no violation (critical). Where there is no driver (a CPU machine) it is not graded;
- detection: the same pass with a memory-type function that calls everything managed
  must flag every allocation (the monitor can fail, and does when it should);
- on ``cuda``, the page-table audit of the needle scenario (``checks.residency``): every
  L1 block at a device address, every L2 block in page-locked memory.
"""

from __future__ import annotations

from ..residency_monitor import ResidencyMonitor
from ..tracker import TRACKER
from .grade import Check, at_least, equals, not_graded


def run(be, spaces: dict, needle_metrics: dict | None = None) -> tuple[list, dict]:
    """``spaces``: name -> memory the backend returned; ``needle_metrics``: the metrics of
    a needle run with ``checks.residency=true`` (the cuda backend's page-table audit)."""
    recs = TRACKER.records()
    missing = [name for name, mem in spaces.items()
               if not any(r.ptr == mem.address(0) and r.nbytes >= mem.nbytes for r in recs)]
    checks: list[Check] = []
    if spaces:
        checks.append(equals("spaces_not_tracked", len(missing), 0,
                             note=f"{len(spaces)} spaces: {', '.join(spaces)}"
                                  + (f"; missing: {', '.join(missing)}" if missing else "")))
    else:
        checks.append(not_graded("spaces_not_tracked", None, "== 0",
                                 f"the {be.name} backend allocates no memory"))
    mine = [r for r in recs if any(r.ptr == m.address(0) for m in spaces.values())]
    real = ResidencyMonitor(memory_type="driver")
    if real.memory_type is None:
        checks.append(not_graded("residency_violations", None, "== 0",
                                 "no NVIDIA driver here: pointer attributes cannot be asked"))
        found = None
    else:
        found = real.check()
        checks.append(equals("residency_violations", len(found), 0, critical=True,
                             note=f"{len(recs)} tracked allocations checked"
                                  + (f"; first: {found[0].message()}" if found else "")))
    if mine:
        fake = ResidencyMonitor(memory_type=lambda ptr: "managed")
        flagged = {v.allocation.handle for v in fake.check()}
        caught = sum(r.handle in flagged for r in mine)
        checks.append(at_least("injected_managed_detected", caught, len(mine),
                               note="a memory-type function reporting 'managed' for every "
                                    "pointer: each of the audit's allocations must be flagged"))
    if needle_metrics is not None:
        m = needle_metrics
        checks.append(equals("page_table_residency_violations", m["residency_violations"], 0,
                             critical=True, note=m.get("residency_first_violation") or
                             f"{m['residency_checked_l1']} L1 and {m['residency_checked_l2']} "
                             f"L2 blocks checked"))
    details = {"tracked_allocations": len(recs), "tracker": TRACKER.export()["totals"],
               "checker": real.checker_name,
               "violations": None if found is None else [v.as_dict() for v in found]}
    return checks, details
