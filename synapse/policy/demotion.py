"""What happens to a KV block the eviction policy picked: demoted to L2 (as it is, or
compressed to INT4 on the way) or dropped. Each outcome is counted by the manager.
"""

from __future__ import annotations

import enum

from ..blocks import Fmt, Tier


class Demotion(enum.Enum):
    L2 = "l2"            # copy to pinned host memory, same format
    L2_INT4 = "l2_int4"  # quantize on the GPU, copy the packed bytes (about a quarter)
    DROP = "drop"        # no lower tier: the block is gone (H2O/StreamingLLM as published)

    @classmethod
    def parse(cls, name: str) -> "Demotion":
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown demotion {name!r}; expected one of "
                             f"{', '.join(d.value for d in cls)}") from None

    def target(self, fmt: Fmt) -> tuple[Tier, Fmt]:
        if self is Demotion.DROP:
            return Tier.NONE, fmt
        if self is Demotion.L2_INT4:
            return Tier.L2, Fmt.INT4
        return Tier.L2, fmt
