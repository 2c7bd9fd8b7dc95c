"""No finished run is lost: output locations are refused before any work starts, and
every result file is written whole or not at all."""

import json
import os
from pathlib import Path

import pytest

import synapse.runner
from cli_helpers import invoke, one_line_error
from synapse.errors import OutputError
from synapse.outputs import atomic_write, check_dir, check_file
from synapse.scenarios.tiny import TINY_NEEDLE

TINY = [a for s in TINY_NEEDLE for a in ("--set", s)]
AS_ROOT = os.geteuid() == 0


@pytest.fixture
def no_run(monkeypatch):
    """A run that starts fails the test: the refusal must come first."""
    def started(*a, **k):
        raise AssertionError("the run started before its output location was checked")
    monkeypatch.setattr(synapse.runner, "run_scenario", started)


def _a_file(tmp_path) -> Path:
    f = tmp_path / "a-file"
    f.write_text("keep me\n")
    return f


@pytest.mark.parametrize("where, fragments", [
    (lambda t: _a_file(t), ("is a file, expected a folder",)),
    (lambda t: _a_file(t) / "sub" / "dir", ("a-file is a file, expected a folder",)),
    (lambda t: Path("/dev/null"), ("/dev/null", "is a device")),
    (lambda t: Path("/proc/synapse-x"), ("/proc/synapse-x", "cannot create")),
    (lambda t: Path("/proc/synapse-x/y"), ("/proc/synapse-x", "cannot create")),
])
def test_run_refuses_an_unusable_out_before_the_run_starts(tmp_path, no_run, where, fragments):
    out = where(tmp_path)
    one_line_error(invoke("run", "needle", *TINY, "-q", "--out", out), "--out", *fragments)
    if (tmp_path / "a-file").exists():
        assert (tmp_path / "a-file").read_text() == "keep me\n"


@pytest.mark.skipif(AS_ROOT, reason="root writes through permission bits (the /proc cases "
                                    "cover a location no one can write)")
def test_run_refuses_an_unwritable_folder(tmp_path, no_run):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        one_line_error(invoke("run", "needle", *TINY, "-q", "--out", ro / "run"),
                       "--out", "cannot create")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("target, fragments", [
    (lambda t: Path("/dev/null"), ("--prometheus /dev/null", "is a device")),
    (lambda t: t, ("is a folder, expected a file name",)),
    (lambda t: _a_file(t) / "m.prom", ("its folder", "a-file: is a file")),
])
def test_run_refuses_an_unusable_prometheus_file_before_the_run(tmp_path, no_run, target,
                                                                 fragments):
    r = invoke("run", "needle", *TINY, "-q", "--out", tmp_path / "run", "--prometheus",
               target(tmp_path))
    one_line_error(r, *fragments)
    assert not (tmp_path / "run").exists(), "the probe must not leave the folder behind"


def test_a_checked_folder_that_did_not_exist_is_not_left_behind(tmp_path):
    check_dir(tmp_path / "a" / "b" / "c")
    assert not (tmp_path / "a").exists()
    check_dir(tmp_path)  # an existing folder: writable, kept
    assert list(tmp_path.iterdir()) == []


def test_check_file_accepts_a_new_or_regular_file(tmp_path):
    check_file(tmp_path / "new.txt", "-o")
    check_file(_a_file(tmp_path), "-o")
    with pytest.raises(OutputError, match="is a device"):
        check_file("/dev/null", "-o")


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    target.write_text('{"old": true}')

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OutputError, match="result.json: cannot write .No space left on device"):
        atomic_write(target, '{"new": true}')
    assert target.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    target.write_text("old")
    real_replace = os.replace

    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, "new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    p = atomic_write(tmp_path / "x.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def test_results_are_rescued_when_the_final_write_fails(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = synapse.runner.write_result

    def flaky(res, out_dir):
        if Path(out_dir) == out:
            raise OutputError(f"{out}/result.json: cannot write (No space left on device)")
        return real(res, out_dir)
    monkeypatch.setattr(synapse.runner, "write_result", flaky)
    r = invoke("run", "needle", *TINY, "-q", "--out", out)
    one_line_error(r, "No space left on device", "the results were written to")
    rescue = Path(r.output.rsplit("written to ", 1)[1].split(" instead")[0])
    try:
        assert json.loads((rescue / "result.json").read_text())["scenario"] == "needle"
    finally:
        for f in rescue.iterdir():
            f.unlink()
        rescue.rmdir()


def test_prometheus_is_written_whole(tmp_path):
    prom = tmp_path / "m.prom"
    r = invoke("run", "needle", *TINY, "-q", "--out", tmp_path / "run", "--prometheus", prom)
    assert r.exit_code == 0, r.output
    assert "synapse_l1_hits" in prom.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.prom", "run"]


def test_sweep_refuses_an_unusable_out_before_any_point(tmp_path, no_run):
    r = invoke("sweep", "needle", *TINY, "--grid", "policy.eviction=lru,h2o", "-j", "1",
               "--out", _a_file(tmp_path))
    one_line_error(r, "--out", "is a file")


def test_calibrate_refuses_its_output_before_measuring(tmp_path):
    one_line_error(invoke("calibrate", "-o", "/dev/null"), "-o /dev/null", "is a device")
    one_line_error(invoke("calibrate", "-o", _a_file(tmp_path) / "p.yaml"), "a-file: is a file")


def test_calibrate_from_a_record_that_is_not_one_is_one_line(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text('{"h2d": {"bytes": [1, 2], "seconds": [1, 2]}}')
    one_line_error(invoke("calibrate", "-o", tmp_path / "p.yaml", "--from-measurements", bad),
                   "m.json", "not a measurement record")
    bad.write_text("[1, 2]")
    one_line_error(invoke("calibrate", "-o", tmp_path / "p.yaml", "--from-measurements", bad),
                   "m.json", "JSON object")


def test_a_hf_dump_to_a_file_is_one_line_and_leaves_the_file(tmp_path):
    from synapse.hf.result import dump
    f = _a_file(tmp_path)
    with pytest.raises(OutputError, match="a-file: cannot create the folder"):
        dump({"scenario": "x", "metrics": {}}, [], f)
    assert f.read_text() == "keep me\n"
