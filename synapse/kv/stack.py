"""The one constructor of a KV stack: allocators over a backend's memory, a policy, the
tier manager and the mover. The scenario drivers (``drivers/kv_common.build_kv``, after
resolving a scenario's budgets) and ``synapse.hf.TieredCache`` both build theirs here.

Spaces:
- L1: a compacting ``SlotArena`` of full-precision blocks on the device (live blocks are
  the arena's front; the virtual-memory arena maps just the pages they touch);
- L2: pinned host memory, a slab allocator with a size class per format, or with
  ``l2_compact`` a ``SlotArena`` of the demotion format (its live blocks are one
  contiguous run, read through in a few large copies);
- staging: device slots of INT4 blocks between L1 and L2 (quantize out, dequantize in).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..blocks import Fmt
from ..errors import CapacityError
from ..hw.slab import SlabAllocator, round_up
from ..manager import DecisionLog, Spaces, TierManager
from ..mover import Mover
from ..page_table import PageTable
from ..policy import Demotion, KVPrefetch, Watermarks, make_policy
from .shape import KVShape
from .slots import SlotArena

PAGE_TARGET_BYTES = 2 << 20
MIN_PAGES = 64
DEMOTE_NAMES = {"int4": "l2_int4", "l2_int4": "l2_int4", "l2": "l2", "drop": "drop"}


def page_bytes_for(block_bytes: int, arena_bytes: int) -> int:
    """Whole blocks per slab page: about 2 MiB when blocks are small, but never so large
    that the arena has fewer than MIN_PAGES pages. Pages carry one size class each, so few
    large pages would strand INT4 objects next to fp16 ones and waste the budget's tail."""
    per_page = min(PAGE_TARGET_BYTES // block_bytes, arena_bytes // (MIN_PAGES * block_bytes))
    return block_bytes * max(1, per_page)


@dataclass(frozen=True)
class PolicySettings:
    """What a stack's policy layer is made of (the scenario's ``policy`` section, or
    ``TieredCache``'s keyword arguments)."""

    eviction: str = "h2o"
    demote: str = "l2_int4"
    heavy_ratio: float = 0.5
    sink_blocks: int = 1
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    eviction_ratio: float = 0.25
    prefetch_blocks: int = 8


@dataclass
class KVStack:
    shape: KVShape
    table: PageTable
    manager: TierManager
    mover: Mover
    l1_bytes: int
    l2_bytes: int

    @property
    def capacity_blocks(self) -> int:
        return self.manager.spaces.l1.capacity_slots


def build_stack(shape: KVShape, backend, l1_bytes: int, l2_bytes: int, policy: PolicySettings,
                *, staging_blocks: int = 64, l2_compact: bool = False,
                tail_last: bool = False) -> KVStack:
    """Allocators over ``backend``'s memory, the policy and the manager for one stack.

    ``l1_bytes`` is rounded down to whole blocks (the arena holds slots only); L2 is
    sized by the caller. Raises CapacityError when L1 cannot hold one block.
    """
    full, q4 = shape.fp16_bytes, shape.int4_bytes
    demote = Demotion.parse(DEMOTE_NAMES.get(policy.demote, policy.demote))
    l1_slots = l1_bytes // full
    if l1_slots < 1:
        raise CapacityError(f"an L1 budget of {l1_bytes} bytes holds no KV block of {full} bytes")
    l1 = SlotArena(backend.paged_memory("l1", l1_slots * full), full)
    l2_format_bytes = q4 if demote is Demotion.L2_INT4 else full
    if l2_compact:  # grows as demotions need it, up to the budget: pinned memory costs
        # about a second per GiB to allocate (a full-budget cache never needs any)
        l2_slots = max(1, l2_bytes // l2_format_bytes)
        first = min(l2_slots, 16)
        l2 = SlotArena(backend.memory("l2", first * l2_format_bytes, "pinned_host"),
                       l2_format_bytes, max_slots=l2_slots)
    else:
        page = page_bytes_for(full, l1_slots * full)
        l2_bytes = max(l2_bytes, page)
        l2 = SlabAllocator(backend.memory("l2", l2_bytes, "pinned_host"), (q4, full),
                           page_bytes_for(full, l2_bytes))
    stage_page = round_up(page_bytes_for(q4, staging_blocks * q4), 256)
    staging = SlabAllocator(backend.memory("staging", max(stage_page, staging_blocks * q4),
                                           "device"), (q4,), stage_page)
    pol = make_policy(policy.eviction, heavy_ratio=policy.heavy_ratio,
                      sink_blocks=policy.sink_blocks)
    table = PageTable()
    manager = TierManager(
        table, Spaces(l1, l2, staging), pol, demote,
        Watermarks(policy.high_watermark, policy.low_watermark, policy.eviction_ratio),
        KVPrefetch(policy.prefetch_blocks), {Fmt.FP16: full, Fmt.INT4: q4}, DecisionLog(),
        tail_last=tail_last)
    mover = Mover(backend, manager, shape)
    manager.on_decision = getattr(backend, "decision_done", None)  # the simulator charges it
    l2_total = l2.max_slots * l2.slot_bytes if l2_compact else l2.capacity_bytes
    return KVStack(shape, table, manager, mover, l1.capacity_bytes, l2_total)
