"""Simulator speed: wall seconds of the needle scenario at 128k context, 1000 decode steps.

    python benchmarks/sim_speed.py                       # every policy, 5 repeats
    python benchmarks/sim_speed.py --repeats 3 --policies h2o lru --extra

The design's goal: under 1 s per policy. Each run is ``run_scenario`` in this process,
the same call ``synapse run`` makes; ``wall_s`` is its timed region (the driver's process
under the backend, not start-up or result writing). Reported per policy: the median and
minimum over the repeats, simulated events per second (SimPy events processed, divided by
the median wall time), the run's decisions and block moves, and the simulated time (which
must not change between runs). ``--extra`` adds the shipped tsunami and tenants
scenarios. Writes ``benchmarks/results/sim_speed.json`` with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

POLICIES = ("lru", "fifo", "h2o", "sinks", "belady")
NEEDLE_128K = ["workload.context_tokens=131072", "workload.decode_steps=1000"]
GOAL_S = 1.0


def machine() -> dict:
    import numpy
    import simpy
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "numpy": numpy.__version__,
            "simpy": simpy.__version__, "platform": platform.platform(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def count_events(env_cls):
    """Wrap ``Environment.step`` to count processed events; returns (restore, counter)."""
    counter = [0]
    step = env_cls.step

    def counting_step(self):
        counter[0] += 1
        return step(self)

    env_cls.step = counting_step
    return (lambda: setattr(env_cls, "step", step)), counter


def one_run(scenario: str, overrides: list[str], events: bool) -> dict:
    import simpy
    from synapse.runner import run_scenario
    from synapse.scenarios.loader import load_scenario
    sc = load_scenario(scenario, overrides)
    restore, counter = count_events(simpy.Environment) if events else (lambda: None, [None])
    try:
        run = run_scenario(sc, "sim")
    finally:
        restore()
    m = run.metrics
    moves = sum(len(ids) for _, action, ids in run.decisions
                if action in ("demote", "drop", "fetch", "prefetch"))
    return {"wall_s": m["wall_s"], "sim_time_s": m["sim_time_s"], "events": counter[0],
            "decisions": len(run.decisions), "block_moves": moves,
            "steps": len(run.result["timeline"].get("step", []))}


def bench(name: str, scenario: str, overrides: list[str], repeats: int) -> dict:
    runs = [one_run(scenario, overrides, events=(i == 0)) for i in range(repeats)]
    walls = [r["wall_s"] for r in runs]
    sim_times = {r["sim_time_s"] for r in runs}
    if len(sim_times) != 1:
        raise SystemExit(f"{name}: simulated time changed between repeats: {sim_times}")
    med = statistics.median(walls)
    first = runs[0]
    row = {"scenario": scenario, "overrides": overrides, "repeats": repeats,
           "median_wall_s": round(med, 4), "min_wall_s": round(min(walls), 4),
           "walls_s": [round(w, 4) for w in walls],
           "sim_events": first["events"], "sim_events_per_s": round(first["events"] / med),
           "steps": first["steps"], "decisions": first["decisions"],
           "block_moves": first["block_moves"], "sim_time_s": first["sim_time_s"]}
    print(f"{name:24} median {med:6.3f} s  min {min(walls):6.3f} s  "
          f"{row['sim_events_per_s']:>9,} events/s  {first['block_moves']:>7,} block moves",
          flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--extra", action="store_true", help="also tsunami and tenants as shipped")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "sim_speed.json")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    os.chdir(root)  # scenarios/ and profiles/ resolve as they do for `synapse run`
    print(json.dumps(machine()), flush=True)
    one_run("scenarios/needle.yaml", [], events=False)  # imports and caches, untimed
    results = {}
    for p in args.policies:
        results[f"needle-128k-{p}"] = bench(f"needle 128k {p}", "scenarios/needle.yaml",
                                            NEEDLE_128K + [f"policy.eviction={p}"], args.repeats)
    if args.extra:
        for name in ("tsunami", "tenants"):
            results[name] = bench(name, f"scenarios/{name}.yaml", [], args.repeats)
    over = [k for k, r in results.items() if k.startswith("needle") and r["median_wall_s"] >= GOAL_S]
    doc = {"benchmark": "sim_speed", "goal": f"needle 128k x 1000 decode steps < {GOAL_S} s "
           "per policy", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "machine": machine(), "results": results, "over_goal": over}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}" + (f"; over {GOAL_S} s: {', '.join(over)}" if over else
                                 f"; every policy under {GOAL_S} s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
