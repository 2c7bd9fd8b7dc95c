"""``synapse audit``: the audits run for real, their checks fail when the property they
check is broken, and the grade is the stated function of the checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from synapse.cli import main
from synapse.hw.host_backend import HostBackend
from synapse.monitor.audit import grade, integrity, isolation, latency
from synapse.scenarios.tiny import TINY_TENANTS


def _by_name(checks):
    return {c.name: c for c in checks}


def test_the_cpu_audit_writes_a_report_and_a_summary(tmp_path):
    r = CliRunner().invoke(main, ["audit", "--backend", "cpu", "--out", str(tmp_path),
                                  "--seed", "5"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "readiness_report.json").read_text())
    assert set(rep["audits"]) == {"integrity", "latency", "resiliency", "isolation", "residency"}
    assert rep["seed"] == 5 and rep["grade"] in "ABCDF"
    checks = {c["name"]: c for a in rep["audits"].values() for c in a["checks"]}
    assert checks["blocks_lost_at_10x"]["value"] == 0
    assert checks["fp16_roundtrip_bytes_mismatched"]["passed"] is True
    assert checks["cross_tenant_accesses_served"]["value"] == 0
    assert checks["residency_violations"]["passed"] is None  # no driver here: not assumed
    assert (tmp_path / "summary.txt").read_text().startswith("synapse audit: backend cpu")
    assert f"grade {rep['grade']}" in r.output


def test_the_simulator_audit_reads_bytes_on_the_cpu_backend(tmp_path):
    r = CliRunner().invoke(main, ["audit", "--backend", "sim", "--out", str(tmp_path), "-q"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "readiness_report.json").read_text())
    assert rep["data_backend"] == "cpu"
    assert rep["audits"]["latency"]["details"]["clock"] == "simulated"


def test_an_unknown_preset_is_one_line_and_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["audit", "--preset", "huge", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "huge" in r.output


def test_int4_checks_fail_when_the_quantizer_is_off_by_a_step(monkeypatch):
    from synapse.hw import int4

    real = int4.pack_into

    def sloppy(x, group_size, out):  # codes shifted by one: a step of error everywhere
        t = real(x, group_size, out)
        t.packed[:] = np.minimum(t.packed & 0x0F, 14) + 1 | (t.packed & 0xF0)
        return t
    monkeypatch.setattr(int4, "pack_into", sloppy)
    c = _by_name(integrity.run(HostBackend(), seed=1)[0])
    assert c["int4_worst_element_over_bound"].passed is False


def test_the_round_trip_check_fails_when_l2_corrupts_a_byte(monkeypatch):
    from synapse.hw.host_backend import HostBackend as HB
    be = HB()
    real = be._execute

    def corrupt(op):
        out = real(op)
        if getattr(op, "direction", None) == "d2h" and op.dst_space == "l2":
            be._mem["l2"].view(int(op.dst_offsets[0]), 1)[0] ^= 1
        return out
    monkeypatch.setattr(be, "_execute", corrupt)
    c = _by_name(integrity.run(be, seed=1)[0])
    assert c["fp16_roundtrip_bytes_mismatched"].value == 1


def test_isolation_checks_fail_when_the_allocator_stops_checking_tenants(monkeypatch):
    from synapse.hw.slab import SlabAllocator
    from synapse.kv.slots import SlotArena
    for alloc in (SlabAllocator, SlotArena):  # L2 and staging; L1
        monkeypatch.setattr(alloc, "check_access", lambda self, tenant, slab: None)
        monkeypatch.setattr(alloc, "all_accessible", lambda self, tenants, slabs: True)
    checks, details, _ = isolation.run(HostBackend(), TINY_TENANTS, seed=1)
    c = _by_name(checks)
    assert c["cross_tenant_accesses_served"].passed is False
    served = [p for p, denied in details["paths"].items() if not denied]
    assert "read_l1_block" in served and "demote_into_own_l2_slab" in served


def test_isolation_checks_fail_when_freed_memory_is_not_cleared(monkeypatch):
    from synapse.hw.memory import HostMemory
    monkeypatch.setattr(HostMemory, "zero", lambda self, offset, nbytes: None)
    c = _by_name(isolation.run(HostBackend(), TINY_TENANTS, seed=1)[0])
    assert c["freed_l1_bytes_nonzero"].value > 0 and c["freed_l2_bytes_nonzero"].value > 0


def test_hidden_fraction_is_the_compute_overlap_of_tier_copies():
    ops = {"kind": ["layer", "copy_h2d", "copy_h2d", "copy_d2h"],
           "purpose": ["forward", "prefetch", "ingest", "demote"],
           "stream": ["compute", "h2d", "h2d", "d2h"],
           "start_s": [0.0, 0.5, 0.0, 2.0], "end_s": [1.0, 1.5, 1.0, 3.0]}
    frac, eff, total = latency.hidden_fraction(ops)
    # tier copies: prefetch 0.5-1.5 (half hidden), demote 2-3 (not hidden); ingest ignored
    assert total == pytest.approx(2.0) and frac == pytest.approx(0.25)
    assert eff == pytest.approx(0.5)  # 0.5 s hidden of min(2.0 copy, 1.0 compute)


@pytest.mark.parametrize("scores,critical_failed,letter", [
    ([1.0, 1.0], False, "A"), ([1.0, 0.8], False, "B"), ([1.0, 0.5], False, "C"),
    ([0.5, 0.5], False, "D"), ([0.4, 0.4], False, "F"), ([1.0, 1.0], True, "F")])
def test_the_grade_is_the_stated_function_of_the_checks(scores, critical_failed, letter):
    audits = {}
    for i, s in enumerate(scores):
        n_pass = round(s * 10)
        audits[f"a{i}"] = [grade.Check(f"c{j}", j, "", j < n_pass) for j in range(10)]
    audits["a0"].append(grade.Check("crit", 1, "== 0", not critical_failed, critical=True))
    audits["a0"].append(grade.not_graded("skipped", None, "", "not here"))
    _, got = grade.grade(audits)
    assert got == letter


@pytest.mark.cuda
def test_the_cuda_audit_grades_residency_from_the_driver(tmp_path):
    pytest.importorskip("pycuda")
    r = CliRunner().invoke(main, ["audit", "--backend", "cuda", "--out", str(tmp_path), "-q"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "readiness_report.json").read_text())
    checks = {c["name"]: c for a in rep["audits"].values() for c in a["checks"]}
    assert checks["residency_violations"]["passed"] is True
    assert checks["page_table_residency_violations"]["passed"] is True
    assert checks["int4_bytes_differ_from_reference"]["value"] == 0
