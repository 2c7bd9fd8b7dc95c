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


def test_disk_rates_are_fitted_from_a_disk_record():
    disk_read, disk_write = Rate(80.0, 6.0), Rate(300.0, 2.5)
    sizes = [1 << 20, 8 << 20, 64 << 20]
    rec = _synthetic_record()
    rec["disk"] = {"directory": "/nvme", "filesystem": "xfs on /dev/nvme0n1", "method": "o_direct",
                   "cache_effects": "none seen", "read_gb_per_s": 6.0, "cached_read_gb_per_s": 20.0,
                   "read": {"bytes": sizes, "seconds": [disk_read.seconds(n) for n in sizes]},
                   "write": {"bytes": sizes, "seconds": [disk_write.seconds(n) for n in sizes]}}
    prof, quality = build_profile("synth", rec)
    assert prof.disk.read.gb_per_s == pytest.approx(6.0) and prof.disk.read.fixed_us == pytest.approx(80.0)
    assert prof.disk.write.gb_per_s == pytest.approx(2.5)
    assert "xfs" in prof.disk.device and prof.measured["disk"]["method"] == "o_direct"
    assert quality["disk_read"] < 1e-6


def test_calibrating_only_the_disk_measures_this_machine_and_keeps_the_base_profile(tmp_path):
    out = tmp_path / "profiles" / "here.yaml"
    res = CliRunner().invoke(main, ["calibrate", "--backend", "disk", "--base", "h200", "--quick",
                                    "--disk-dir", str(tmp_path / "disk"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    prof, base = load_profile(str(out)), load_profile("h200")
    assert prof.name == "here" and prof.link == base.link and prof.kernels == base.kernels
    assert prof.disk.read.gb_per_s > 0 and prof.disk.write.gb_per_s > 0
    assert prof.disk != base.disk and "measured" in prof.disk.device
    assert prof.measured["disk"]["method"] in ("o_direct", "fadvise_dontneed")
    assert "disk at" in out.read_text().splitlines()[0]
    assert not [p for p in (tmp_path / "disk").iterdir()], "temporary files were left behind"
    raw = json.loads(out.with_suffix(".measurements.json").read_text())
    assert len(raw["disk"]["read"]["bytes"]) >= 3


def test_calibrating_the_disk_without_a_base_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["calibrate", "--backend", "disk", "-o", str(tmp_path / "p.yaml")])
    assert res.exit_code == 2 and "--base PROFILE is needed" in res.output
