"""Simulator work as instructions: what ``sim_speed.py`` times, counted by callgrind.

    python benchmarks/sim_instructions.py --policies h2o sinks --baseline /tmp/main

On a shared machine wall and CPU seconds of one run vary by 1.5-2x with the other load;
the number of instructions a run executes does not (to a few parts in a million), so a
change's gain can be read from one run per tree. Each case runs once under ``valgrind
--tool=callgrind`` in a fresh interpreter (the needle scenario at 128k tokens and 1,000
decode steps, as ``sim_speed.py``; one BLAS thread), and once more only importing
Synapse and loading the scenario; the difference is the run's instructions (its set-up
included: the needle ground truth is computed there). ``--baseline DIR`` counts another
source tree the same way. Slow: a run takes 30-100x its own time. Writes
``benchmarks/results/sim_instructions.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

POLICIES = ("lru", "fifo", "h2o", "sinks", "belady")
NEEDLE_128K = ["workload.context_tokens=131072", "workload.decode_steps=1000"]
WORKER = """
import os, sys
for n in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[n] = "1"
from synapse.runner import run_scenario
from synapse.scenarios.loader import load_scenario
policy = sys.argv[1]
load_only = policy == "load-only"
sc = load_scenario("scenarios/needle.yaml",
                   {overrides!r} + ["policy.eviction=" + ("lru" if load_only else policy)])
if not load_only:
    run_scenario(sc, "sim")
"""


def count(tree: Path, policy: str) -> int:
    """Instructions of one interpreter running ``policy`` ("load-only": no run) on ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    code = WORKER.format(overrides=NEEDLE_128K)
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", code, policy],
                         cwd=tree, env=env, capture_output=True, text=True)
    found = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
    if out.returncode or not found:
        raise SystemExit(f"{tree}: the callgrind run of {policy} failed:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a source tree of older Synapse code to count the same way")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results"
                    / "sim_instructions.json")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("error: valgrind: not found on PATH (expected valgrind with its callgrind "
              "tool, e.g. apt-get install valgrind)", file=sys.stderr)
        return 2
    if args.baseline is not None and not (args.baseline / "synapse" / "runner.py").is_file():
        print(f"error: --baseline: {args.baseline} holds no synapse/runner.py (expected a "
              f"source tree of Synapse)", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    trees = {"now": root} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    jobs = [(name, tree, p) for name, tree in trees.items() for p in ("load-only", *args.policies)]
    counts: dict[str, dict[str, int]] = {name: {} for name in trees}
    for name, tree, policy in tqdm(jobs, desc="callgrind runs", unit="run", file=sys.stderr):
        counts[name][policy] = count(tree, policy)
    results = {}
    for p in args.policies:
        r = {n: counts[n][p] - counts[n]["load-only"] for n in trees}
        if "baseline" in r:
            r["ratio"] = round(r["baseline"] / r["now"], 4)
        results[f"needle-128k-{p}"] = r
        line = f"needle-128k-{p:8} {r['now'] / 1e9:6.3f}G instructions"
        if "baseline" in r:
            line += f"  baseline {r['baseline'] / 1e9:6.3f}G: x{r['ratio']:.3f}"
        print(line, flush=True)
    doc = {"benchmark": "sim_instructions", "command": " ".join([Path(sys.argv[0]).name]
                                                               + sys.argv[1:]),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "python": sys.version.split()[0], "load_only": {n: counts[n]["load-only"]
                                                           for n in trees},
           "results": results}
    if args.baseline is not None:
        doc["baseline"] = str(args.baseline)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
