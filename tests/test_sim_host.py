"""The simulator's host time: what it charges for (steps, submits per op kind, planning
calls, L1 pages mapped and unmapped, pinned zeroing during the run, not set-up) and the
host fit calibrate makes against what the simulator counts in its driver pieces."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import invoke, one_line_error
from synapse.calibrate import write_profile
from synapse.calibrate_host import (HostSample, back_to_back_us, fit_host_counted,
                                    piece_overrides)
from synapse.manager import _decision
from synapse.runner import run_scenario
from synapse.scenarios.loader import load_scenario
from synapse.scenarios.tiny import TINY_NEEDLE, TINY_TSUNAMI
from synapse.sim.backend import SimBackend
from synapse.sim.profile import load_profile

H200_RUNS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "h200-2026-12-01-s3"
PAGE = 64 << 10  # four of the tiny shapes' 16 KiB blocks


def profile_file(tmp_path, name="p", **host):
    prof = load_profile("h200")
    path = tmp_path / f"{name}.yaml"
    write_profile(replace(prof, name=name, host=replace(prof.host, **host)), path)
    return path


def sim_run(scenario, overrides, profile):
    """A run on the simulator and its backend (for what the host was charged for)."""
    seen = {}

    class Probe:
        def __init__(self, driver, backend):
            seen["driver"], seen["backend"] = driver, backend

        def step(self, n):
            pass

        def finish(self, records):
            seen["counts"] = dict(seen["backend"].host_counts)

    sc = load_scenario(scenario, list(overrides) + [f"profile={profile}"])
    r = run_scenario(sc, "sim", observe=Probe)
    return r, seen


def test_host_work_while_the_driver_is_built_is_set_up_not_run_time():
    # the hardware backends start their clocks in run(): host work before it (zeroing a
    # new pinned pool where the host does that, building tables) was never in their figures
    be = SimBackend(load_profile("h200"))
    be.host_work(0.5)

    def process():
        yield be.wait([])
        be.host_work(1e-3)  # during the run: host time

    be.run(process())
    assert be.host_busy_s() == pytest.approx(1e-3)


def test_pinned_zeroing_is_host_work_only_where_the_host_runs_the_ops():
    # on the cuda backend a freed pinned range is zeroed by a D2H copy (PinnedZero), not a
    # host memset: the count the host fit subtracts is the host's memset bytes only
    for runs_ops, counted in ((False, 0), (True, 1 << 20)):
        prof = load_profile("h200")
        be = SimBackend(replace(prof, host=replace(prof.host, runs_ops=runs_ops)))
        mem = be.memory("l2", 1 << 30, "pinned_host")

        def process():
            yield be.wait([])
            mem.zero(0, 1 << 20)

        be.run(process())
        assert be.host_counts["pinned_zero_bytes"] == counted


def test_a_paged_l1_maps_pages_as_its_live_prefix_grows_and_unmaps_them_at_the_safe_point():
    prof = load_profile("h200")
    prof = replace(prof, host=replace(prof.host, page_bytes=PAGE, page_map_us=100.0,
                                      page_unmap_us=40.0))
    be = SimBackend(prof)
    mem = be.paged_memory("l1", 16 * PAGE)
    mem.extent(3 * PAGE + 1)  # four pages
    mem.extent(2 * PAGE)  # shrinks: unmapped only at the safe point
    assert (be.host_counts["pages_mapped"], be.host_counts["pages_unmapped"]) == (4, 0)
    assert be.l1_pages() == 4
    be.step_done()
    assert be.l1_pages() == 2 and be.host_counts["pages_unmapped"] == 2
    assert be.host_busy_s() == pytest.approx(4 * 100e-6 + 2 * 40e-6)


def test_only_mapped_bytes_of_a_paged_l1_are_zeroed():
    prof = load_profile("h200")
    be = SimBackend(replace(prof, host=replace(prof.host, page_bytes=PAGE)))
    mem = be.paged_memory("l1", 16 * PAGE)
    mem.extent(PAGE)
    mem.zero(0, 4 * PAGE)
    mem.zero(2 * PAGE, PAGE)  # past the mapped pages: nothing to zero
    assert be._pending_zero == {"l1": [(0, PAGE)]}


def test_a_paged_l1_changes_no_decision_and_shows_its_pages_in_the_timeline(tmp_path):
    flat = profile_file(tmp_path, "flat")
    paged = profile_file(tmp_path, "paged", page_bytes=PAGE)
    for scenario, tiny in (("needle", TINY_NEEDLE), ("tsunami", TINY_TSUNAMI)):
        a, _ = sim_run(scenario, tiny, flat)
        b, seen = sim_run(scenario, tiny, paged)
        assert a.decisions == b.decisions, scenario
        pages = b.result["timeline"]["l1_pages"]
        assert max(pages) > 0 and "l1_pages" not in a.result["timeline"]
        assert seen["counts"]["pages_mapped"] >= max(pages)


def test_each_page_mapped_and_unmapped_costs_the_profiles_host_time(tmp_path):
    free = profile_file(tmp_path, "free", page_bytes=PAGE)
    costly = profile_file(tmp_path, "costly", page_bytes=PAGE, page_map_us=80.0,
                          page_unmap_us=30.0)
    a, _ = sim_run("tsunami", TINY_TSUNAMI, free)
    b, seen = sim_run("tsunami", TINY_TSUNAMI, costly)
    c = seen["counts"]
    assert c["pages_mapped"] > 0 and c["pages_unmapped"] > 0
    extra = (80.0 * c["pages_mapped"] + 30.0 * c["pages_unmapped"]) * 1e-6
    assert b.metrics["host_busy_s"] - a.metrics["host_busy_s"] == pytest.approx(extra, rel=1e-9)


def test_an_op_kind_with_its_own_submit_cost_is_charged_it(tmp_path):
    base = profile_file(tmp_path, "base", submit_us=20.0)
    att = profile_file(tmp_path, "att", submit_us=20.0, submit_us_by_kind={"attention": 120.0})
    a, _ = sim_run("tsunami", TINY_TSUNAMI, base)
    b, _ = sim_run("tsunami", TINY_TSUNAMI, att)
    n_att = a.ops["kind"].count("attention")
    assert n_att > 0 and a.decisions == b.decisions
    assert b.metrics["host_busy_s"] - a.metrics["host_busy_s"] == \
        pytest.approx(n_att * 100e-6, rel=1e-9)


def test_every_request_an_attention_op_serves_costs_the_profiles_request_time(tmp_path):
    """tsunami batches its running requests into one attention op a step: the cost is per
    request (segment) of each op, and the simulator counts them for calibrate's fit."""
    a, seen = sim_run("tsunami", TINY_TSUNAMI, profile_file(tmp_path, "a"))
    b, _ = sim_run("tsunami", TINY_TSUNAMI, profile_file(tmp_path, "b", request_us=40.0))
    requests = seen["counts"]["requests"]
    steps = a.ops["kind"].count("attention")
    assert requests > steps > 0 and a.decisions == b.decisions  # several requests a step
    assert b.metrics["host_busy_s"] - a.metrics["host_busy_s"] == \
        pytest.approx(requests * 40e-6, rel=1e-9)


def test_every_planning_call_costs_the_profiles_decision_time(tmp_path):
    a, _ = sim_run("needle", TINY_NEEDLE, profile_file(tmp_path, "a"))
    b, seen = sim_run("needle", TINY_NEEDLE, profile_file(tmp_path, "b", decision_us=50.0))
    calls = seen["driver"].mgr.decision_calls
    assert calls == seen["counts"]["decisions"] > 0
    assert b.metrics["host_busy_s"] - a.metrics["host_busy_s"] == \
        pytest.approx(calls * 50e-6, rel=1e-9)


def test_a_planning_call_inside_another_is_timed_and_counted_once():
    class Planner:
        decision_s, decision_calls, _deciding, on_decision = 0.0, 0, False, None

        @_decision
        def background(self):  # plans its prefetches through plan_fetch
            return self.fetch()

        @_decision
        def fetch(self):
            return 1

    p = Planner()
    p.background()
    assert p.decision_calls == 1
    p.fetch()
    assert p.decision_calls == 2


def test_a_bad_per_kind_submit_cost_is_one_line(tmp_path):
    bad = profile_file(tmp_path, "bad")
    bad.write_text(bad.read_text().replace("submit_us_by_kind: {}",
                                           "submit_us_by_kind: {attention: -5}"))
    one_line_error(invoke("run", "needle", "--set", f"profile={bad}", *sum(
        (["--set", o] for o in TINY_NEEDLE), [])), "bad.yaml", "submit_us_by_kind")


# -- the counted fit ------------------------------------------------------------------
def _counts(steps, ops, att, pages, rows=0, zero=0, calls=0, requests=0):
    return {"steps": steps, "ops": ops, "ops_by_kind": {"attention": att},
            "pages_mapped": pages, "pages_unmapped": pages, "rows": rows,
            "pinned_zero_bytes": zero, "decision_calls": calls, "requests": requests}


def test_the_counted_fit_recovers_the_costs_left_after_what_was_measured():
    rng = np.random.default_rng(3)
    fixed = {"memset_gb_per_s": 10.0, "per_item_us": 3.0, "submit_us_by_kind": {"attention": 100.0}}
    samples, counts = [], []
    for i in range(8):
        c = _counts(int(rng.integers(10, 500)), int(rng.integers(100, 3000)), int(rng.integers(0, 90)),
                    int(rng.integers(0, 4000)), int(rng.integers(0, 9000)), int(rng.integers(0, 2**31)))
        c["ops"] += c["ops_by_kind"]["attention"]
        host = (c["pinned_zero_bytes"] / 10e9 + c["rows"] * 3e-6 + c["ops_by_kind"]["attention"] * 100e-6
                + c["steps"] * 50e-6 + (c["ops"] - c["ops_by_kind"]["attention"]) * 200e-6
                + 2 * c["pages_mapped"] * 60e-6)
        samples.append(HostSample(f"piece {i}", c["steps"], c["ops"], c["rows"], host))
        counts.append(c)
    fit = fit_host_counted(samples, counts, fixed)
    assert fit["step_us"] == pytest.approx(50.0, rel=1e-6)
    assert fit["submit_us"] == pytest.approx(200.0, rel=1e-6)
    assert fit["page_map_us"] == fit["page_unmap_us"] == pytest.approx(60.0, rel=1e-6)
    assert fit["submit_us_by_kind"] == {"attention": 100.0} and fit["rel_error"]["max"] < 1e-9
    assert fit["request_us"] == 0.0 and "request" not in fit["terms_fitted"]  # none counted


def test_the_counted_fit_tells_a_cost_per_request_from_one_per_op_and_per_step():
    """Pieces with many requests per step (tsunami) and few (tenants) pull the per-request
    cost apart from the per-op one."""
    fixed = {"memset_gb_per_s": 10.0, "per_item_us": 0.0, "submit_us_by_kind": {}}
    samples, counts = [], []
    for i, (steps, ops, requests) in enumerate([(30, 70, 450), (60, 130, 1900), (400, 820, 1300),
                                                 (800, 1700, 2500), (64, 200, 64)]):
        c = _counts(steps, ops, 0, 0, requests=requests)
        host = steps * 30e-6 + ops * 25e-6 + requests * 250e-6
        samples.append(HostSample(f"p{i}", steps, ops, 0, host))
        counts.append(c)
    fit = fit_host_counted(samples, counts, fixed)
    assert fit["terms_fitted"] == ["step", "submit", "request"]
    assert (fit["step_us"], fit["submit_us"], fit["request_us"]) == \
        (pytest.approx(30.0), pytest.approx(25.0), pytest.approx(250.0))


def test_timed_page_costs_and_decisions_are_held_not_fitted():
    fixed = {"memset_gb_per_s": 10.0, "per_item_us": 0.0, "submit_us_by_kind": {},
             "page_map_us": 70.0, "page_unmap_us": 20.0, "decision_us": 30.0}
    samples, counts = [], []
    for i, (steps, ops, pages, calls) in enumerate([(10, 100, 50, 40), (40, 150, 400, 90),
                                                     (90, 900, 10, 300)]):
        c = _counts(steps, ops, 0, pages, calls=calls)
        host = steps * 40e-6 + ops * 150e-6 + pages * 90e-6 + calls * 30e-6
        samples.append(HostSample(f"p{i}", steps, ops, 0, host))
        counts.append(c)
    fit = fit_host_counted(samples, counts, fixed)
    assert (fit["page_map_us"], fit["page_unmap_us"], fit["decision_us"]) == (70.0, 20.0, 30.0)
    assert fit["terms_fitted"] == ["step", "submit"]
    assert fit["step_us"] == pytest.approx(40.0) and fit["submit_us"] == pytest.approx(150.0)


def test_a_kinds_submit_cost_is_read_from_its_back_to_back_submits():
    kinds, submits = [], []
    t = 0.0
    for run in range(3):  # runs concatenated: the clock starts again at each
        t = 0.01
        for i in range(30):
            kinds.append("attention")
            submits.append(t)
            t += 120e-6
        kinds.append("copy_h2d")
        submits.append(t + 1e-3)
    us, pairs = back_to_back_us({"kind": kinds, "submit_s": submits}, "attention")
    assert us == pytest.approx(120.0) and pairs == 87
    assert back_to_back_us({"kind": kinds[:40], "submit_s": submits[:40]}, "attention") is None


def test_a_sample_of_an_older_measurements_file_reads_and_finds_its_piece():
    old = {"piece": "tsunami (16 requests x 16)", "steps": 34, "ops": 313, "rows": 3421,
           "host_s": 0.25}
    s = HostSample.from_dict(old)
    assert s.as_dict() == old and s.decision_s is None
    assert piece_overrides(s, "cuda") == ("workload.requests=16", "workload.decode_tokens=16")
    assert piece_overrides(HostSample.from_dict(dict(old, piece="gone (x)")), "cuda") is None


def test_the_h200_pieces_fit_page_and_attention_costs_when_told_the_page_size():
    from synapse.calibrate import build_profile, counted_host_fit
    m = json.loads((H200_RUNS / "profile-fitted" / "h200.measurements.json").read_text())
    prof, _ = build_profile("h200", m)
    runs = m["driver_runs"]
    samples = [HostSample.from_dict(s) for s in runs["host_samples"]]
    assert counted_host_fit(prof, runs, samples) is None  # the file predates the page size
    fit = counted_host_fit(prof, dict(runs, l1_page_bytes=2 << 20), samples)
    assert fit["page_bytes"] == 2 << 20 and fit["page_map_us"] > 0
    assert 50.0 < fit["submit_us_by_kind"]["attention"] < 300.0
    assert fit["per_item_us"] == prof.host.per_item_us  # the micro-benchmark's, not fitted


def test_calibrate_refits_an_older_gpu_measurements_file(tmp_path):
    src = H200_RUNS / "profile-fitted" / "h200.measurements.json"
    r = invoke("calibrate", "-o", tmp_path / "again.yaml", "--from-measurements", src)
    assert r.exit_code == 0, r.output
    prof = load_profile(str(tmp_path / "again.yaml"))
    assert prof.host.page_bytes == 0 and prof.host.step_us > 0  # the plain fit, as before


def test_pieces_that_timed_their_pages_and_decisions_have_those_costs_measured_not_fitted():
    from synapse.calibrate import build_profile, counted_host_fit
    m = json.loads((H200_RUNS / "profile-fitted" / "h200.measurements.json").read_text())
    prof, _ = build_profile("h200", m)
    runs = dict(m["driver_runs"], l1_page_bytes=2 << 20)
    # what calibrate records now, made up here in round figures: 80 us a map, 30 an unmap
    samples = [replace(HostSample.from_dict(s), decision_s=0.5 * s["host_s"],
                       vmm={"page_bytes": 2 << 20, "maps": 100, "map_s": 0.008,
                            "unmaps": 100, "unmap_s": 0.003})
               for s in runs["host_samples"]]
    fit = counted_host_fit(prof, runs, samples)
    assert fit["page_map_us"] == pytest.approx(80.0) and fit["page_unmap_us"] == pytest.approx(30.0)
    assert "page" not in fit["terms_fitted"] and fit["measured"]["page_costs_timed"]
    assert fit["decision_us"] > 0.0 and fit["measured"]["decision_s"] is not None


@pytest.mark.cuda
def test_a_cuda_piece_records_its_decisions_and_the_l1_arenas_page_timers():
    try:
        from synapse.hw.cuda_backend import CudaBackend
        CudaBackend().close()
    except Exception as e:  # ImportError, BackendUnavailable
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU: {e}")
    from synapse.calibrate_host import PIECES, run_pieces
    piece = [p for p in PIECES["cuda"] if p[0] == "tsunami"][:1]
    (s,), _ = run_pieces("cuda", "h200", pieces=piece, repeats=1)
    assert s.overrides == tuple(piece[0][1]) and s.decision_s > 0 and s.decision_calls > 0
    if s.vmm is None:
        pytest.skip("L1 is one allocation here (no CUDA virtual memory): no pages to time")
    assert s.vmm["maps"] > 0 and s.vmm["map_s"] > 0 and s.vmm["page_bytes"] > 0


def test_a_piece_without_a_tier_manager_leaves_the_decision_cost_measured():
    """Streaming has no tier manager (no decision_s, no planning calls in its replay):
    the decision cost comes from the pieces that planned, not from none of them (the
    H200 quick calibration of 2026-12-02 got 0 us per call so)."""
    from synapse.calibrate import build_profile, counted_host_fit
    m = json.loads((H200_RUNS / "profile-fitted" / "h200.measurements.json").read_text())
    prof, _ = build_profile("h200", m)
    runs = dict(m["driver_runs"], l1_page_bytes=2 << 20)
    samples = []
    for s in runs["host_samples"]:
        smp = HostSample.from_dict(s)
        if not smp.piece.startswith("streaming"):  # made-up round figures, as calibrate records
            smp = replace(smp, decision_s=0.4 * smp.host_s, decision_calls=10,
                          vmm={"page_bytes": 2 << 20, "maps": 100, "map_s": 0.008,
                               "unmaps": 100, "unmap_s": 0.003})
        samples.append(smp)
    fit = counted_host_fit(prof, runs, samples)
    assert fit["decision_us"] > 0.0 and fit["measured"]["decision_s"] is not None
    assert [d is None for d in fit["measured"]["decision_s"]] == \
        [s.piece.startswith("streaming") for s in samples]
