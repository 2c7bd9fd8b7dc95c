"""The residency monitor: re-verify every tracked allocation, on a timer, in the
background; report health.

Every ``interval_s`` the thread asks the memory-type function about the first and the last
byte of every live allocation of the tracker and compares the answer with what its kind
requires (``pointer_kinds.EXPECTED``: device memory for L1, the ring and staging,
page-locked host memory for L2, never managed memory). The first violation flips health
to unhealthy and is kept (pointer, purpose, owner, what was found) until someone calls
``acknowledge()``: recovering is an explicit act. If the allocation is still wrong at the
next pass, health flips again.

    mon = ResidencyMonitor(interval_s=10).start()
    mon.health()   # {"status", "resident", "vram_bytes_used", "last_check_secs", ...}
    mon.acknowledge("moved the arena back to cuMemAlloc")
    mon.stop()

A pass costs one driver call per pointer checked (two per allocation) under the GIL, so
its share of a decode loop is (pass time) / ``interval_s``; ``benchmarks/monitor_overhead.py``
measures both.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .metrics import METRICS
from .pointer_kinds import driver_memory_type, is_violation
from .tracker import TRACKER, Allocation, AllocationTracker

DEFAULT_INTERVAL_S = 10.0


@dataclass(frozen=True)
class Violation:
    allocation: Allocation
    ptr: int     # the byte that was checked (the allocation's first or last)
    found: str   # what the memory-type function reported
    at_s: float  # time.time() of the pass that found it

    @property
    def purpose(self) -> str:
        return self.allocation.purpose

    def message(self) -> str:
        a = self.allocation
        return (f"{a.purpose} allocation at {a.ptr:#x} ({a.nbytes} bytes, owner "
                f"{a.owner or '?'}) must be {a.kind} memory; at {self.ptr:#x} the driver "
                f"reports {self.found}")

    def as_dict(self) -> dict:
        return {**self.allocation.as_dict(), "checked_ptr": hex(self.ptr), "found": self.found,
                "at_unix_s": self.at_s, "message": self.message()}


class ResidencyMonitor:
    """``memory_type``: 'driver' (the default: the CUDA driver where there is one), None
    (no check possible) or a function ptr -> kind string (tests inject one)."""

    def __init__(self, tracker: AllocationTracker = TRACKER, memory_type="driver",
                 interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.tracker = tracker
        self.memory_type = driver_memory_type() if memory_type == "driver" else memory_type
        self.interval_s = float(interval_s)
        self._lock = threading.Lock()
        self._violation: Violation | None = None
        self._last_check: float | None = None  # time.monotonic() of the last pass
        self._last_checked = 0
        self.passes = 0
        self.violations_found = 0
        self.acknowledged: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # a memory-type function that raised

    # -- checking ----------------------------------------------------------------------------
    @property
    def checker_name(self) -> str:
        if self.memory_type is None:
            return "none"
        return getattr(self.memory_type, "name", "injected")

    def check(self) -> list[Violation]:
        """One pass over every live allocation now; returns what it found wrong."""
        if self.memory_type is None:
            return []
        t0 = time.perf_counter()
        found = []
        recs = self.tracker.records()
        kind_of = self.memory_type
        for r in recs:
            for p in (r.ptr, r.ptr + r.nbytes - 1):
                got = kind_of(p)
                if is_violation(r.kind, got):
                    # freed while we looked: a stale pointer is not a violation
                    if self.tracker.is_live(r.handle):
                        found.append(Violation(r, p, got, time.time()))
                    break
        with self._lock:
            self.passes += 1
            self._last_check = time.monotonic()
            self._last_checked = len(recs)
            if found:
                self.violations_found += len(found)
                if self._violation is None:
                    self._violation = found[0]
        METRICS.checks.inc()
        for v in found:
            METRICS.violation(v.purpose)
        METRICS.check_seconds.observe(time.perf_counter() - t0)
        return found

    def acknowledge(self, note: str = "") -> Violation | None:
        """Clear the unhealthy state (an operator's decision); returns what was cleared.
        The next pass flips health again if the allocation is still wrong."""
        with self._lock:
            v, self._violation = self._violation, None
        if v is not None:
            self.acknowledged.append({"violation": v.as_dict(), "note": note,
                                      "at_unix_s": time.time()})
        return v

    @property
    def healthy(self) -> bool:
        return self._violation is None

    def health(self) -> dict:
        """The VRAM-only seed's four fields, and what backs them."""
        with self._lock:
            v, last, n = self._violation, self._last_check, self._last_checked
        verified = self.memory_type is not None and last is not None and self.error is None
        if v is not None:
            status, resident = "unhealthy", False
        elif verified:
            status, resident = "healthy", True
        else:
            status, resident = "unverified", None
        return {"status": status, "resident": resident,
                "vram_bytes_used": self.tracker.device_bytes(),
                "last_check_secs": None if last is None else round(time.monotonic() - last, 3),
                "checked_allocations": n, "interval_s": self.interval_s,
                "checker": self.checker_name, "violation": None if v is None else v.as_dict(),
                "violations_total": self.violations_found,
                "acknowledged": len(self.acknowledged), "error": self.error}

    # -- the thread -------------------------------------------------------------------------
    def start(self) -> "ResidencyMonitor":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="synapse-residency",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        mt = self.memory_type
        try:
            if hasattr(mt, "enter_thread"):
                mt.enter_thread()
            while True:
                self.check()
                if self._stop.wait(self.interval_s):
                    break
        except Exception as e:  # report it on /health rather than die silently
            self.error = f"{type(e).__name__}: {e}"
        finally:
            if hasattr(mt, "exit_thread"):
                mt.exit_thread()

    def __enter__(self) -> "ResidencyMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
