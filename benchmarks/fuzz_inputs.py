"""Bad-input campaign: thousands of mutated scenarios through ``synapse validate`` and
``synapse run``, counting what breaks the contract (exit 0 or 2, one-line errors, never a
traceback, never a hang).

    python benchmarks/fuzz_inputs.py --cases 1500             # ~2 min on 2 CPUs
    python benchmarks/fuzz_inputs.py --plausible --cases 500  # mostly accepted, run
    PYTHONPATH=/path/to/old/checkout python benchmarks/fuzz_inputs.py --out before.json

(An old checkout takes longer: its hangs wait out the time limit, 60 s each.)

The cases are the CI fuzz test's (``tests/scenario_mutations.py``), drawn by Hypothesis
with a fixed seed, so two checkouts see the same cases. Each runs in a forked child with
a memory cap and a time limit: a case that exceeds the limit counts as a hang, one that
the memory cap stops counts by what the child printed (a ``MemoryError`` traceback, say).
Accepted cases run on the simulator when their estimate says they take under a few
seconds (``RUN_BELOW_S``), with tracemalloc on, so the peak of Python and NumPy memory is
held to the host-memory estimate too; without estimates (an old checkout) every accepted
case runs.
Writes a JSON summary (``benchmarks/results/fuzz_inputs.json`` by default).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import select
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402

import scenario_mutations as sm  # noqa: E402


def draw_cases(n: int, plausible: bool = False) -> list:
    got = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(sm.cases(plausible=plausible))
    def collect(case):
        got.append(case)

    collect()
    return got


def run_child(case, mem_bytes: int) -> int:
    """Fork a child that checks one case and writes its verdict to a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
            with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
                v = sm.check_case(case, Path(tmp), measure_memory=True)
                est = v.estimate
                out = {"stage": v.stage, "exit_code": v.exit_code, "problem": v.problem,
                       "ran": v.ran, "wall_s": v.wall_s,
                       "first_line": (v.output.strip().splitlines() or [""])[0][:200],
                       "estimated_s": getattr(est, "seconds", None)}
        except BaseException as e:  # noqa: BLE001 - the harness must report, not die
            out = {"stage": "harness", "exit_code": -1, "problem": f"harness: {e!r}"[:300],
                   "ran": False, "wall_s": None, "first_line": "", "estimated_s": None}
            code = 1
        os.write(w, json.dumps(out).encode())
        os.close(w)
        os._exit(code)
    os.close(w)
    return pid, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1500)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a case is a hang")
    ap.add_argument("--mem-gib", type=float, default=6.0, help="address-space cap per case")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--plausible", action="store_true",
                    help="only numbers scaled by 1/8 to 8: mostly valid cases, run and held "
                         "to their estimates")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz_inputs.json")
    args = ap.parse_args()

    import synapse
    import synapse.cli  # noqa: F401  (imported once here, not again in every forked child)
    import synapse.runner  # noqa: F401
    import synapse.sim.backend  # noqa: F401
    from synapse.runner import driver_for
    for kind in ("needle", "streaming", "tsunami"):
        driver_for(kind)
    t0 = time.perf_counter()
    cases = draw_cases(args.cases, args.plausible)
    print(f"{len(cases)} cases drawn in {time.perf_counter() - t0:.0f} s "
          f"(synapse from {Path(synapse.__file__).parent})", file=sys.stderr)
    results: list[dict | None] = [None] * len(cases)
    running: dict[int, tuple[int, int, float, bytes]] = {}  # fd -> (index, pid, start, buf)
    todo = list(range(len(cases)))[::-1]
    mem = int(args.mem_gib * 2**30)
    done = 0
    while todo or running:
        while todo and len(running) < args.jobs:
            i = todo.pop()
            pid, fd = run_child(cases[i], mem)
            running[fd] = [i, pid, time.monotonic(), b""]
        ready, _, _ = select.select(list(running), [], [], 0.5)
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                running[fd][3] += chunk
                continue
            i, pid, _, buf = running.pop(fd)
            os.close(fd)
            _, status = os.waitpid(pid, 0)
            try:
                results[i] = json.loads(buf)
            except json.JSONDecodeError:
                sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
                results[i] = {"stage": "?", "exit_code": -1, "ran": False, "wall_s": None,
                              "problem": f"child died (signal {sig})", "first_line": "",
                              "estimated_s": None}
            done += 1
        now = time.monotonic()
        for fd, (i, pid, start, _) in list(running.items()):
            if now - start > args.timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(fd)
                del running[fd]
                results[i] = {"stage": "?", "exit_code": -1, "ran": False, "wall_s": None,
                              "problem": f"hang: over {args.timeout:.0f} s", "first_line": "",
                              "estimated_s": None}
                done += 1
        if done and done % 100 == 0:
            print(f"{done}/{len(cases)}", file=sys.stderr, end="\r")

    def klass(r):
        p = r["problem"]
        if p is None:
            return "accepted" if r["exit_code"] == 0 else "refused (one line, exit 2)"
        if p.startswith("traceback"):
            return "traceback"
        if p.startswith("hang"):
            return "hang"
        if p.startswith("error of"):
            return "multi-line error"
        if p.startswith(("ran ", "took ", "peak ")):
            return "over its estimate"
        return "other: " + p.split(":")[0]

    counts = collections.Counter(klass(r) for r in results)
    # what broke, by exception type or problem (a traceback's type, "error of 3 lines"...)
    problems = collections.Counter(
        (r["problem"].split(":")[1].strip() if r["problem"].startswith("traceback:")
         else r["problem"].split(":")[0]) for r in results if r["problem"])
    examples = collections.defaultdict(list)
    for c, r in zip(cases, results):
        k = klass(r)
        if k not in ("accepted", "refused (one line, exit 2)") and len(examples[k]) < 25:
            examples[k].append({"case": c.describe()[:300], "problem": r["problem"],
                                "first_line": r["first_line"]})
    ran = [r for r in results if r["ran"]]

    def refused_for(line: str) -> str:
        """What a one-line refusal is about: the field (or check) it names."""
        rest = line.removeprefix("error: ").split(".yaml", 1)[-1]
        rest = rest.removeprefix(" with --set").lstrip(":0123456789 ")
        return rest.split(":", 1)[0][:60]

    refusals = collections.Counter(refused_for(r["first_line"]) for r in results
                                   if r["problem"] is None and r["exit_code"] == 2)
    summary = {
        "cases": len(cases),
        "plausible_only": args.plausible,
        "synapse": str(Path(synapse.__file__).parent),
        "timeout_s": args.timeout, "mem_gib": args.mem_gib,
        "counts": dict(sorted(counts.items())),
        "violations": sum(v for k, v in counts.items()
                          if k not in ("accepted", "refused (one line, exit 2)")),
        "problems": dict(problems.most_common()),
        "refusals_by_field": dict(refusals.most_common(40)),
        "ran_on_sim": len(ran),
        "accepted_not_run": sum(1 for r in results if r["exit_code"] == 0 and not r["ran"]
                                and r["problem"] is None),
        "run_wall_s_max": max((r["wall_s"] for r in ran if r["wall_s"]), default=None),
        "examples": examples,
        "wall_s": time.perf_counter() - t0,
    }
    try:
        from synapse.outputs import atomic_write
    except ImportError:  # a checkout from before synapse.outputs
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    else:
        atomic_write(args.out, json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("cases", "counts", "problems", "violations", "ran_on_sim",
                                               "accepted_not_run", "wall_s")}, indent=1))


if __name__ == "__main__":
    main()
