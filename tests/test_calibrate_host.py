"""Host time measured, not guessed: the fit of host cost per step, op and row, and
`synapse calibrate --backend cpu`, which runs short pieces of every driver to get it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import invoke, one_line_error
from synapse.calibrate_host import HostSample, fit_host
from synapse.sim.profile import load_profile


def _samples(step_us, submit_us, row_us, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, (steps, ops, rows) in enumerate([(24, 93, 244), (48, 216, 613), (0, 42, 0),
                                            (98, 335, 220), (121, 386, 195), (290, 1278, 1081),
                                            (10, 500, 40)]):
        host = (steps * step_us + ops * submit_us + rows * row_us) * 1e-6
        out.append(HostSample(f"run {i}", steps, ops, rows, host * (1 + noise * rng.standard_normal())))
    return out


def test_known_host_costs_are_recovered():
    fit = fit_host(_samples(300.0, 20.0, 5.0))
    assert fit["step_us"] == pytest.approx(300.0, rel=1e-9)
    assert fit["submit_us"] == pytest.approx(20.0, rel=1e-9)
    assert fit["per_item_us"] == pytest.approx(5.0, rel=1e-9)
    assert fit["terms_fitted"] == ["step", "submit", "row"]
    assert fit["rel_error"]["max"] < 1e-9


def test_noisy_runs_give_close_costs_and_their_residuals():
    fit = fit_host(_samples(300.0, 20.0, 5.0, noise=0.05))
    assert fit["step_us"] == pytest.approx(300.0, rel=0.25)
    assert fit["submit_us"] == pytest.approx(20.0, rel=0.25)
    for r in fit["runs"]:  # every run's residual is reported, as predicted - measured
        assert r["rel_error"] == pytest.approx((r["predicted_s"] - r["host_s"]) / r["host_s"])
    assert 0 < fit["rel_error"]["max"] < 0.2


def test_a_cost_that_fits_negative_is_dropped_not_kept():
    # host time that does not grow with rows, and a little less for runs with many rows
    s = [HostSample(x.piece, x.steps, x.ops, x.rows, x.host_s - x.rows * 1e-6)
         for x in _samples(300.0, 20.0, 0.0)]
    fit = fit_host(s)
    assert fit["per_item_us"] == 0.0 and "row" not in fit["terms_fitted"]
    assert fit["step_us"] > 0 and fit["submit_us"] > 0


def test_too_few_runs_are_refused():
    with pytest.raises(ValueError, match="at least 3 runs"):
        fit_host(_samples(1, 1, 1)[:2])


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    r = invoke("calibrate", "--backend", "cpu", "--quick", "-o", d / "cpu.yaml")
    assert r.exit_code == 0, r.output
    return d, r.output


def test_calibrating_the_cpu_backend_writes_a_table_profile_and_reports_its_fits(cpu_profile):
    d, out = cpu_profile
    prof = load_profile(str(d / "cpu.yaml"))
    assert prof.predictor == "table" and prof.host.runs_ops
    assert prof.host.step_us > 0 or prof.host.submit_us > 0
    m = json.loads((d / "cpu.measurements.json").read_text())["driver_runs"]
    assert m["backend"] == "cpu" and len(m["host_samples"]) == 4  # --quick: one piece a driver
    table = json.loads((d / "cpu.optable.json").read_text())["kinds"]
    assert {"attention", "copy_h2d", "memset"} <= set(table)
    # the terminal shows each run's residual and each op kind's error
    for piece in ("needle (tiny)", "streaming (tiny)", "tsunami (tiny)", "tenants (tiny)"):
        assert piece in out
    assert "attention" in out and "table |error| p50/p90" in out


def test_the_simulator_runs_on_the_cpu_calibrated_profile(cpu_profile):
    from conftest import run
    from synapse.scenarios.tiny import TINY_NEEDLE
    d, _ = cpu_profile
    r = run("needle", TINY_NEEDLE + [f"profile={d / 'cpu.yaml'}"])
    ref = run("needle", TINY_NEEDLE)
    assert r.decisions == ref.decisions
    assert r.metrics["host_busy_s"] > ref.metrics["host_busy_s"]  # ops are host time now


def test_a_profile_refits_from_its_recorded_measurements(cpu_profile, tmp_path):
    d, _ = cpu_profile
    r = invoke("calibrate", "--backend", "cpu", "-o", tmp_path / "again.yaml",
               "--from-measurements", d / "cpu.measurements.json")
    assert r.exit_code == 0, r.output
    a, b = load_profile(str(d / "cpu.yaml")), load_profile(str(tmp_path / "again.yaml"))
    assert a.host == b.host


def test_a_measurement_file_without_its_runs_is_one_line(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"driver_runs": {"backend": "cpu", "host_samples": []}}))
    one_line_error(invoke("calibrate", "--backend", "cpu", "-o", tmp_path / "p.yaml",
                          "--from-measurements", bad), "m.json", "driver_runs")


def test_a_gpu_record_with_driver_runs_gets_host_costs_and_a_table(cpu_profile, tmp_path):
    """The cuda branch without a GPU: a recorded micro-benchmark record plus driver runs
    (here the cpu ones, relabelled) fit a profile whose ops are not host time."""
    from test_calibrate import _synthetic_record
    d, _ = cpu_profile
    runs = json.loads((d / "cpu.measurements.json").read_text())["driver_runs"]
    rec = dict(_synthetic_record(), driver_runs=dict(runs, backend="cuda"))
    (tmp_path / "m.json").write_text(json.dumps(rec))
    r = invoke("calibrate", "-o", tmp_path / "gpu.yaml", "--from-measurements", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    assert "H2D 53.0 GB/s" in r.output and "us per step" in r.output
    prof = load_profile(str(tmp_path / "gpu.yaml"))
    assert prof.predictor == "table" and not prof.host.runs_ops
    mb = prof.measured["driver_fit"]["host_micro_benchmark"]
    assert mb["submit_us"] == rec["host_submit_us"]  # the micro-benchmark is kept beside


@pytest.mark.cuda
def test_driver_pieces_run_and_fit_on_the_gpu():
    try:
        from synapse.hw.cuda_backend import CudaBackend
        CudaBackend().close()
    except Exception as e:  # ImportError, BackendUnavailable
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU: {e}")
    from synapse.calibrate_host import PIECES, run_pieces
    from synapse.sim.predictor import fit_table
    samples, records = run_pieces("cuda", "h200", pieces=PIECES["cpu"], repeats=1)
    fit = fit_host(samples)
    assert all(s.host_s > 0 for s in samples)
    assert fit["rel_error"]["max"] < 1.0, fit["runs"]
    assert {"attention", "copy_h2d"} <= set(fit_table(records))


def test_every_cuda_piece_is_a_valid_scenario_on_the_simulator():
    """The cuda calibration runs these on the GPU; one that the loader or the driver
    refuses stops `synapse calibrate --backend cuda` (an 8k needle at 20% once did)."""
    from synapse.calibrate_host import PIECES
    from synapse.runner import run_scenario
    from synapse.scenarios.loader import load_scenario
    for name, overrides, what in PIECES["cuda"]:
        sc = load_scenario(name, list(overrides) + ["profile=h200", "checks.data=false"])
        assert run_scenario(sc, "sim").result["metrics"]["run_time_s"] > 0, what


def test_the_pieces_and_their_repeats_are_chosen_on_the_command_line(monkeypatch):
    """--pieces and --repeats pick what run_pieces runs: every piece three times by
    default, the smaller of each driver once with --quick, either way when told."""
    from synapse import calibrate_host
    from synapse.calibrate import measure_driver_runs
    seen = []
    monkeypatch.setattr(calibrate_host, "run_pieces",
                        lambda backend, base, progress, pieces, repeats: seen.append(
                            (len(pieces), repeats, {p[0] for p in pieces})) or ([], []))
    every = calibrate_host.PIECES["cuda"]
    drivers = {p[0] for p in every}
    for kw, want in [({}, (len(every), 3)), ({"quick": True}, (len(drivers), 1)),
                     ({"quick": True, "pieces": "all"}, (len(every), 1)),
                     ({"pieces": "small", "repeats": 2}, (len(drivers), 2))]:
        measure_driver_runs("cuda", "h200", None, **kw)
        assert seen[-1][:2] == want, kw
        assert seen[-1][2] == drivers  # every driver keeps a piece
