"""The simulator's time model behind one seam: the profile's rates or a table fitted to op
records, chosen by the profile file; host time per step charged at the safe points."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from cli_helpers import invoke, one_line_error
from conftest import run
from synapse.runner import run_scenario
from synapse.scenarios.loader import load_scenario
from synapse.scenarios.tiny import TINY_NEEDLE, TINY_TSUNAMI
from synapse.sim.backend import SimBackend
from synapse.sim.predictor import (ProfilePredictor, TablePredictor, fit_kind, fit_table,
                                   read_table, write_table)
from synapse.sim.profile import load_profile


def test_a_piecewise_linear_duration_is_recovered_from_its_records():
    # 20 us up to 1 MiB, then 2 us per further MiB, plus 3 us per further row
    sizes = np.repeat(2.0 ** np.arange(14, 26), 3)
    rows = np.tile([1, 4, 16], 12)
    x = sizes / 2**20
    t = 20e-6 + np.maximum(0, x - 1) * 2e-6 + (rows - 1) * 3e-6
    f = fit_kind(sizes, t, rows)
    # the knots sit at quantiles of the sizes, not at the bend itself: close, not exact
    assert f.rel_error["max"] < 0.02
    assert f.seconds(48 * 2**20, 1) == pytest.approx(20e-6 + 47 * 2e-6, rel=0.02)  # beyond: continues
    assert f.seconds(2**20, 9) == pytest.approx(20e-6 + 8 * 3e-6, rel=0.02)


def test_the_stated_error_bounds_the_records_it_was_fitted_to():
    rng = np.random.default_rng(0)
    sizes = rng.integers(2**12, 2**24, 400)
    t = (10e-6 + sizes / 50e9) * rng.lognormal(0, 0.1, 400)
    f = fit_kind(sizes, t)
    err = np.abs(np.array([f.seconds(b) for b in sizes]) - t) / t
    assert err.max() == pytest.approx(f.rel_error["max"])
    assert np.median(err) == pytest.approx(f.rel_error["p50"])
    assert f.rel_error["p50"] < 0.1  # the noise is 10%: the fit adds little


@pytest.fixture(scope="module")
def sim_run():
    return run("needle", TINY_NEEDLE)


def test_a_table_fitted_to_a_runs_records_reproduces_them_within_its_error(sim_run, tmp_path):
    fits = fit_table(sim_run.ops)
    assert {"attention", "copy_h2d", "copy_d2h"} <= set(fits)
    write_table(fits, tmp_path / "t.json")
    back = read_table(tmp_path / "t.json")
    o = sim_run.ops
    assert "copy_h2d/ingest" in back and "attention/decode" in back  # per purpose too
    for key, f in back.items():
        rows = [(b, c, e - s) for k, p, b, c, s, e in zip(o["kind"], o["purpose"], o["nbytes"],
                                                          o["count"], o["start_s"], o["end_s"])
                if key in (k, f"{k}/{p}") and e > s]
        errs = [abs(f.seconds(b, c) - d) / d for b, c, d in rows]
        assert max(errs) <= f.rel_error["max"] + 1e-12, key
        assert np.median(errs) == pytest.approx(f.rel_error["p50"]), key


def test_the_table_predictor_replays_the_profile_it_was_fitted_to(sim_run):
    """Records of an uncontended kernel stream follow the profile's lines exactly, so a
    table fitted to them predicts a second run with the same decisions and nearly the
    same time."""
    prof = load_profile("h100-sxm")
    pred = TablePredictor(prof, fit_table(sim_run.ops))
    sc = load_scenario("needle", TINY_NEEDLE)
    from synapse.runner import driver_for
    be = SimBackend(prof, pred)
    drv = driver_for(sc.kind)(sc, be, prof, "test")
    be.run(drv.process())
    assert list(drv.decisions()) == sim_run.decisions
    assert be.now() == pytest.approx(sim_run.metrics["run_time_s"], rel=0.02)
    assert be.environment()["predictor"] == "table"


def _profile_file(tmp_path, **fields):
    import yaml

    from synapse.sim.profile import available_profiles
    base = yaml.safe_load(available_profiles()["h100-sxm"].read_text())
    base.update(fields)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


def test_a_profile_selects_the_table_predictor_with_a_file_beside_it(sim_run, tmp_path):
    write_table(fit_table(sim_run.ops), tmp_path / "p.optable.json")
    p = _profile_file(tmp_path, predictor="table", op_table="p.optable.json")
    prof = load_profile(str(p))
    assert prof.op_table == str((tmp_path / "p.optable.json").resolve())
    r = run("needle", TINY_NEEDLE + [f"profile={p}"])
    assert r.result["environment"]["backend"]["predictor"] == "table"
    assert r.decisions == sim_run.decisions


@pytest.mark.parametrize("fields, fragments", [
    ({"predictor": "vidur"}, ["p.yaml", "predictor", "'vidur'", "one of profile, table"]),
    ({"predictor": "table"}, ["p.yaml", "op_table", "missing"]),
    ({"predictor": "table", "op_table": "nowhere.json"}, ["p.yaml", "op_table", "nowhere.json"]),
])
def test_a_bad_predictor_field_is_one_line(tmp_path, fields, fragments):
    p = _profile_file(tmp_path, **fields)
    one_line_error(invoke("run", "needle", "--set", f"profile={p}", *sum(
        (["--set", o] for o in TINY_NEEDLE), [])), *fragments)


def test_an_op_table_that_is_not_one_is_one_line(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"kinds": {"attention": {"knots_mib": [1],
                                                                          "coef": [1, 2]}}}))
    p = _profile_file(tmp_path, predictor="table", op_table="t.json")
    one_line_error(invoke("run", "needle", "--set", f"profile={p}"), "t.json",
                   "kinds.attention", "coef")


def test_the_host_cost_per_step_is_charged_at_each_safe_point():
    sc = load_scenario("tsunami", TINY_TSUNAMI)
    prof = load_profile(sc.profile)
    busy = {}
    for step_us in (0.0, 250.0):
        p = replace(prof, host=replace(prof.host, step_us=step_us))
        be = SimBackend(p)
        steps = []
        inner = be.step_done
        be.step_done = lambda: (steps.append(1), inner())
        from synapse.runner import driver_for
        drv = driver_for(sc.kind)(sc, be, p, "test")
        be.run(drv.process())
        busy[step_us] = (be.host_busy_s(), len(steps))
    (b0, n0), (b1, n1) = busy[0.0], busy[250.0]
    assert n0 == n1 > 0
    assert b1 - b0 == pytest.approx(n1 * 250e-6, rel=1e-9)


def test_ops_run_by_the_host_itself_are_host_time():
    """A cpu-calibrated profile (``host.runs_ops``): the NumPy backend executes each op
    inside submit, so the model's host busy time includes the ops' durations."""
    prof = load_profile("h100-sxm")
    on_host = replace(prof, host=replace(prof.host, runs_ops=True))
    r0 = run_scenario(load_scenario("needle", TINY_NEEDLE), "sim")
    be = SimBackend(on_host)
    sc = load_scenario("needle", TINY_NEEDLE)
    from synapse.runner import driver_for
    drv = driver_for(sc.kind)(sc, be, on_host, "test")
    be.run(drv.process())
    op_s = sum(r.end_s - r.start_s for r in be.records())
    assert be.host_busy_s() == pytest.approx(r0.metrics["host_busy_s"] + op_s, rel=1e-6)
    assert be.now() >= be.host_busy_s()


def test_the_profile_predictor_is_the_default():
    assert isinstance(SimBackend(load_profile("h100-sxm")).predictor, ProfilePredictor)
    assert SimBackend(load_profile("h100-sxm")).predictor.name == "profile"


def test_ingests_that_dma_from_a_pinned_pool_are_not_charged_a_staging_copy():
    from synapse.ops import Ingest, Region
    prof = load_profile("h200")
    staged = replace(prof, host=replace(prof.host, stage_gb_per_s=4.0, submit_us=10.0))
    dma = replace(staged, host=replace(staged.host, ingest_dma=True))
    op = Ingest(purpose="ingest", dst=(Region("l1", 0, 64 << 20),))
    # 64 MiB at 4 GB/s is 16.8 ms of host copying, on top of the 10 us submit
    assert ProfilePredictor(staged).submit_seconds(op) == pytest.approx(10e-6 + (64 << 20) / 4e9)
    assert ProfilePredictor(dma).submit_seconds(op) == pytest.approx(10e-6)


def test_an_op_smaller_than_its_fit_saw_takes_the_profiles_model_not_the_extrapolation():
    """A memset fit that saw 22 MB and up, with a negative intercept (as the H200's quick
    calibration gave): at 5.5 MB its first segment says 0 s; the profile's fixed cost and
    rate serve instead. Within the range the table serves; a link copy keeps its table."""
    from synapse.ops import Copy, Region, Zero
    from synapse.sim.predictor import KindFit
    prof = load_profile("h100-sxm")
    fit = KindFit(knots_mib=(32.0,), coef=(-8.4e-6, 1.49e-6, 0.0, 0.0),
                  bytes_range=(22 << 20, 1 << 30), n=40, rel_error={})
    queued = KindFit(knots_mib=(32.0,), coef=(40e-6, 1e-6, 0.0, 0.0),
                     bytes_range=(22 << 20, 1 << 30), n=40, rel_error={})
    pred = TablePredictor(prof, {"memset/zero_on_free": fit, "copy_h2d": queued})
    small = Zero(purpose="zero_on_free", regions=(Region("l1", 0, int(5.5 * 2**20)),))
    assert fit.seconds(small.nbytes) == 0.0  # what the table alone would charge
    assert pred.op_seconds(small) == ProfilePredictor(prof).op_seconds(small) > 0
    big = Zero(purpose="zero_on_free", regions=(Region("l1", 0, 64 << 20),))
    assert pred.op_seconds(big) == pytest.approx(fit.seconds(64 << 20))
    copy = Copy(purpose="ingest", direction="h2d", src_offsets=np.zeros(1, np.int64),
                dst_offsets=np.zeros(1, np.int64), sizes=np.array([1 << 20]))
    kept = pred.link_fixed_seconds(copy)
    assert kept == pytest.approx(queued.seconds(1 << 20) - ProfilePredictor(prof).op_seconds(copy))
    assert kept > ProfilePredictor(prof).link_fixed_seconds(copy)
