"""Sweeps: one scenario run over the cross product of a grid of scenario (or profile) fields.

A grid axis is ``key=v1,v2,...`` or a range ``key=start:stop:step`` (stop included), where
``key`` is exactly a ``--set`` key of the scenario (``memory.l1_budget``,
``policy.eviction``, ``workload.context_tokens``, ``seed``...) or ``profile.<field>`` for
the hardware profile the simulator times the run with (``profile.link.h2d_gb_per_s``,
``profile.hbm_bytes``): the what-if questions ("a link twice as fast") are about the
profile as often as about the policy. Every point is checked before anything is written,
so a bad key or value costs one line and leaves no folder behind.

A sweep folder holds::

    sweep.json            the manifest: scenario (resolved), --set, grid, backend
    sweep.csv, .jsonl     one row per point: grid values, status, error, metrics
    points/p0007/         result.json, decisions.jsonl, ops.json (+ profile.yaml), row.json

``row.json`` is written last, atomically: a point is done exactly when it exists. That
makes resuming free: rerunning the same command skips the points that have a row, and a
folder holding another sweep (other scenario, grid or backend) is refused rather than
mixed. A point that raises is recorded (status ``error`` and the message) and the sweep
goes on; ``--retry-failed`` runs the failed points again.

Grids are parsed in ``grid``; points run in local processes (``concurrent.futures``;
``jobs=1`` runs them in this process) or on a Dask cluster (``executors``). Either way the workers only compute and return the files'
contents; this process writes them, so Dask workers need no shared file system.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .config import apply_overrides, build, to_dict
from .errors import ScenarioError
from .executors import open_executor
from .grid import MAX_POINTS, PROFILE_PREFIX, Axis, check_keys, parse_grid
from .outputs import atomic_write
from .results import SWEEP_CSV, SWEEP_JSONL, SWEEP_MANIFEST, ResultsError, read_json
from .runner import DECISIONS_FILE, OPS_FILE, RESULT_FILE
from .units import parse_bytes

POINTS_DIR = "points"
ROW_FILE = "row.json"

# Leading columns of the table, in this order; every other scalar metric follows, sorted.
HEAD_METRICS = ("run_time_s", "l1_hit_rate", "needle_retained", "output_rel_error",
                "l1_hits", "l2_hits", "misses", "evictions", "demotions", "drops",
                "fetches", "prefetches", "refusals", "lost_blocks", "bytes_h2d", "bytes_d2h",
                "step_p50_us", "step_p99_us", "wall_s")


# -- planning ---------------------------------------------------------------------------
@dataclass
class Point:
    index: int
    values: dict[str, str]           # grid key -> value text
    scenario: object                 # the resolved Scenario
    profile: dict                    # the resolved hardware profile, shipped to the worker
    profile_overridden: bool

    @property
    def name(self) -> str:
        return f"p{self.index:04d}"


@dataclass
class Plan:
    """A validated sweep: every point's scenario and profile resolved, nothing written."""

    scenario_arg: str | None
    source: str
    base_sets: list[str]
    axes: list[Axis]
    backend: str
    points: list[Point]
    manifest: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.manifest["scenario"]


def plan_sweep(scenario: str | None, grid: list[str] | tuple[str, ...],
               sets: list[str] | tuple[str, ...] = (), backend: str = "sim") -> Plan:
    """Parse and check the whole grid: every point is loaded (every value checked) here."""
    import itertools

    from .runner import BACKENDS
    from .scenarios.loader import load_scenario, resolve_path
    from .sim.profile import load_profile

    if backend not in BACKENDS:
        raise ScenarioError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    source = str(resolve_path(scenario))
    base = load_scenario(scenario, list(sets))
    axes = parse_grid(grid)
    check_keys(axes, base.kind)
    n = 1
    for a in axes:
        n *= len(a.values)
    if n > MAX_POINTS:
        raise ScenarioError(f"--grid: {n} points, more than {MAX_POINTS}")
    profile_cache: dict[str, dict] = {}
    points = []
    for i, combo in enumerate(itertools.product(*(a.values for a in axes))):
        values = dict(zip((a.key for a in axes), combo))
        sc_sets = [f"{k}={v}" for k, v in values.items() if not k.startswith(PROFILE_PREFIX)]
        pr_sets = {k[len(PROFILE_PREFIX):]: v for k, v in values.items()
                   if k.startswith(PROFILE_PREFIX)}
        sc = load_scenario(scenario, list(sets) + sc_sets)
        if sc.profile not in profile_cache:
            profile_cache[sc.profile] = to_dict(load_profile(sc.profile))
        prof = profile_cache[sc.profile]
        if pr_sets:
            prof = _override_profile(prof, pr_sets)
        points.append(Point(i, values, sc, prof, bool(pr_sets)))
    manifest = {
        "format": 1,
        "scenario": base.name,
        "kind": base.kind,
        "source": source,
        "set": list(sets),
        "grid": [[a.key, list(a.values)] for a in axes],
        "backend": backend,
        "points": len(points),
        "base_config": to_dict(base),
        "synapse": __version__,
    }
    return Plan(scenario, source, list(sets), axes, backend, points, manifest)


def _override_profile(prof: dict, sets: dict[str, str]) -> dict:
    """The profile with ``sets`` applied, checked like a profile file (sizes with units are
    accepted for the byte fields, so ``profile.hbm_bytes=40GB:80GB:8GB`` works)."""
    import typing

    from .sim.profile import Profile
    texts = []
    for key, value in sets.items():
        leaf_cls, leaf = Profile, key.split(".")
        for part in leaf[:-1]:
            leaf_cls = typing.get_type_hints(leaf_cls)[part]
        if typing.get_type_hints(leaf_cls).get(leaf[-1]) is int and re.search(r"[A-Za-z]", value):
            try:
                value = str(parse_bytes(value))
            except ValueError:
                pass  # the build below names the field and the bad value
        texts.append(f"{key}={value}")
    data = apply_overrides(prof, texts)
    data["name"] = f"{prof['name']} ({', '.join(f'{k}={v}' for k, v in sets.items())})"
    return to_dict(build(Profile, data, "--grid", "profile"))


# -- one point (runs in a worker) -------------------------------------------------------
def run_point(task: dict) -> dict:
    """Run one point; return its row and its files' contents (never raises for a failing
    point: the error is the row's). Called in a worker process or on a Dask worker."""
    import traceback

    import yaml

    from .runner import run_scenario, write_result

    t0 = time.perf_counter()
    row = {"point": task["name"], **task["values"], "status": "ok", "error": "",
           "backend": task["backend"], "policy": task["scenario"].policy.eviction}
    files: dict[str, str] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="synapse-point-") as tmp:
            tmp_dir = Path(tmp)
            prof_path = tmp_dir / "profile.yaml"
            prof_path.write_text(yaml.safe_dump(task["profile"], sort_keys=False))
            sc = dataclasses.replace(task["scenario"], profile=str(prof_path))
            run = run_scenario(sc, task["backend"], task["source"])
            # The scenario names its profile, not the worker's temporary copy of it.
            run.result["config"]["profile"] = task["profile_label"]
            write_result(run, tmp_dir / "out")
            for name in (RESULT_FILE, DECISIONS_FILE, OPS_FILE):
                files[name] = (tmp_dir / "out" / name).read_text()
        # From the file as written: plain JSON types, exactly what result.json holds.
        row.update(summary_metrics(json.loads(files[RESULT_FILE])["metrics"]))
    except Exception as e:  # a failing point is data, not the end of the sweep
        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        files = {"error.txt": traceback.format_exc()}
    row["wall_s"] = time.perf_counter() - t0
    return {"row": row, "files": files}


def summary_metrics(metrics: dict) -> dict:
    """The scalar metrics of a result (the table's columns), plus the step percentiles."""
    out = {k: v for k, v in metrics.items()
           if v is None or isinstance(v, (bool, int, float, str))}
    step = metrics.get("latency", {}).get("step", {})
    for p in ("p50", "p99"):
        if f"{p}_us" in step:
            out[f"step_{p}_us"] = step[f"{p}_us"]
    return out


# -- running ----------------------------------------------------------------------------
@dataclass
class Outcome:
    total: int
    skipped: int = 0
    ran: int = 0
    failed: int = 0
    lost: int = 0          # points whose worker died: not recorded, rerun on resume
    interrupted: bool = False
    out_dir: Path = Path(".")

    @property
    def ok(self) -> bool:
        return not (self.failed or self.lost or self.interrupted)


def prepare_out_dir(plan: Plan, out_dir: Path, retry_failed: bool = False) -> dict[int, dict]:
    """Check ``out_dir`` is empty or holds this very sweep; return its finished rows.

    Writes nothing; ``run_sweep`` writes the manifest when the first point starts."""
    manifest_path = out_dir / SWEEP_MANIFEST
    if manifest_path.exists():
        old = read_json(manifest_path)
        for key, what in (("base_config", "scenario"), ("set", "--set overrides"),
                          ("grid", "grid"), ("backend", "backend")):
            if not isinstance(old, dict) or old.get(key) != plan.manifest[key]:
                raise ResultsError(f"{out_dir}: holds a sweep with another {what}; "
                                   f"use another --out (or delete it) to start a new sweep")
    elif out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ResultsError(f"{out_dir}: exists and is not a sweep folder; use another --out")
    done: dict[int, dict] = {}
    for p in plan.points:
        row_path = out_dir / POINTS_DIR / p.name / ROW_FILE
        if row_path.is_file():
            try:
                row = json.loads(row_path.read_text())
            except json.JSONDecodeError:
                continue  # written atomically, so only a damaged disk gets here: rerun
            if row.get("status") == "ok" or not retry_failed:
                done[p.index] = row
    return done


def _task(plan: Plan, p: Point) -> dict:
    return {"name": p.name, "values": p.values, "scenario": p.scenario, "profile": p.profile,
            "profile_label": (p.scenario.profile if not p.profile_overridden
                              else f"{POINTS_DIR}/{p.name}/profile.yaml"),
            "backend": plan.backend, "source": plan.source}


def run_sweep(plan: Plan, out_dir: Path, jobs: int = 1, executor: str = "local",
              scheduler: str | None = None, retry_failed: bool = False,
              progress: bool = False, log: Callable[[str], None] | None = None,
              point_fn: Callable[[dict], dict] | None = None) -> Outcome:
    """Run the points of ``plan`` not yet done in ``out_dir``; write rows and the table.

    Everything that can be refused (the folder, the executor) is checked before the
    first write. ``point_fn`` replaces ``run_point`` (tests count executions with it; it
    must be importable by the workers when they are other processes)."""
    import yaml

    log = log or (lambda msg: None)
    point_fn = point_fn or run_point
    done = prepare_out_dir(plan, out_dir, retry_failed)
    todo = [p for p in plan.points if p.index not in done]
    outcome = Outcome(total=len(plan.points), skipped=len(done), out_dir=out_dir)
    ex = open_executor(executor, max(1, min(jobs, len(todo))), scheduler) if todo else None
    try:
        if not (out_dir / SWEEP_MANIFEST).exists():
            manifest = dict(plan.manifest, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            atomic_write(out_dir / SWEEP_MANIFEST, json.dumps(manifest, indent=1))
        log(f"sweep {plan.name}: {outcome.total} points, {len(done)} already done, "
            f"{len(todo)} to run" + (f" on {ex.describe()}" if ex else "") + f" -> {out_dir}")
        by_name = {p.name: p for p in todo}
        bar = None
        if todo:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), unit="pt", desc=f"sweep {plan.name}", file=sys.stderr,
                       disable=not progress, dynamic_ncols=True, mininterval=0.5)
        try:
            for task, res in (ex.map(point_fn, [_task(plan, p) for p in todo]) if ex else ()):
                p = by_name[task["name"]]
                if res is None:
                    outcome.lost += 1
                    continue
                _write_point(out_dir / POINTS_DIR / p.name, res, p, yaml)
                done[p.index] = res["row"]
                outcome.ran += 1
                if bar is not None:
                    bar.set_postfix(failed=sum(r.get("status") != "ok" for r in done.values()),
                                    refresh=False)
                    bar.update(1)
        except KeyboardInterrupt:
            outcome.interrupted = True
        finally:
            if bar is not None:
                bar.close()
            write_table(out_dir, [done[i] for i in sorted(done)], [a.key for a in plan.axes])
    finally:
        if ex is not None:
            ex.close()
    outcome.failed = sum(1 for r in done.values() if r.get("status") != "ok")
    return outcome


def _write_point(point_dir: Path, res: dict, p: Point, yaml) -> None:
    for stale in (RESULT_FILE, DECISIONS_FILE, OPS_FILE, "error.txt"):  # from an earlier try
        if stale not in res["files"] and (point_dir / stale).exists():
            (point_dir / stale).unlink()
    for name, text in res["files"].items():
        atomic_write(point_dir / name, text)
    if p.profile_overridden:
        atomic_write(point_dir / "profile.yaml", yaml.safe_dump(p.profile, sort_keys=False))
    atomic_write(point_dir / ROW_FILE, json.dumps(res["row"], default=str))


# -- the table --------------------------------------------------------------------------
def table_columns(rows: list[dict], keys: list[str]) -> list[str]:
    head = ["point", *keys, "status", "error", "backend", "policy"]
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    metrics = [m for m in HEAD_METRICS if m in present]
    rest = sorted(present - set(head) - set(metrics))
    return head + metrics + rest


def write_table(out_dir: Path, rows: list[dict], keys: list[str]) -> None:
    """``sweep.jsonl`` (typed, one JSON object a line) and ``sweep.csv`` (for spreadsheets),
    one row per finished point, in grid order."""
    cols = table_columns(rows, keys)
    atomic_write(out_dir / SWEEP_JSONL,
                 "".join(json.dumps({c: r.get(c) for c in cols}, default=str) + "\n"
                         for r in rows))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    atomic_write(out_dir / SWEEP_CSV, buf.getvalue())


def load_sweep(path: Path) -> tuple[dict, list[dict]]:
    """The manifest and rows of a sweep folder (rows from the points if the table is stale)."""
    manifest = read_json(path / SWEEP_MANIFEST)
    if not isinstance(manifest, dict) or "grid" not in manifest:
        raise ResultsError(f"{path / SWEEP_MANIFEST}: not a synapse sweep manifest")
    rows = []
    pts = path / POINTS_DIR
    if pts.is_dir():
        for d in sorted(pts.iterdir()):
            if (d / ROW_FILE).is_file():
                rows.append(read_json(d / ROW_FILE))
    return manifest, rows
