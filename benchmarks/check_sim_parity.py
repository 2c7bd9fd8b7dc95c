"""Behaviour parity of the simulator (and the cpu backend) across a refactoring.

    python benchmarks/check_sim_parity.py capture /tmp/synapse-golden   # before a change
    python benchmarks/check_sim_parity.py check   /tmp/synapse-golden   # after it

``capture`` runs a matrix of scenarios and writes each run's ``decisions.jsonl`` and a
``parity.json`` (result.json's metrics and timeline, minus wall-clock fields, plus the op
table). ``check`` runs the same matrix again and compares: decisions byte for byte, every
other field exactly (a run that raises a SynapseError is recorded by its error, which
must then be the same); a float that differs is reported with its relative error (and
accepted, flagged, when within ``--rtol``, default 0: exact). Golden outputs are large:
keep them outside the repository. Exit status 1 on any mismatch.

The matrix: needle small (the test suite's shape) and needle 32k (the shipped scenario)
for every policy and demotion mode; needle 128k x 1000 decode steps for every policy (the
speed target); tsunami, tenants and streaming as shipped; and on the cpu backend (real
bytes through the same manager and mover) tiny needle/tsunami/tenants runs, compared on
decisions and counters only (their times are measured, not simulated).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path

from synapse.runner import _jsonable
from synapse.scenarios.tiny import TINY_NEEDLE, TINY_TENANTS, TINY_TSUNAMI

POLICIES = ("lru", "fifo", "h2o", "sinks", "belady")
DEMOTES = ("l2", "l2_int4", "drop")
SMALL = ["workload.context_tokens=8192", "workload.decode_steps=64",
         "workload.prefill_chunk_tokens=512", "model.layers=4", "model.kv_heads=2",
         "model.head_dim=64"]
BIG = ["workload.context_tokens=131072", "workload.decode_steps=1000"]
# Fields that are wall-clock measurements (or the time of day), never compared.
WALL = {"wall_s"}
CPU_TIMED = {"wall_s", "sim_time_s", "run_time_s", "host_busy_s", "latency", "t_s",
             "decision_s", "host_rest_s", "host_rest_fraction", "decision_fraction"}


def matrix() -> list[tuple[str, str, str, list[str]]]:
    """(run name, scenario, backend, overrides)."""
    runs = []
    for size, extra in (("small", SMALL), ("32k", [])):
        for p in POLICIES:
            for d in DEMOTES:
                runs.append((f"needle-{size}-{p}-{d}", "needle", "sim",
                             extra + [f"policy.eviction={p}", f"policy.demote={d}"]))
    for p in POLICIES:
        runs.append((f"needle-128k-{p}", "needle", "sim", BIG + [f"policy.eviction={p}"]))
    for name in ("tsunami", "tenants", "streaming"):
        runs.append((name, name, "sim", []))
    runs.append(("tsunami-int4", "tsunami", "sim", ["policy.demote=l2_int4"]))
    runs.append(("tenants-int4", "tenants", "sim", ["policy.demote=l2_int4"]))
    for p in POLICIES:
        for d in DEMOTES:
            runs.append((f"cpu-needle-tiny-{p}-{d}", "needle", "cpu",
                         TINY_NEEDLE + [f"policy.eviction={p}", f"policy.demote={d}"]))
    runs.append(("cpu-tsunami-tiny", "tsunami", "cpu", TINY_TSUNAMI))
    runs.append(("cpu-tenants-tiny", "tenants", "cpu", TINY_TENANTS))
    return runs


def _strip(obj, drop: set):
    if isinstance(obj, dict):
        return {k: _strip(v, drop) for k, v in obj.items() if k not in drop}
    return obj


def run_one(spec) -> tuple[str, str, dict]:
    name, scenario, backend, overrides = spec
    from synapse.errors import SynapseError
    from synapse.runner import run_scenario
    from synapse.scenarios.loader import load_scenario
    try:
        run = run_scenario(load_scenario(f"scenarios/{scenario}.yaml", overrides), backend)
    except SynapseError as e:  # a run that fails must fail the same way after the change
        return name, "", {"error": f"{type(e).__name__}: {e}"}
    lines = "".join(json.dumps({"step": s, "action": a, "blocks": ids}) + "\n"
                    for s, a, ids in run.decisions)
    drop = WALL if backend == "sim" else CPU_TIMED
    doc = {"metrics": _strip(run.result["metrics"], drop),
           "timeline": _strip(run.result["timeline"], drop)}
    if backend == "sim":
        doc["ops"] = run.ops
    doc = json.loads(json.dumps(doc, default=_jsonable))
    return name, lines, doc




def diff(a, b, path: str, rtol: float, out: list, near: list) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'golden' if k in a else 'new'}")
            else:
                diff(a[k], b[k], f"{path}.{k}", rtol, out, near)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} != {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{path}[{i}]", rtol, out, near)
            if len(out) > 20:
                return
    elif isinstance(a, float) and isinstance(b, float) and a != b:
        rel = abs(a - b) / max(abs(a), abs(b))
        (near if rel <= rtol else out).append(f"{path}: {a!r} != {b!r} (rel {rel:.3g})")
    elif a != b or type(a) is not type(b):
        out.append(f"{path}: {a!r} != {b!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("capture", "check"))
    ap.add_argument("golden", type=Path)
    ap.add_argument("--rtol", type=float, default=0.0,
                    help="accept floats within this relative error, reported (default: exact)")
    ap.add_argument("--only", default="", help="substring filter on run names")
    ap.add_argument("-j", "--jobs", type=int, default=mp.cpu_count())
    args = ap.parse_args()
    runs = [r for r in matrix() if args.only in r[0]]
    ctx = mp.get_context("spawn")  # fresh interpreters: no state carried between runs
    failed, nearly = 0, 0
    with ctx.Pool(args.jobs, maxtasksperchild=8) as pool:
        for name, lines, doc in pool.imap_unordered(run_one, runs):
            d = args.golden / name
            if args.mode == "capture":
                d.mkdir(parents=True, exist_ok=True)
                (d / "decisions.jsonl").write_text(lines)
                (d / "parity.json").write_text(json.dumps(doc, indent=0))
                print(f"captured {name}: " + (doc["error"] if "error" in doc else
                                             f"{lines.count(chr(10))} decisions"), flush=True)
                continue
            problems, near = [], []
            if not (d / "decisions.jsonl").exists():
                problems.append("no golden output (capture first)")
            else:
                if (d / "decisions.jsonl").read_text() != lines:
                    problems.append("decisions.jsonl differs")
                diff(json.loads((d / "parity.json").read_text()), doc, "", args.rtol,
                     problems, near)
            nearly += bool(near)
            status = "FAIL" if problems else ("NEAR" if near else "ok")
            print(f"{status:4} {name}", flush=True)
            for p in (problems + near)[:12]:
                print(f"       {p}")
            failed += bool(problems)
    if args.mode == "check":
        print(f"{len(runs) - failed}/{len(runs)} runs identical"
              + (f" ({nearly} within rtol {args.rtol})" if nearly else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
