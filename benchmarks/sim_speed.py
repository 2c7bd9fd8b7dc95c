"""Simulator speed: wall seconds of the needle scenario at 128k context, 1000 decode steps.

    python benchmarks/sim_speed.py                       # every policy, 5 repeats
    python benchmarks/sim_speed.py --repeats 3 --policies h2o lru --extra
    python benchmarks/sim_speed.py --baseline /tmp/main  # old code (a source tree) too

The design's goal: under 1 s per policy. Each run is ``run_scenario`` in this process,
the same call ``synapse run`` makes; ``wall_s`` is its timed region (the driver's process
under the backend, not start-up or result writing). Reported per policy: the median and
minimum over the repeats, simulated events per second (SimPy events processed, divided by
the median wall time), the run's decisions and block moves, and the simulated time (which
must not change between runs). ``--extra`` adds the shipped tsunami and tenants
scenarios. Writes ``benchmarks/results/sim_speed.json`` with the machine it ran on.

One core: the simulator is one Python thread, and BLAS threads (NumPy's matrix products
over the workload's blocks) only contend with it on a shared machine, so they are set
to one before NumPy loads (recorded under ``machine``). Process CPU seconds are reported
beside wall seconds: on a shared machine they are the steadier figure.

``--baseline DIR`` times another source tree of Synapse (``git archive main | tar -x -C
DIR``) back to back with this one: each case of each repeat runs in a fresh interpreter
of either tree, one right after the other, in alternating order, so that both see the
same load; the JSON gets both, and the ratios of the medians and of the minima.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
for _name in BLAS_THREADS:  # before NumPy is imported, here or in a worker
    os.environ.setdefault(_name, "1")

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
            "blas_threads": {n: os.environ.get(n) for n in BLAS_THREADS},
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
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
    cpu0 = time.process_time()
    try:
        run = run_scenario(sc, "sim")
    finally:
        restore()
    cpu_s = time.process_time() - cpu0  # includes set-up outside wall_s's timed region
    # the simulator pauses the cyclic collector during a run: what it would have found
    garbage = gc.collect()
    m = run.metrics
    moves = sum(len(ids) for _, action, ids in run.decisions
                if action in ("demote", "drop", "fetch", "prefetch"))
    return {"wall_s": m["wall_s"], "cpu_s": cpu_s, "cyclic_garbage": garbage,
            "sim_time_s": m["sim_time_s"],
            "events": counter[0],
            "decisions": len(run.decisions), "block_moves": moves,
            "steps": len(run.result["timeline"].get("step", []))}


def summary(runs: list[dict], name: str) -> dict:
    walls = [r["wall_s"] for r in runs]
    cpus = [r["cpu_s"] for r in runs]
    sim_times = {r["sim_time_s"] for r in runs}
    if len(sim_times) != 1:
        raise SystemExit(f"{name}: simulated time changed between repeats: {sim_times}")
    med = statistics.median(walls)
    first = next((r for r in runs if r["events"] is not None), runs[0])
    return {"median_wall_s": round(med, 4), "min_wall_s": round(min(walls), 4),
            "walls_s": [round(w, 4) for w in walls],
            "median_cpu_s": round(statistics.median(cpus), 4), "min_cpu_s": round(min(cpus), 4),
            "cyclic_garbage_max": max(r["cyclic_garbage"] for r in runs),
            "sim_events": first["events"],
            "sim_events_per_s": round(first["events"] / med) if first["events"] else None,
            "steps": first["steps"], "decisions": first["decisions"],
            "block_moves": first["block_moves"], "sim_time_s": first["sim_time_s"]}


def worker_runs(tree: Path, cases: list[tuple[str, str, list[str]]], events: bool) -> list[dict]:
    """One fresh interpreter on source tree ``tree`` running each case once."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                          json.dumps({"cases": cases, "events": events})],
                         cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tree}: the worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def cases_of(args) -> list[tuple[str, str, list[str]]]:
    cases = [(f"needle-128k-{p}", "scenarios/needle.yaml", NEEDLE_128K + [f"policy.eviction={p}"])
             for p in args.policies]
    if args.extra:
        cases += [(name, f"scenarios/{name}.yaml", []) for name in ("tsunami", "tenants")]
    return cases


def row(name: str, scenario: str, overrides: list[str], repeats: int, runs: list[dict],
        base: list[dict] | None) -> dict:
    r = {"scenario": scenario, "overrides": overrides, "repeats": repeats, **summary(runs, name)}
    line = (f"{name:20} median {r['median_wall_s']:6.3f} s (cpu {r['median_cpu_s']:6.3f})  "
            f"{r['block_moves']:>7,} block moves")
    if base is not None:
        b = summary(base, f"{name} (baseline)")
        if b["sim_time_s"] != r["sim_time_s"] or b["decisions"] != r["decisions"]:
            raise SystemExit(f"{name}: the baseline decides or simulates differently "
                             f"({b['decisions']} decisions, {b['sim_time_s']} s simulated; "
                             f"here {r['decisions']}, {r['sim_time_s']} s)")
        r["baseline"] = {k: b[k] for k in ("median_wall_s", "min_wall_s", "walls_s",
                                           "median_cpu_s", "min_cpu_s")}
        r["speedup_median_wall"] = round(b["median_wall_s"] / r["median_wall_s"], 3)
        r["speedup_median_cpu"] = round(b["median_cpu_s"] / r["median_cpu_s"], 3)
        r["speedup_min_wall"] = round(b["min_wall_s"] / r["min_wall_s"], 3)
        line += (f"  baseline {b['median_wall_s']:6.3f} s (cpu {b['median_cpu_s']:6.3f}): "
                 f"x{r['speedup_median_wall']:.2f} wall, x{r['speedup_median_cpu']:.2f} cpu, "
                 f"x{r['speedup_min_wall']:.2f} min wall")
    print(line, flush=True)
    return r


def worker(spec: str) -> int:
    from synapse.runner import run_scenario
    from synapse.scenarios.loader import load_scenario
    spec = json.loads(spec)
    run_scenario(load_scenario("scenarios/needle.yaml", []), "sim")  # imports, caches: untimed
    print(json.dumps([one_run(sc, ov, events=spec["events"]) for _, sc, ov in spec["cases"]]))
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--extra", action="store_true", help="also tsunami and tenants as shipped")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a source tree of older Synapse code to time back to back with this one")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "sim_speed.json")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    if args.repeats < 1:
        print(f"error: --repeats: got {args.repeats}, expected at least 1", file=sys.stderr)
        return 2
    if args.baseline is not None and not (args.baseline / "synapse" / "runner.py").is_file():
        print(f"error: --baseline: {args.baseline} holds no synapse/runner.py (expected a "
              f"source tree of Synapse)", file=sys.stderr)
        return 2
    os.chdir(root)  # scenarios/ and profiles/ resolve as they do for `synapse run`
    print(json.dumps(machine()), flush=True)
    cases = cases_of(args)
    new: dict[str, list] = {c[0]: [] for c in cases}
    old: dict[str, list] = {c[0]: [] for c in cases}
    from tqdm import tqdm
    trees = [(root, new)] + ([(args.baseline.resolve(), old)] if args.baseline is not None else [])
    for i in tqdm(range(args.repeats), desc="repeats", unit="repeat", file=sys.stderr):
        for c in cases:  # case by case, the trees' order alternating: they share the load
            for tree, into in (trees if i % 2 else trees[::-1]):
                into[c[0]] += worker_runs(tree, [c], events=(i == 0))
    results = {name: row(name, sc, ov, args.repeats, new[name],
                         old[name] if args.baseline is not None else None)
               for name, sc, ov in cases}
    over = [k for k, r in results.items() if k.startswith("needle") and r["median_wall_s"] >= GOAL_S]
    doc = {"benchmark": "sim_speed", "goal": f"needle 128k x 1000 decode steps < {GOAL_S} s "
           "per policy", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "machine": machine(), "results": results, "over_goal": over}
    if args.baseline is not None:
        doc["baseline"] = str(args.baseline)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}" + (f"; over {GOAL_S} s: {', '.join(over)}" if over else
                                 f"; every policy under {GOAL_S} s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
