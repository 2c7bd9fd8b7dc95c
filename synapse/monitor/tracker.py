"""The allocation tracker: every device and pinned-host allocation Synapse makes, with why.

A process-wide registry (``TRACKER``). Whoever allocates memory that a tier lives in
calls ``track`` right after the allocation and ``release`` right before freeing it:

    h = track(ptr, nbytes, "device", "l1_arena", owner="cuda_backend", tenant=None)
    ...
    release(h)

Operations (N = live allocations):

- ``track(ptr, nbytes, kind, purpose, owner=, tenant=) -> handle``   O(1)
- ``release(handle)``                                                 O(1); a second
  release of the same handle is a no-op (frees happen on error paths too)
- ``records()``            O(N) snapshot, in allocation order
- ``is_live(handle)``      O(1)
- ``totals()``             bytes per (purpose, kind) of live allocations, O(N)
- ``device_bytes()``       bytes of live device and managed allocations (VRAM), O(N)

Kinds say what was asked for: ``device`` (cuMemAlloc, torch on CUDA, VMM pages),
``pinned_host`` (page-locked host), ``managed`` (unified memory: tracked so it can be
flagged, never allowed by the residency monitor), ``host`` (pageable host memory that
stands in for a tier on the ``cpu`` backend and in CPU tests; never counted as VRAM).
Every track and release also increments the allocation counters of ``/metrics``.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

from ..errors import AllocatorError

KINDS = ("device", "pinned_host", "managed", "host")
VRAM_KINDS = ("device", "managed")

# What each backend space is for, as the tracker names it.
SPACE_PURPOSE = {"l1": "l1_arena", "l2": "l2_pool", "staging": "int4_staging",
                 "ring": "ring", "staging_host": "staging", "staging_device": "staging"}


def purpose_for_space(space: str) -> str:
    return SPACE_PURPOSE.get(space, space)


@dataclass(frozen=True)
class Allocation:
    handle: int
    ptr: int
    nbytes: int
    kind: str
    purpose: str
    owner: str
    tenant: str | None
    created_s: float  # time.time() at track

    def as_dict(self) -> dict:
        return {"handle": self.handle, "ptr": hex(self.ptr), "nbytes": self.nbytes,
                "kind": self.kind, "purpose": self.purpose, "owner": self.owner,
                "tenant": self.tenant}


class AllocationTracker:
    def __init__(self, on_track=None, on_release=None) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, Allocation] = {}  # dicts keep insertion order
        self._ids = itertools.count(1)
        self._on_track, self._on_release = on_track, on_release

    def track(self, ptr: int, nbytes: int, kind: str, purpose: str, *, owner: str = "",
              tenant: str | None = None) -> int:
        if kind not in KINDS:
            raise AllocatorError(f"allocation kind must be one of {', '.join(KINDS)}; "
                                f"got {kind!r}")
        if nbytes <= 0 or ptr <= 0:
            raise AllocatorError(f"allocation of {purpose!r}: ptr and nbytes must be positive, "
                                f"got ptr {ptr:#x}, nbytes {nbytes}")
        rec = Allocation(next(self._ids), int(ptr), int(nbytes), kind, purpose, owner, tenant,
                         time.time())
        with self._lock:
            self._live[rec.handle] = rec
        if self._on_track is not None:
            self._on_track(rec)
        return rec.handle

    def release(self, handle: int | None) -> None:
        if handle is None:
            return
        with self._lock:
            rec = self._live.pop(handle, None)
        if rec is not None and self._on_release is not None:
            self._on_release(rec)

    def is_live(self, handle: int) -> bool:
        return handle in self._live

    def records(self) -> list[Allocation]:
        with self._lock:
            return list(self._live.values())

    def totals(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for r in self.records():
            out[(r.purpose, r.kind)] = out.get((r.purpose, r.kind), 0) + r.nbytes
        return dict(sorted(out.items()))

    def device_bytes(self) -> int:
        return sum(r.nbytes for r in self.records() if r.kind in VRAM_KINDS)

    def export(self) -> dict:
        """Totals per purpose and kind, and every live allocation (JSON-ready)."""
        return {"totals": [{"purpose": p, "kind": k, "nbytes": n}
                           for (p, k), n in self.totals().items()],
                "vram_bytes": self.device_bytes(),
                "allocations": [r.as_dict() for r in self.records()]}


def _count_track(rec: Allocation) -> None:
    from .metrics import METRICS
    METRICS.allocation(rec.purpose, rec.kind, rec.nbytes)


def _count_release(rec: Allocation) -> None:
    from .metrics import METRICS
    METRICS.release(rec.purpose, rec.kind, rec.nbytes)


TRACKER = AllocationTracker(_count_track, _count_release)
track = TRACKER.track
release = TRACKER.release


def track_tensor(t, purpose: str, *, owner: str = "", tenant: str | None = None) -> int | None:
    """Track a torch tensor's storage (kind from its device and pinning); None if empty."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return None
    if t.device.type == "cuda":
        kind = "device"
    else:
        kind = "pinned_host" if t.is_pinned() else "host"
    return TRACKER.track(t.data_ptr(), nbytes, kind, purpose, owner=owner, tenant=tenant)
