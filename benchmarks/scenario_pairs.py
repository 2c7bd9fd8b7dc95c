"""Run each shipped scenario on the cuda backend and on the simulator with the same
(calibrated) profile, and print where their times differ.

Used by benchmarks/gpu_session.sh; also works with --backends cpu,sim on any machine.
Writes each run's folder as OUT/NAME-BACKEND and a summary JSON to OUT/scenario_pairs.json (scenarios already
there from an earlier invocation are kept, others replaced).
Data checks are off by default (``checks.data=false``): they read device memory back and
compute references on the host in the middle of the run, which is verification, not the
work being timed; the cuda tests (``pytest -m cuda``) run the same scenarios with them on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from synapse.runner import run_scenario, write_result
from synapse.scenarios.loader import load_scenario

def _op_p50(res: dict) -> dict:
    lat = res["metrics"]["latency"]
    return {k: v["p50_us"] * 1e-6 for k, v in lat.items() if v and v.get("p50_us")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--backends", default="cuda,sim")
    ap.add_argument("--scenarios", default="needle,streaming,tsunami,tenants")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    pair = a.backends.split(",")
    if len(pair) != 2 or not all(pair):
        ap.error(f"--backends: got {a.backends!r}, expected two backends (the hardware, then "
                 f"the model), e.g. cuda,sim or cpu,sim; to predict recorded runs with another "
                 f"profile, run `synapse run NAME --backend sim --set profile=...` and `synapse "
                 f"compare` against the recorded run's folder")
    hw, model = pair
    summary = {}
    for name in a.scenarios.split(","):
        runs = {}
        for backend in (hw, model):
            sc = load_scenario(f"scenarios/{name}.yaml",
                               [f"profile={a.profile}", "checks.data=false", *a.overrides])
            r = run_scenario(sc, backend)
            write_result(r, a.out / f"{name}-{backend}")
            runs[backend] = r
        rh, rm = runs[hw].result["metrics"], runs[model].result["metrics"]
        same = runs[hw].decisions == runs[model].decisions
        row = {"decisions_identical": same,
               "decisions": len(runs[hw].decisions),
               hw: {k: rh.get(k) for k in ("run_time_s", "host_busy_s", "wall_s", "decision_s",
                                           "host_rest_s", "host_rest_fraction")},
               model: {k: rm.get(k) for k in ("run_time_s", "host_busy_s", "wall_s")},
               "run_time_rel_error": (rm["run_time_s"] - rh["run_time_s"]) / rh["run_time_s"],
               "op_p50_s": {hw: _op_p50(runs[hw].result), model: _op_p50(runs[model].result)}}
        summary[name] = row
        print(f"{name:10s} decisions identical: {same}  run time {hw} {rh['run_time_s']:.3f} s "
              f"(host busy {rh.get('host_busy_s') or 0:.3f}, of it decisions "
              f"{rh.get('decision_s') or 0:.3f}; the rest {rh.get('host_rest_fraction') or 0:.0%} "
              f"of the run time)  {model} {rm['run_time_s']:.3f} s "
              f"(host busy {rm.get('host_busy_s') or 0:.3f})  error {row['run_time_rel_error']:+.1%}")
        for op in sorted(set(row["op_p50_s"][hw]) | set(row["op_p50_s"][model])):
            a_, b_ = row["op_p50_s"][hw].get(op), row["op_p50_s"][model].get(op)
            if a_ and b_:
                print(f"    {op:28s} p50 {hw} {a_ * 1e6:9.1f} us  {model} {b_ * 1e6:9.1f} us  "
                      f"{(b_ - a_) / a_:+.1%}")
        sys.stdout.flush()
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "scenario_pairs.json"  # a second invocation (the held-out pair) adds to it
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(old | summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
