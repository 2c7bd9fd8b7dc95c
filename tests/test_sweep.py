"""`synapse sweep`: grids, the table, resuming, failures, bad input, and Dask == local."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synapse.errors import ScenarioError
from synapse.grid import expand_range, parse_grid
from synapse.sweep import plan_sweep, run_point, run_sweep
from cli_helpers import invoke, one_line_error

# A needle run of about 0.1 s: sweeps here have a handful of points.
TINY = ["workload.context_tokens=2048", "workload.decode_steps=16",
        "workload.prefill_chunk_tokens=256", "model.layers=2", "model.kv_heads=2",
        "model.head_dim=64"]
SETS = [a for s in TINY for a in ("--set", s)]




def rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "sweep.jsonl").read_text().splitlines()]


# -- the grid ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, values", [
    ("1:4", ["1", "2", "3", "4"]),
    ("8GiB:32GiB:8GiB", ["8GiB", "16GiB", "24GiB", "32GiB"]),
    ("5%:20%:5%", ["5%", "10%", "15%", "20%"]),
    ("0.1:0.3:0.1", ["0.1", "0.2", "0.3"]),          # decimal steps: no 0.30000000000000004
    ("10:25:10", ["10", "20"]),                      # stop included only when reached
    ("3:3", ["3"]),
])
def test_ranges_include_their_end_and_keep_units(text, values):
    assert expand_range("k", text) == values


def test_lists_and_ranges_make_axes_in_order():
    axes = parse_grid(["policy.eviction=lru,h2o", "memory.l1_budget=10%:20%:10%"])
    assert [(a.key, a.values) for a in axes] == [("policy.eviction", ("lru", "h2o")),
                                                ("memory.l1_budget", ("10%", "20%"))]


@pytest.mark.parametrize("spec, fragment", [
    ("seed=5:1", "empty range"),
    ("seed=1:5:0", "empty range"),
    ("memory.l1_budget=5%:20GiB:5%", "share one unit"),
    ("seed=", "empty value"),
    ("seed=1,,2", "empty value"),
    ("seed=1,1", "repeated value"),
    ("seed", "key=v1,v2"),
])
def test_bad_grid_specs_are_refused(spec, fragment):
    with pytest.raises(ScenarioError, match=fragment):
        parse_grid([spec])


def test_every_point_is_checked_before_anything_runs():
    with pytest.raises(ScenarioError, match="policy.eviction.*'lur'"):
        plan_sweep("needle", ["policy.eviction=lru,lur"], TINY)
    plan = plan_sweep("needle", ["policy.eviction=lru,h2o", "seed=0:2"], TINY)
    assert len(plan.points) == 6
    assert plan.points[5].values == {"policy.eviction": "h2o", "seed": "2"}


# -- bad input on the command line: one line, exit 2, nothing written --------------------
@pytest.mark.parametrize("grid, fragments", [
    ("memory.l1_budgt=10%,20%", ("--grid memory.l1_budgt", "did you mean 'memory.l1_budget'")),
    ("l1_budget=10%", ("did you mean 'memory.l1_budget'",)),
    ("profile.link.h2d_gbps=10", ("did you mean 'profile.link.h2d_gb_per_s'",)),
    ("memory.l1_budget=40%:10%:10%", ("empty range",)),
    ("policy.eviction=lru,lur", ("policy.eviction", "'lur'")),
    ("profile.link.h2d_gb_per_s=-5", ("profile.link.h2d_gb_per_s", "got -5", "[0.001, 1e+06]")),
])
def test_bad_grid_is_one_line_and_writes_nothing(tmp_path, grid, fragments):
    out = tmp_path / "sweep"
    one_line_error(invoke("sweep", "needle", *SETS, "--grid", grid, "--out", out, "-q"),
                   *fragments)
    assert not out.exists()


def test_a_folder_holding_another_sweep_is_refused_untouched(tmp_path):
    out = tmp_path / "sweep"
    assert invoke("sweep", "needle", *SETS, "--grid", "seed=0,1", "-j", 1, "--out", out,
                  "-q").exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    r = invoke("sweep", "needle", *SETS, "--grid", "seed=0,1,2", "-j", 1, "--out", out, "-q")
    one_line_error(r, "another grid")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    one_line_error(invoke("sweep", "needle", *SETS, "--grid", "seed=0", "--out",
                          tmp_path / "other"), "not a sweep folder")


# -- the table --------------------------------------------------------------------------
def test_one_row_per_point_with_grid_values_and_metrics(tmp_path):
    out = tmp_path / "sweep"
    r = invoke("sweep", "needle", *SETS, "--grid", "policy.eviction=lru,belady",
               "--grid", "memory.l1_budget=20%,40%", "-j", 1, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    table = rows(out)
    assert [(t["policy.eviction"], t["memory.l1_budget"]) for t in table] == [
        ("lru", "20%"), ("lru", "40%"), ("belady", "20%"), ("belady", "40%")]
    assert all(t["status"] == "ok" and t["error"] == "" for t in table)
    assert all(0 <= t["l1_hit_rate"] <= 1 and t["run_time_s"] > 0 for t in table)
    csv_lines = (out / "sweep.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith(
        "point,policy.eviction,memory.l1_budget,status,error,backend,policy,run_time_s")
    for t in table:
        res = json.loads((out / "points" / t["point"] / "result.json").read_text())
        assert res["config"]["policy"]["eviction"] == t["policy.eviction"]
        assert res["config"]["memory"]["l1_budget"] == t["memory.l1_budget"]
        assert (out / "points" / t["point"] / "decisions.jsonl").exists()


def test_profile_fields_are_what_if_knobs(tmp_path):
    """A slower link only changes time: same decisions, longer run."""
    out = tmp_path / "sweep"
    r = invoke("sweep", "needle", *SETS, "--set", "policy.prefetch=false",
               "--grid", "profile.link.h2d_gb_per_s=5,50", "-j", 1, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    slow, fast = rows(out)
    assert slow["run_time_s"] > fast["run_time_s"]
    for t, rate in ((slow, 5.0), (fast, 50.0)):
        d = out / "points" / t["point"]
        res = json.loads((d / "result.json").read_text())
        assert res["config"]["profile"] == f"points/{t['point']}/profile.yaml"
        import yaml
        assert yaml.safe_load((d / "profile.yaml").read_text())["link"]["h2d_gb_per_s"] == rate
    assert ((out / "points" / slow["point"] / "decisions.jsonl").read_text()
            == (out / "points" / fast["point"] / "decisions.jsonl").read_text())


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "sweep"
    # 900GiB is a valid size, refused only when the run starts (more than the HBM).
    grid = ["--grid", "memory.l1_budget=20%,900GiB"]
    r = invoke("sweep", "needle", *SETS, *grid, "-j", 1, "--out", out, "-q")
    assert r.exit_code == 1, r.output
    assert "1 failed" in r.output
    ok, bad = rows(out)
    assert ok["status"] == "ok"
    assert bad["status"] == "error" and "at most the HBM" in bad["error"]
    assert "Traceback" in (out / "points" / bad["point"] / "error.txt").read_text()
    again = invoke("sweep", "needle", *SETS, *grid, "-j", 1, "--out", out, "-q")
    assert "0 ran, 2 already done" in again.output and again.exit_code == 1
    retry = invoke("sweep", "needle", *SETS, *grid, "-j", 1, "--out", out, "-q",
                   "--retry-failed")
    assert "1 ran, 1 already done" in retry.output


# -- resuming ---------------------------------------------------------------------------
class Counting:
    """A point function that counts its calls and is interrupted after ``stop_after``."""

    def __init__(self, stop_after=None):
        self.ran, self.stop_after = [], stop_after

    def __call__(self, task):
        if self.stop_after is not None and len(self.ran) == self.stop_after:
            raise KeyboardInterrupt
        self.ran.append(task["name"])
        return run_point(task)


def test_an_interrupted_sweep_resumes_with_only_the_missing_points(tmp_path):
    out = tmp_path / "sweep"
    plan = plan_sweep("needle", ["policy.eviction=lru,h2o,belady", "seed=0,1"], TINY)
    first = Counting(stop_after=4)
    o = run_sweep(plan, out, jobs=1, point_fn=first)
    assert o.interrupted and o.ran == 4 and len(rows(out)) == 4
    done_at = {p: (out / "points" / p / "row.json").stat().st_mtime_ns for p in first.ran}
    second = Counting()
    o = run_sweep(plan_sweep("needle", ["policy.eviction=lru,h2o,belady", "seed=0,1"], TINY),
                  out, jobs=1, point_fn=second)
    assert o.ok and o.skipped == 4 and o.ran == 2
    assert sorted(second.ran) == sorted(set(p.name for p in plan.points) - set(first.ran))
    assert {p: (out / "points" / p / "row.json").stat().st_mtime_ns for p in first.ran} == done_at
    assert [t["point"] for t in rows(out)] == [p.name for p in plan.points]
    third = Counting()
    assert run_sweep(plan, out, jobs=1, point_fn=third).ran == 0 and third.ran == []


def test_a_killed_sweep_process_resumes(tmp_path):
    """SIGKILL mid-way (no clean-up at all), then the same command: only the rest runs."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "synapse", "sweep", "needle", *SETS,
           "--grid", "seed=0:7", "-j", "1", "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(out.glob("points/*/row.json")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.parent.name for p in out.glob("points/*/row.json"))
    assert 1 <= len(done) < 8, "the sweep must have been killed mid-way"
    mtimes = {p: (out / "points" / p / "row.json").stat().st_mtime_ns for p in done}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{8 - len(done)} ran, {len(done)} already done, 0 failed" in r.stdout
    assert {p: (out / "points" / p / "row.json").stat().st_mtime_ns for p in done} == mtimes
    assert len(rows(out)) == 8


# -- executors --------------------------------------------------------------------------
def _table_without_wall_clock(out: Path) -> list[dict]:
    return [{k: v for k, v in t.items() if k != "wall_s"} for t in rows(out)]


@pytest.fixture(scope="module")
def local_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "sweep"
    r = invoke("sweep", "needle", *SETS, *DASK_GRID, "-j", 2, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    return out


DASK_GRID = ["--grid", "policy.eviction=lru,h2o", "--grid", "memory.l1_budget=20%,30%"]


@pytest.mark.parametrize("where", ["own local cluster", "scheduler address"])
def test_dask_gives_the_same_table_as_local_processes(tmp_path, local_table, where):
    distributed = pytest.importorskip("dask.distributed")
    dask_out = tmp_path / "dask"
    if where == "own local cluster":   # what `--executor dask` starts: worker processes
        r = invoke("sweep", "needle", *SETS, *DASK_GRID, "--executor", "dask", "-j", 2,
                   "--out", dask_out, "-q")
    else:                              # an existing cluster (here: threads in this process)
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                      dashboard_address=None) as cluster:
            r = invoke("sweep", "needle", *SETS, *DASK_GRID, "--executor", "dask",
                       "--scheduler", cluster.scheduler_address, "--out", dask_out, "-q")
    assert r.exit_code == 0, r.output
    assert _table_without_wall_clock(dask_out) == _table_without_wall_clock(local_table)
    for t in rows(local_table):
        for name in ("decisions.jsonl", "ops.json"):
            assert ((local_table / "points" / t["point"] / name).read_text()
                    == (dask_out / "points" / t["point"] / name).read_text())


def test_dask_scheduler_that_is_not_there_is_one_line(tmp_path):
    pytest.importorskip("dask.distributed")
    import dask
    out = tmp_path / "sweep"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        r = invoke("sweep", "needle", *SETS, "--grid", "seed=0", "--executor", "dask",
                   "--scheduler", "tcp://127.0.0.1:9", "--out", out, "-q")
    one_line_error(r, "--scheduler", "cannot connect")
    assert not out.exists()
