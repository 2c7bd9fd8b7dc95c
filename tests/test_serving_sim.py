"""Memory tsunami and tenants on the simulator: backpressure without loss, isolation."""

import numpy as np
import pytest

from conftest import run


@pytest.fixture(scope="module")
def tsunami():
    return run("tsunami", ["checks.invariants=true"])


def test_watermarks_hold_at_every_step(tsunami):
    frac = np.array(tsunami.result["timeline"]["l1_fraction"])
    high = tsunami.result["config"]["policy"]["high_watermark"]
    assert frac.max() <= high
    assert tsunami.metrics["peak_l1_fraction"] <= high


def test_no_block_is_lost_and_every_request_is_served_or_refused(tsunami):
    m = tsunami.metrics
    assert m["lost_blocks"] == 0
    assert m["refusals"] > 0, "the burst must exceed what L1 + L2 can hold"
    assert m["served"] + m["refused"] == m["requests"]
    assert m["unaccounted_requests"] == 0
    assert m["demotions"] > 0 and m["fetches"] > 0, "backpressure must have swapped"


def test_refusals_are_logged_decisions(tsunami):
    refused = [e for e in tsunami.decisions if e[1] == "refuse"]
    assert len(refused) == tsunami.metrics["refusals"]


def test_admission_refused_is_the_exception_type():
    from synapse.drivers.serving import Request, ServingDriver
    from synapse.errors import AdmissionRefused
    from synapse.scenarios.loader import load_scenario
    from synapse.sim.backend import SimBackend
    from synapse.sim.profile import load_profile
    prof = load_profile("h100-sxm")
    d = ServingDriver(load_scenario("tsunami"), SimBackend(prof), prof)
    d.reserved = d.capacity_blocks
    with pytest.raises(AdmissionRefused, match="reserved"):
        d._admit(Request(999, "default", 2048, 64, 0), 0)


@pytest.fixture(scope="module")
def tenants():
    return run("tenants", ["checks.invariants=true"])


def test_cross_tenant_reads_are_refused(tenants):
    m = tenants.metrics
    assert m["cross_tenant_denied"] > 0
    assert m["cross_tenant_leaks"] == 0


def test_tenants_above_their_share_are_swapped_first(tenants):
    t = tenants.metrics["tenants"]
    assert t["c"]["swapped_out"] > 0
    assert t["a"]["swapped_out"] == 0 and t["b"]["swapped_out"] == 0
    assert tenants.metrics["lost_blocks"] == 0
