"""`synapse compare`: the simulator against a measured backend, from result files alone."""

from __future__ import annotations

import json

import pytest

from conftest import run
from synapse.compare import compare_paths, diff_decisions, rel_error
from synapse.runner import write_result
from cli_helpers import invoke, one_line_error
from synapse.scenarios.tiny import TINY_NEEDLE

TINY = TINY_NEEDLE




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny needle scenario on the simulator and on the cpu backend, and one more
    sim run with another policy; written like `synapse run` writes them."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, backend, extra in (("sim", "sim", []), ("cpu", "cpu", []),
                                 ("sim-lru", "sim", ["policy.eviction=lru"]),
                                 ("sim-h200", "sim", ["profile=h200"])):
        write_result(run("needle", TINY + extra, backend), root / name)
        out[name] = root / name
    return out


def test_sim_and_cpu_make_identical_decisions_and_errors_are_reported(runs, tmp_path):
    # B is the simulator here: it is still the model, the measured run the reference.
    r = invoke("compare", runs["cpu"] / "result.json", runs["sim"], "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert "model = sim" in r.output and "reference = cpu" in r.output
    assert "decisions: identical" in r.output
    rep = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert rep["model"] == "b" and rep["model_backend"] == "sim"
    assert rep["decisions"]["identical"] and rep["decisions"]["count_model"] > 0
    metrics = {m["metric"]: m for m in rep["metrics"]}
    # The same decisions, so the same counters and bytes: zero error there...
    for key in ("l1_hits", "l2_hits", "misses", "evictions", "bytes_h2d", "bytes_d2h"):
        assert metrics[key]["rel_error"] == 0.0, key
    # ...while time is the model's prediction against a measurement: an error, not None.
    rt = metrics["run_time_s"]
    assert rt["rel_error"] == pytest.approx((rt["model"] - rt["reference"]) / rt["reference"])
    ops = {(x["op"], x["stat"]) for x in rep["latency"] if x["rel_error"] is not None}
    assert {("copy_h2d", "p50_us"), ("copy_d2h", "p99_us"), ("step", "p90_us"),
            ("attention", "p50_us")} <= ops
    assert rep["timelines"]["model"]["t_s"] and rep["timelines"]["reference"]["t_s"]


def test_first_divergence_is_shown(runs, tmp_path):
    import shutil
    other = tmp_path / "edited"
    shutil.copytree(runs["sim"], other)
    lines = (other / "decisions.jsonl").read_text().splitlines()
    k = len(lines) // 2
    d = json.loads(lines[k])
    d["blocks"] = d["blocks"][:-1] + [999_999]
    lines[k] = json.dumps(d)
    (other / "decisions.jsonl").write_text("\n".join(lines) + "\n")
    r = invoke("compare", runs["sim"], other, "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert f"first at #{k}: model step {d['step']} {d['action']}" in r.output
    assert "999999" in r.output


def test_diff_of_traces_of_different_lengths():
    a = [{"step": 0, "action": "insert", "blocks": [1]}]
    d = diff_decisions(a, a + [{"step": 1, "action": "evict", "blocks": [1]}])
    assert not d["identical"] and d["first_divergence"]["index"] == 1
    assert d["first_divergence"]["model"] is None


def test_another_scenario_is_one_line_and_writes_nothing(runs, tmp_path):
    out = tmp_path / "c"
    one_line_error(invoke("compare", runs["sim"], runs["sim-lru"], "-o", out),
                   "different scenarios", "policy.eviction", "'h2o'", "'lru'")
    assert not out.exists()
    one_line_error(invoke("compare", runs["sim"], tmp_path / "nope", "-o", out), "no such")
    assert not out.exists()


def test_the_profile_is_the_model_not_the_scenario(runs):
    """A run timed with another hardware profile is the same scenario: compared, and the
    difference named."""
    rep = compare_paths(runs["sim"], runs["sim-h200"])
    assert rep["ignored_config"]["profile"] == ["h100-sxm", "h200"]
    assert rep["decisions"]["identical"]


@pytest.mark.parametrize("model, ref, err", [
    (1.5, 1.0, 0.5), (0, 0, 0.0), (1, 0, None), (None, 1.0, None), (True, True, 0.0),
    (True, False, None)])
def test_relative_error(model, ref, err):
    assert rel_error(model, ref) == err


def test_two_sweeps_are_matched_point_by_point(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    grid = ["--grid", "policy.eviction=lru,h2o"]
    for backend in ("sim", "cpu"):
        r = invoke("sweep", "needle", *sets, *grid, "--backend", backend, "-j", 1,
                   "--out", tmp_path / backend, "-q")
        assert r.exit_code == 0, r.output
    r = invoke("compare", tmp_path / "cpu", tmp_path / "sim", "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert "decisions identical in 2 of 2 points" in r.output
    rep = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert rep["kind"] == "sweeps" and rep["model_backend"] == "sim"
    assert [p["values"]["policy.eviction"] for p in rep["points"]] == ["lru", "h2o"]
    one_line_error(invoke("compare", tmp_path / "sim", tmp_path / "c"), "expected two runs")
    r = invoke("dashboard", tmp_path / "c", "-o", tmp_path / "c.html")
    assert r.exit_code == 0, r.output
    assert 'id="fig-cmp-sweep-errors"' in (tmp_path / "c.html").read_text()
    # a sweep over the policy alone gets its figure per policy
    r = invoke("dashboard", tmp_path / "sim", "-o", tmp_path / "s.html")
    assert r.exit_code == 0 and 'id="fig-policies"' in (tmp_path / "s.html").read_text()


def test_runs_without_decision_traces_are_not_called_identical(tmp_path):
    from synapse.compare import compare_runs
    from synapse.results import load_run
    from synapse.runner import run_scenario, write_result
    from synapse.scenarios.loader import load_scenario
    run = run_scenario(load_scenario("needle", TINY), "sim")
    a, b = tmp_path / "a", tmp_path / "b"
    write_result(run, a)
    write_result(run, b)
    (b / "decisions.jsonl").unlink()
    rep = compare_runs(load_run(a), load_run(b))
    assert rep["decisions"]["identical"] is None
    r = invoke("compare", a, b)
    assert r.exit_code == 0 and "not compared" in r.output


def test_the_largest_difference_is_explained_with_its_share(tmp_path):
    """Two simulator runs whose profiles differ only in the attention kernel's rate: the
    explanation names attention, and its share is its summed time's difference over the
    run-time difference."""
    import yaml

    from synapse.sim.profile import available_profiles
    prof = yaml.safe_load(available_profiles()["h100-sxm"].read_text())
    prof["kernels"]["attention"]["gb_per_s"] /= 20
    slow = tmp_path / "slow.yaml"
    slow.write_text(yaml.safe_dump(prof))
    write_result(run("needle", TINY + [f"profile={slow}"]), tmp_path / "slow")
    write_result(run("needle", TINY), tmp_path / "base")
    rep = compare_paths(tmp_path / "slow", tmp_path / "base")
    ex = rep["explanation"]
    assert ex["part"] == "attention" and ex["diff_s"] > 0
    parts = {t["part"]: t for t in rep["op_totals"]}
    assert ex["diff_s"] == pytest.approx(parts["attention"]["model_s"] - parts["attention"]["reference_s"])
    assert ex["share"] == pytest.approx(ex["diff_s"] / ex["run_time_diff_s"])
    r = invoke("compare", tmp_path / "slow", tmp_path / "base", "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert "the largest difference is attention" in r.output
    assert "time per op kind" in r.output


def test_a_host_phase_can_be_the_explanation(runs):
    # cpu against the uncalibrated simulator: whatever part it names, it is the part
    # with the largest difference among the op kinds and the host
    rep = compare_paths(runs["sim"], runs["cpu"])
    ex = rep["explanation"]
    largest = max(rep["op_totals"], key=lambda t: abs(t["diff_s"]))
    assert ex["part"] == largest["part"]
    assert "host" in {t["part"] for t in rep["op_totals"]}
    assert ex["sentence"].startswith("run time ")
