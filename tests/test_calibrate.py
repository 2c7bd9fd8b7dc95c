"""Calibration's fitting and file format, from synthetic and recorded measurements."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from synapse.calibrate import build_profile, fit_rate, write_profile
from synapse.cli import main
from synapse.sim.profile import Rate, load_profile

RECORDED = Path(__file__).parent / "data" / "h100.measurements.json"


def test_fit_recovers_fixed_cost_and_bandwidth():
    truth = Rate(fixed_us=6.0, gb_per_s=52.0)
    sizes = np.array([64 << 10, 1 << 20, 16 << 20, 256 << 20])
    calls = np.array([8, 8, 8, 1])
    noise = np.random.default_rng(0).normal(1.0, 0.01, sizes.size)
    t = np.array([truth.seconds(n, c) for n, c in zip(sizes, calls)]) * noise
    r = fit_rate(sizes, t, calls)
    assert r.gb_per_s == pytest.approx(52.0, rel=0.03)
    assert r.fixed_us == pytest.approx(6.0, rel=0.1)


def test_fit_refuses_a_single_size():
    with pytest.raises(ValueError, match="two or more sizes"):
        fit_rate([1 << 20, 1 << 20], [1e-3, 1e-3])


def _synthetic_record():
    def pts(rate, sizes, calls=1):
        return {"bytes": list(sizes), "seconds": [rate.seconds(n, calls) for n in sizes],
                "calls": calls}
    link = Rate(5.0, 53.0)
    kern = Rate(4.0, 2500.0)
    return {
        "environment": {"device": "synthetic GPU"},
        "h2d": pts(link, [1 << 20, 1 << 24, 1 << 28], 4),
        "d2h": pts(Rate(5.0, 54.0), [1 << 20, 1 << 24, 1 << 28], 4),
        "duplex_gb_per_s": 80.0, "copy_engines": 3,
        "attention": pts(Rate(9.0, 2000.0), [1 << 22, 1 << 26, 1 << 30]),
        "int4_quantize": pts(kern, [1 << 22, 1 << 26]),
        "int4_dequantize": pts(kern, [1 << 22, 1 << 26]),
        "memset": pts(Rate(2.0, 2900.0), [1 << 20, 1 << 28]),
        "gemm": {"fixed_us": 6.0, "gb_per_s": 2400.0, "tflops": 700.0},
        "host_submit_us": 11.0, "host_memset_gb_per_s": 8.0,
        "hbm_bytes": 80 << 30, "host_pinned_bytes": 100 << 30,
    }


def test_profile_from_measurements_round_trips_and_loads_by_name(tmp_path, monkeypatch):
    prof, quality = build_profile("synth", _synthetic_record())
    assert prof.link.h2d_gb_per_s == pytest.approx(53.0, rel=1e-6)
    assert prof.link.copy_engines == 3
    assert max(quality.values()) < 1e-6
    monkeypatch.chdir(tmp_path)
    write_profile(prof, tmp_path / "profiles" / "synth.yaml")
    loaded = load_profile("synth")
    assert loaded.kernels.attention.gb_per_s == pytest.approx(2000.0, rel=1e-6)
    assert loaded.measured["environment"]["device"] == "synthetic GPU"


def test_calibrate_cli_from_a_recorded_file(tmp_path):
    rec = tmp_path / "m.json"
    rec.write_text(json.dumps(_synthetic_record()))
    out = tmp_path / "p.yaml"
    r = CliRunner().invoke(main, ["calibrate", "-o", str(out), "--from-measurements", str(rec)])
    assert r.exit_code == 0, r.output
    assert "H2D 53.0 GB/s" in r.output and out.exists()


@pytest.mark.skipif(not RECORDED.exists(), reason="no recorded GPU measurements yet")
def test_profile_from_the_recorded_h100_measurements():
    prof, quality = build_profile("h100", json.loads(RECORDED.read_text()))
    assert 20 < prof.link.h2d_gb_per_s < 80
    assert max(quality.values()) < 0.25, quality
