"""What every KV scenario sets up the same way: block sizes, the three allocators over
the backend's memory, the manager and the mover; and the budget checks that must fail at
set-up, naming the numbers, rather than mid-run."""

from __future__ import annotations

from ..errors import ScenarioError
from ..kv.shape import KVShape
from ..kv.stack import KVStack, PolicySettings, build_stack, page_bytes_for  # noqa: F401
from ..scenarios.schema import Scenario
from ..sim.profile import Profile
from ..units import fmt_bytes, parse_budget


def shape_of(s: Scenario) -> KVShape:
    """The scenario's KV geometry (token-major blocks, fp16: ``synapse.hw.kv_layout``)."""
    m = s.model
    return KVShape(m.layers, m.kv_heads, m.head_dim, s.memory.block_tokens, s.memory.int4_group,
                   int4_keys=s.memory.int4_keys)


def policy_of(s: Scenario) -> PolicySettings:
    p = s.policy
    return PolicySettings(p.eviction, p.demote, p.heavy_ratio, p.sink_blocks, p.high_watermark,
                          p.low_watermark, p.eviction_ratio,
                          p.prefetch_blocks if p.prefetch else 0)


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
             source: str) -> KVStack:
    """The scenario's KV stack: budgets resolved against its working set and the
    profile's memory, refused at set-up (naming the numbers) when one step cannot fit."""
    shape = shape_of(s)
    l1 = resolve_budget(s.memory.l1_budget, working_set_bytes, "memory.l1_budget", source,
                        profile.hbm_bytes, f"the HBM of profile {profile.name}")
    l2 = resolve_budget(s.memory.l2_budget, working_set_bytes, "memory.l2_budget", source,
                        profile.host_pinned_bytes, f"the pinned host memory of profile {profile.name}")
    need = min_l1_blocks * shape.fp16_bytes
    if l1 < need:
        raise ScenarioError(
            f"{source}: memory.l1_budget: got {s.memory.l1_budget!r} = {fmt_bytes(l1)}, below what "
            f"one step needs: {min_l1_blocks} blocks of {fmt_bytes(shape.fp16_bytes)} = {fmt_bytes(need)}")
    # L2 never needs more than the working set; sizing it so keeps host memory honest.
    l2 = min(l2, working_set_bytes + page_bytes_for(shape.fp16_bytes, l1))
    return build_stack(shape, backend, l1, l2, policy_of(s), staging_blocks=s.memory.staging_blocks)


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


def finish_step(driver) -> dict:
    """End of a driver's step: what compaction owes is submitted and the backend reaches
    its safe point (``Mover.step_done``); returns the timeline columns every KV driver
    adds: the decision time so far (measured host time: the hardware backends only) and
    the L1 pages mapped (virtual-memory arena only)."""
    driver.mover.step_done()
    be = driver.backend
    extra = {} if be.simulated else {"decision_s": driver.mgr.decision_s}
    pages = be.l1_pages()
    if pages is not None:
        extra["l1_pages"] = pages
    return extra

