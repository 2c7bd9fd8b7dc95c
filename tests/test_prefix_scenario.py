"""The prefix_reuse scenario: the same decisions on the simulator and the cpu backend,
restored chunks bit-exact, every tier used, tenants kept apart, the disk timed."""

import numpy as np
import pytest

from synapse.errors import ScenarioError
from synapse.runner import run_scenario
from synapse.scenarios.loader import load_scenario
from synapse.scenarios.tiny import TINY_PREFIX
from synapse.sim.profile import load_profile


def run(backend, *extra):
    return run_scenario(load_scenario("prefix_reuse", TINY_PREFIX + list(extra)), backend)


@pytest.mark.parametrize("write_through", [True, False])
def test_sim_and_cpu_make_the_same_decisions_and_restore_the_computed_bytes(write_through):
    extra = [f"workload.write_through={str(write_through).lower()}", "checks.invariants=true"]
    sim, cpu = run("sim", *extra), run("cpu", *extra)
    assert sim.decisions == cpu.decisions
    m = cpu.metrics
    assert m["restored_checked"] > 0 and m["restored_mismatches"] == 0
    assert all(v > 0 for v in m["restored_tokens"].values()), m["restored_tokens"]
    assert m["tiers"]["l3"]["evictions"] > 0 and m["disk_read_bytes"] > 0
    assert m["restored_tokens"] == sim.metrics["restored_tokens"]
    actions = {a for _, a, _ in cpu.decisions}
    assert {"hit_l1", "hit_l2", "hit_l3", "copy_l3_l2", "copy_l2_l1", "free_l3"} <= actions
    assert ("copy_l1_l2" in actions) and ("copy_l2_l3" in actions)


def test_a_tenant_hits_only_prefixes_it_computed_itself():
    """Both tenants ask about the same documents (the same tokens); only the asking
    tenant's own earlier requests can give a hit."""
    big = ["memory.l1_budget=64MiB", "memory.l2_budget=64MiB", "workload.l3_budget=64MiB",
           "workload.chat_share=0"]
    res = run("sim", *big)
    sc = load_scenario("prefix_reuse", TINY_PREFIX + big)
    from synapse.workloads.prefix_reuse import prefix_requests
    seen = set()
    for req, restored in zip(prefix_requests(sc.workload, sc.seed),
                             res.result["timeline"]["restored_tokens"]):
        own = (req.tenant, req.source) in seen
        assert (restored > 0) == own, (req.rid, req.tenant, req.source)
        seen.add((req.tenant, req.source))
    assert len({s for _, s in seen}) < len(seen)   # some document was asked by both tenants


def test_reuse_lowers_the_simulated_time_to_first_token():
    with_reuse = run("sim").metrics
    without = run("sim", "workload.reuse=false").metrics
    assert without["restored_tokens"] == {"l1": 0, "l2": 0, "l3": 0}
    assert with_reuse["ttft"]["mean_us"] < 0.8 * without["ttft"]["mean_us"]
    assert with_reuse["computed_tokens"] < without["computed_tokens"]


def test_the_simulator_charges_each_chunk_file_the_profiles_disk_rate():
    res = run("sim")
    disk = load_profile("h100-sxm").disk
    ops = res.ops
    rows = [i for i, k in enumerate(ops["kind"]) if k.startswith("disk_")]
    assert rows
    for i in rows:
        rate = disk.read if ops["kind"][i] == "disk_read" else disk.write
        assert ops["end_s"][i] - ops["start_s"][i] == pytest.approx(rate.seconds(ops["nbytes"][i]))


def test_a_budget_below_the_longest_prompt_is_one_line_naming_it():
    with pytest.raises(ScenarioError, match=r"memory\.l1_budget: got '64KiB'.*longest prompt"):
        load_and_build = load_scenario("prefix_reuse", TINY_PREFIX + ["memory.l1_budget=64KiB"])
        run_scenario(load_and_build, "sim")
    with pytest.raises(ScenarioError, match="workload.chunk_tokens: got 30, expected a multiple of 4"):
        run("sim", "workload.chunk_tokens=30")


def test_the_shipped_scenario_runs_on_the_simulator_and_every_tier_serves():
    m = run_scenario(load_scenario("prefix_reuse"), "sim").metrics
    assert all(v > 0 for v in m["restored_tokens"].values())
    assert m["saves_but_no_loads"] is False
    assert np.isfinite(m["ttft"]["p99_us"])


@pytest.mark.cuda
def test_the_cuda_backend_makes_the_simulators_decisions_and_restores_exact_bytes():
    try:
        from synapse.hw.cuda_backend import CudaBackend
        CudaBackend().close()
    except Exception as exc:  # no PyCUDA, no driver, no device
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU ({exc})")
    sim, gpu = run("sim"), run("cuda")
    assert sim.decisions == gpu.decisions
    assert gpu.metrics["restored_checked"] > 0 and gpu.metrics["restored_mismatches"] == 0
