"""``synapse audit``: run the readiness audits for real and grade them.

Audits (one module each): ``integrity`` (INT4 error against its bound, fp16 round trips
bit-exact), ``latency`` (step p99 with and without L2 traffic, copy/compute overlap),
``resiliency`` (tsunami at 2x/5x/10x capacity), ``isolation`` (cross-tenant access on
every path, zero on free), ``residency`` (tracker coverage, pointer attributes). The
grade is ``grade.grade`` of the checks. Writes ``readiness_report.json`` and
``summary.txt`` (what the command prints).

The simulator moves no bytes, so with ``--backend sim`` the audits that read bytes
(integrity, zero on free, residency coverage) run on the ``cpu`` backend and the report
says so (``data_backend``); the scenario audits run on the simulator.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path

from ...scenarios import tiny
from . import grade, integrity, isolation, latency, residency, resiliency

PRESETS = {
    "tiny": {"needle": tiny.TINY_NEEDLE, "streaming": tiny.TINY_STREAM,
             "tsunami": tiny.TINY_TSUNAMI, "tenants": tiny.TINY_TENANTS},
    "shipped": {"needle": [], "streaming": [], "tsunami": [], "tenants": []},
}
REPORT_FILE = "readiness_report.json"
SUMMARY_FILE = "summary.txt"


def run_audit(backend: str = "cpu", preset: str = "tiny", seed: int | None = None,
              progress: bool = False) -> dict:
    from ...errors import ScenarioError
    from ...runner import environment, make_backend, run_scenario
    from ...scenarios.loader import load_scenario
    from ...sim.profile import load_profile
    if preset not in PRESETS:
        raise ScenarioError(f"--preset: got {preset!r}, expected one of {', '.join(PRESETS)}")
    sizes = PRESETS[preset]
    seed = secrets.randbits(32) if seed is None else seed  # fresh data, recorded
    data_backend = "cpu" if backend == "sim" else backend
    stages = 3 + 3 + len(resiliency.MULTIPLES) + (1 if backend == "cuda" else 0)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=stages, unit="audit", desc=f"audit on {backend}", file=sys.stderr,
                   leave=False)

    def tick(what: str) -> None:
        if bar is not None:
            bar.set_postfix_str(what)
            bar.update(1)

    def run(name: str, overrides: list):
        res = run_scenario(load_scenario(name, overrides), backend)
        tick(name)
        return res

    t0 = time.perf_counter()
    audits, details = {}, {}
    needle_residency = None
    if backend == "cuda":
        needle_residency = run("needle", sizes["needle"] + ["checks.residency=true"]).metrics
    be = make_backend(data_backend, load_profile("h100-sxm"))
    try:
        env = {**environment(), "backend": be.environment()}
        audits["integrity"], details["integrity"] = integrity.run(be, seed)
        tick("integrity")
        audits["isolation"], details["isolation"], spaces = isolation.run(be, sizes["tenants"],
                                                                          seed)
        tick("isolation")
        audits["residency"], details["residency"] = residency.run(be, spaces, needle_residency)
        tick("residency")
    finally:
        be.close()
    audits["latency"], details["latency"] = latency.run(backend, sizes["needle"],
                                                         sizes["streaming"], run)
    audits["resiliency"], details["resiliency"] = resiliency.run(
        sizes["tsunami"], run, moves_data=backend != "sim")
    if bar is not None:
        bar.close()
    score, letter = grade.grade(audits)
    return {"backend": backend, "data_backend": data_backend, "preset": preset, "seed": seed,
            "grade": letter, "score": score, "grade_rule": grade.GRADE_RULE,
            "wall_s": time.perf_counter() - t0, "environment": env,
            "audits": {name: {"score": grade.audit_score(cs),
                              "checks": [c.as_dict() for c in cs],
                              "details": details[name]} for name, cs in audits.items()}}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def summary(report: dict) -> str:
    head = (f"synapse audit: backend {report['backend']}"
            + (f" (bytes read on {report['data_backend']})"
               if report["data_backend"] != report["backend"] else "")
            + f", preset {report['preset']}, seed {report['seed']}, {report['wall_s']:.1f} s")
    score = "-" if report["score"] is None else f"{report['score']:.3f}"
    lines = [head, f"grade {report['grade']} (score {score}): {report['grade_rule']}",
             "checks marked ! are critical; n/a = not graded on this backend (see the report)", ""]
    for name, a in report["audits"].items():
        s = "-" if a["score"] is None else f"{a['score']:.2f}"
        lines.append(f"{name:<11} {s}")
        for c in a["checks"]:
            mark = {True: "ok  ", False: "FAIL", None: "n/a "}[c["passed"]]
            crit = "!" if c["critical"] else " "
            lines.append(f"  {mark}{crit} {c['name']:<40} {_fmt(c['value']):>10}  {c['threshold']}")
            if c["passed"] is False and c["note"]:
                lines.append(f"        {c['note']}")
    return "\n".join(lines)


def write(report: dict, out_dir: Path) -> Path:
    from ...outputs import atomic_write
    from ...runner import _jsonable
    atomic_write(out_dir / REPORT_FILE, json.dumps(report, indent=1, default=_jsonable))
    atomic_write(out_dir / SUMMARY_FILE, summary(report) + "\n")
    return out_dir / REPORT_FILE
