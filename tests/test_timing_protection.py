"""Timing protection: a protected tenant's L2 -> L1 fetches complete at whole quanta, so
their duration does not show how much was in L2 or what other tenants moved. Off by
default; decisions do not change with it (only time does)."""

from __future__ import annotations

import math

import pytest

from conftest import run
from synapse.scenarios.tiny import TINY_TENANTS

QUANTUM_US = 500.0
PROTECT_A = TINY_TENANTS[-1].replace("{name: a, share: 0.5,", "{name: a, share: 0.5, protected: true,")


def _protected(quantum_us=QUANTUM_US):
    return TINY_TENANTS[:-1] + [PROTECT_A, f"policy.fetch_quantum_us={quantum_us}"]


def test_it_is_off_by_default():
    m = run("tenants", TINY_TENANTS).metrics
    assert m["padded_fetches"] == 0 and m["fetch_pad_s"] == 0.0


def test_a_protected_tenants_fetches_take_whole_quanta_on_the_simulator():
    from synapse.drivers.serving import ServingDriver
    from synapse.scenarios.loader import load_scenario
    from synapse.sim.backend import SimBackend
    from synapse.sim.profile import load_profile
    sc = load_scenario("tenants", _protected())
    prof = load_profile(sc.profile)
    d = ServingDriver(sc, SimBackend(prof), prof)
    d.backend.run(d.process())
    assert d.padded_fetches > 0 and len(d.protected_fetch_s) == d.padded_fetches
    q = QUANTUM_US * 1e-6
    for s in d.protected_fetch_s:
        k = s / q
        assert k >= 1 - 1e-9 and math.isclose(k, round(k), abs_tol=1e-6), s


def test_padding_changes_time_not_decisions():
    plain = run("tenants", TINY_TENANTS)
    padded = run("tenants", _protected())
    assert padded.decisions == plain.decisions
    assert padded.metrics["sim_time_s"] > plain.metrics["sim_time_s"]
    assert padded.metrics["fetch_pad_s"] > 0


def test_protection_needs_a_protected_tenant():
    m = run("tenants", TINY_TENANTS + ["policy.fetch_quantum_us=500"]).metrics
    assert m["padded_fetches"] == 0


@pytest.mark.parametrize("bad", ["-1", "fast"])
def test_a_bad_quantum_is_refused_with_the_field(bad):
    from synapse.errors import ScenarioError
    with pytest.raises(ScenarioError, match="fetch_quantum_us"):
        run("tenants", TINY_TENANTS + [f"policy.fetch_quantum_us={bad}"])
