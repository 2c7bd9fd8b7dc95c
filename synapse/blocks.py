"""The nouns of the tier model: what a block is, which tier holds it, in which format.

A block is a unit of placement: a run of ``block_tokens`` tokens of KV for all layers and
heads of one sequence, or one layer's weights. The page table (``page_table.py``) records
where each block is; these enums are its vocabulary, shared by the simulator and the
hardware backends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Tier(enum.IntEnum):
    """Where a block's bytes are. NONE: not placed (dropped, freed or never admitted)."""

    NONE = 0
    L1 = 1  # GPU HBM
    L2 = 2  # pinned host RAM


class State(enum.IntEnum):
    """Life cycle of a block id. Every LIVE block is in exactly one of L1 and L2."""

    LIVE = 1
    DROPPED = 2  # evicted with no lower tier, on purpose and counted
    FREED = 3    # its owner (request, model) released it


class Fmt(enum.IntEnum):
    FP16 = 0
    BF16 = 1
    INT4 = 2

    @classmethod
    def parse(cls, name: str) -> "Fmt":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown format {name!r}; expected one of fp16, bf16, int4") from None


class Kind(enum.IntEnum):
    KV = 0
    WEIGHT = 1


@dataclass(frozen=True)
class BlockSpec:
    """What a workload asks to place; the page table assigns the id."""

    nbytes: int
    kind: Kind = Kind.KV
    tenant: str = "default"
    layer: int = -1          # -1: spans all layers (a KV block)
    token_start: int = 0
    token_end: int = 0
    fmt: Fmt = Fmt.FP16
    content_hash: str = ""
    owner: int = 0           # the request (sequence) it belongs to
