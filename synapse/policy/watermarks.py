"""Admission and backpressure: high and low watermarks on a tier, and an eviction ratio.

When usage rises above ``high`` x capacity, the manager demotes until usage is at most
``low`` x capacity, moving at most ``eviction_ratio`` x capacity per step so that one
burst does not flood the link; the headroom between the two marks takes the next step's
fetches, prefetches and new blocks without a stall. A request that cannot fit even after
that is refused with ``AdmissionRefused``, never dropped in silence.

Where the marks apply: the serving scenarios (tsunami, tenants) hold L1 at or below
``high`` after every allocation (a swap-in or start waits, decode growth swaps requests out
first, down to ``low``). The single-sequence drivers (needle, trace, the transformers
cache) use them for the background round after each step (demotion, and prefetch only up
to ``high``); within a step, new blocks and demand fetches may fill L1 up to its budget,
with forced eviction beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Watermarks:
    high: float = 0.95
    low: float = 0.85
    eviction_ratio: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 < self.low <= self.high <= 1.0:
            raise ValueError(f"watermarks must satisfy 0 < low <= high <= 1, got "
                             f"low={self.low}, high={self.high}")
        if not 0.0 < self.eviction_ratio <= 1.0:
            raise ValueError(f"eviction_ratio must be within (0, 1], got {self.eviction_ratio}")

    def bytes_to_free(self, used_bytes: int, capacity_bytes: int) -> int:
        """How much background demotion should free now (0 below the high mark)."""
        if used_bytes <= self.high * capacity_bytes:
            return 0
        excess = used_bytes - int(self.low * capacity_bytes)
        return min(excess, max(1, int(self.eviction_ratio * capacity_bytes)))

    def headroom_bytes(self, used_bytes: int, capacity_bytes: int) -> int:
        """Room below the high mark, which prefetch may fill."""
        return max(0, int(self.high * capacity_bytes) - used_bytes)
