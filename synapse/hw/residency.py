"""Residency audit: what the page table says is in HBM really is device memory, and what
it says is in L2 really is page-locked host memory (not pageable, not managed).

The check asks the driver about every placed block's address (``cuPointerGetAttribute``
through cuda-bindings on the GPU); ``memory_type`` is injectable so the logic is tested on
any machine. A scenario runs it after every step with ``checks.residency: true``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..blocks import Tier

EXPECTED = {Tier.L1: "device", Tier.L2: "host"}


@dataclass
class ResidencyReport:
    checked: dict = field(default_factory=lambda: {"L1": 0, "L2": 0})
    violations: int = 0
    first: str | None = None

    @property
    def ok(self) -> bool:
        return self.violations == 0

    def as_dict(self) -> dict:
        return {"residency_checked_l1": self.checked["L1"],
                "residency_checked_l2": self.checked["L2"],
                "residency_violations": self.violations,
                "residency_first_violation": self.first}

    def merge(self, other: "ResidencyReport") -> None:
        for k in self.checked:
            self.checked[k] += other.checked[k]
        self.violations += other.violations
        self.first = self.first or other.first


def audit(table, memories: dict, memory_type, is_managed=lambda ptr: False) -> ResidencyReport:
    """Check every live block: ``memories`` maps "l1"/"l2" to objects with ``address()``."""
    rep = ResidencyReport()
    for tier, space in ((Tier.L1, "l1"), (Tier.L2, "l2")):
        mem = memories[space]
        for b in table.ids_in(tier).tolist():
            ptr = mem.address(int(table.offset[b]))
            kind = memory_type(ptr)
            rep.checked[tier.name] += 1
            bad = kind != EXPECTED[tier] or (tier == Tier.L1 and is_managed(ptr))
            if bad:
                rep.violations += 1
                if rep.first is None:
                    rep.first = (f"block {b} is in {tier.name} per the page table but its "
                                 f"address {ptr:#x} is {kind} memory")
    return rep
