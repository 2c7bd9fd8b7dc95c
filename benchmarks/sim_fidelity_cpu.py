"""The calibrated simulator against the cpu backend on a configuration calibration never ran.

    python benchmarks/sim_fidelity_cpu.py --out benchmarks/results/sim_fidelity_cpu.json

Calibrates a profile on the NumPy cpu backend (``synapse calibrate --backend cpu``: host
costs and an op table from short runs of every driver), then runs a tiny needle with
another context length and L1 budget (the held-out check of docs/time-model.md) on the cpu
backend and on the simulator with that profile, ``--repeats`` times, and prints and
writes ``synapse compare``'s end-to-end, per-step and per-op errors and its explanation.
The cpu backend is a NumPy reference on whatever machine runs this: its times are that
machine's (and its load's), not a GPU's. The GPU's version of this check is the
``scenarios`` stage of benchmarks/gpu_session.sh (needle_heldout, tsunami_heldout).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from synapse.compare import compare_paths
from synapse.runner import environment, run_scenario, write_result
from synapse.scenarios.loader import load_scenario
from synapse.scenarios.tiny import TINY_NEEDLE

HELD_OUT = TINY_NEEDLE + ["workload.context_tokens=3072", "workload.decode_steps=24",
                          "memory.l1_budget=35%", "checks.data=false"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="calibrate --quick")
    a = ap.parse_args(argv)
    from click.testing import CliRunner

    from synapse.cli import main as cli
    work = Path(tempfile.mkdtemp(prefix="synapse-fidelity-"))
    args = ["calibrate", "--backend", "cpu", "-o", str(work / "cpu.yaml")] + (["--quick"] if a.quick else [])
    r = CliRunner().invoke(cli, args)
    if r.exit_code:
        print(r.output)
        return r.exit_code
    print("\n".join(ln for ln in r.output.splitlines() if not ln.startswith("measuring")))
    runs = []
    for i in range(a.repeats):
        sc = load_scenario("needle", HELD_OUT + [f"profile={work / 'cpu.yaml'}"])
        for backend in ("cpu", "sim"):
            write_result(run_scenario(sc, backend), work / f"{i}-{backend}")
        rep = compare_paths(work / f"{i}-sim", work / f"{i}-cpu")
        m = {x["metric"]: x for x in rep["metrics"]}
        lat = {(x["op"], x["stat"]): x["rel_error"] for x in rep["latency"]}
        row = {"run_time_model_s": m["run_time_s"]["model"],
               "run_time_reference_s": m["run_time_s"]["reference"],
               "run_time_rel_error": m["run_time_s"]["rel_error"],
               "step_p50_rel_error": lat.get(("step", "p50_us")),
               "op_p50_rel_error": {op: e for (op, st), e in lat.items()
                                    if st == "p50_us" and op != "step"},
               "decisions_identical": rep["decisions"]["identical"],
               "explanation": rep["explanation"]["sentence"]}
        runs.append(row)
        print(f"held-out run {i}: run time {row['run_time_rel_error']:+.1%}, step p50 "
              f"{row['step_p50_rel_error']:+.1%}; {row['explanation']}")
    import yaml
    prof = yaml.safe_load((work / "cpu.yaml").read_text())
    out = {"held_out_overrides": HELD_OUT, "calibration": prof["measured"]["driver_fit"],
           "runs": runs, "environment": environment()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
