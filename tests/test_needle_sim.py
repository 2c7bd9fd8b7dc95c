"""The needle scenario on the simulator at a 20% L1 budget (issue: what must be shown)."""

import pytest

from conftest import run

POLICIES = ("h2o", "lru", "fifo", "sinks", "belady")


@pytest.fixture(scope="module", params=["l2_int4", "drop"])
def results(request):
    from conftest import SMALL_NEEDLE
    return {p: run("needle", SMALL_NEEDLE + [f"policy.eviction={p}",
                                             f"policy.demote={request.param}"]).metrics
            for p in POLICIES}


def test_h2o_keeps_the_needle_in_l1_at_the_question(results):
    assert results["h2o"]["needle_retained"] is True
    assert results["h2o"]["needle_tier_at_question"] == "L1"


@pytest.mark.parametrize("policy", ["lru", "fifo", "sinks"])
def test_recency_and_window_policies_lose_the_needle(results, policy):
    assert results[policy]["needle_retained"] is False


def test_belady_hits_at_least_every_online_policy(results):
    best = results["belady"]["l1_hits"]
    for p in POLICIES:
        assert best >= results[p]["l1_hits"], p


def test_needle_at_the_start_is_kept_by_sinks(small_needle):
    """Sinks lose the needle because it lies in the middle, not because sinks fail."""
    m = run("needle", small_needle + ["policy.eviction=sinks", "workload.needle_position=0.0"]).metrics
    assert m["needle_retained"] is True


def test_offloading_turns_misses_into_l2_hits(results):
    if results["h2o"]["drops"]:
        pytest.skip("drop mode: misses are expected")
    for p in POLICIES:
        assert results[p]["misses"] == 0 and results[p]["lost_blocks"] == 0


def test_runs_are_deterministic(small_needle):
    a = run("needle", small_needle)
    b = run("needle", small_needle)
    assert a.decisions == b.decisions
    assert a.metrics["run_time_s"] == b.metrics["run_time_s"]
