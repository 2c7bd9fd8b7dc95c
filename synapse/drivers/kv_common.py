"""What every KV scenario sets up the same way: block sizes, the three allocators over
the backend's memory, the manager and the mover; and the budget checks that must fail at
set-up, naming the numbers, rather than mid-run."""

from __future__ import annotations

from dataclasses import dataclass

from ..blocks import Fmt
from ..errors import ScenarioError
from ..hw.kv_layout import KVLayout
from ..hw.slab import SlabAllocator, round_up
from ..manager import DecisionLog, Spaces, TierManager
from ..mover import Mover
from ..page_table import PageTable
from ..policy import Demotion, KVPrefetch, Watermarks, make_policy
from ..scenarios.schema import Scenario
from ..sim.profile import Profile
from ..units import fmt_bytes, parse_budget

PAGE_TARGET_BYTES = 2 << 20


@dataclass(frozen=True)
class BlockSizes:
    """Bytes of one KV block, from its layout (synapse.hw.kv_layout: token-major
    [block_tokens, 2, layers, heads, head_dim], fp16 or INT4)."""

    layout: KVLayout

    @classmethod
    def of(cls, s: Scenario) -> "BlockSizes":
        m = s.model
        return cls(KVLayout(m.layers, m.kv_heads, m.head_dim, s.memory.block_tokens,
                            s.memory.int4_group))

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def token_bytes(self) -> int:
        return self.layout.token_bytes

    @property
    def fp16(self) -> int:
        return self.layout.fp16_bytes

    @property
    def int4(self) -> int:
        return self.layout.int4_bytes


MIN_PAGES = 64


def page_bytes_for(block_bytes: int, arena_bytes: int) -> int:
    """Whole blocks per page: about 2 MiB when blocks are small, but never so large that
    the arena has fewer than MIN_PAGES pages. Pages carry one size class each, so few
    large pages would strand INT4 objects next to fp16 ones and waste the budget's tail."""
    per_page = min(PAGE_TARGET_BYTES // block_bytes, arena_bytes // (MIN_PAGES * block_bytes))
    return block_bytes * max(1, per_page)


@dataclass
class KVSetup:
    sizes: BlockSizes
    table: PageTable
    manager: TierManager
    mover: Mover
    l1_bytes: int
    l2_bytes: int


def resolve_budget(value, whole: int, field: str, source: str, limit: int, limit_name: str) -> int:
    try:
        n = parse_budget(value, whole)
    except ValueError as e:
        raise ScenarioError(f"{source}: {field}: {e}") from None
    if n > limit:
        raise ScenarioError(f"{source}: {field}: got {value!r} = {fmt_bytes(n)}, expected at most "
                            f"{limit_name} ({fmt_bytes(limit)})")
    return n


def build_kv(s: Scenario, backend, profile: Profile, working_set_bytes: int, min_l1_blocks: int,
             source: str, tenants_l1_bytes: int | None = None) -> KVSetup:
    sizes = BlockSizes.of(s)
    l1 = resolve_budget(s.memory.l1_budget, working_set_bytes, "memory.l1_budget", source,
                        profile.hbm_bytes, f"the HBM of profile {profile.name}")
    l2 = resolve_budget(s.memory.l2_budget, working_set_bytes, "memory.l2_budget", source,
                        profile.host_pinned_bytes, f"the pinned host memory of profile {profile.name}")
    page = page_bytes_for(sizes.fp16, l1)
    need = min_l1_blocks * sizes.fp16
    if l1 < need:
        raise ScenarioError(
            f"{source}: memory.l1_budget: got {s.memory.l1_budget!r} = {fmt_bytes(l1)}, below what "
            f"one step needs: {min_l1_blocks} blocks of {fmt_bytes(sizes.fp16)} = {fmt_bytes(need)}")
    # L2 never needs more than the working set; sizing it so keeps host memory honest.
    l2 = min(l2, working_set_bytes + page)
    l2 = max(l2, page)
    classes = (sizes.int4, sizes.fp16)
    l1_space = SlabAllocator(backend.memory("l1", l1, "device"), classes, page)
    l2_space = SlabAllocator(backend.memory("l2", l2, "pinned_host"), classes,
                             page_bytes_for(sizes.fp16, l2))
    # whole 256-byte-aligned slots: an INT4 block of 4-token blocks is not a multiple of 256
    stage_page = round_up(page_bytes_for(sizes.int4, s.memory.staging_blocks * sizes.int4), 256)
    stage_bytes = max(stage_page, s.memory.staging_blocks * sizes.int4)
    staging = SlabAllocator(backend.memory("staging", stage_bytes, "device"), (sizes.int4,),
                            stage_page)
    p = s.policy
    policy = make_policy(p.eviction, heavy_ratio=p.heavy_ratio, sink_blocks=p.sink_blocks)
    table = PageTable()
    manager = TierManager(
        table, Spaces(l1_space, l2_space, staging), policy, Demotion.parse(p.demote),
        Watermarks(p.high_watermark, p.low_watermark, p.eviction_ratio),
        KVPrefetch(p.prefetch_blocks if p.prefetch else 0),
        {Fmt.FP16: sizes.fp16, Fmt.INT4: sizes.int4}, DecisionLog())
    mover = Mover(backend, manager, s.memory.int4_group, sizes.numel)
    return KVSetup(sizes, table, manager, mover, l1_space.capacity_bytes, l2_space.capacity_bytes)


def audit_residency(driver) -> None:
    """With ``checks.residency``, audit the page table against the driver's view of memory
    after a step and accumulate the report on ``driver.residency_report``."""
    if not driver.s.checks.residency:
        return
    rep = driver.backend.residency(driver.table)
    if rep is None:
        return
    if getattr(driver, "residency_report", None) is None:
        driver.residency_report = rep
    else:
        driver.residency_report.merge(rep)
