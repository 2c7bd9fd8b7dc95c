"""Run one scenario on one backend and gather a result with the same fields everywhere.

``run_scenario`` builds the backend and the scenario's driver, runs the driver's process
to completion and returns a ``RunResult``: ``result`` (what ``result.json`` holds),
``decisions`` (every placement decision, in order) and ``ops`` (every op's timing).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .config import to_dict
from .errors import BackendUnavailable, ScenarioError
from .scenarios.schema import Scenario
from .sim.profile import load_profile
from .telemetry import ops_table, summarize

BACKENDS = ("sim", "cpu", "cuda")
RESULT_FILE = "result.json"
DECISIONS_FILE = "decisions.jsonl"
OPS_FILE = "ops.json"


def make_backend(name: str, profile):
    if name == "sim":
        from .sim.backend import SimBackend
        return SimBackend(profile)
    if name == "cpu":
        from .hw.host_backend import HostBackend
        return HostBackend()
    if name == "cuda":
        try:
            from .hw.cuda_backend import CudaBackend
        except ImportError as e:
            raise BackendUnavailable(
                f"--backend cuda needs PyCUDA and an NVIDIA driver ({e}); install "
                f"synapse-tiers[cuda] on a GPU machine, or use --backend sim or cpu") from None
        return CudaBackend()
    raise ScenarioError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def driver_for(kind: str):
    if kind == "needle":
        from .drivers.needle import NeedleDriver
        return NeedleDriver
    if kind == "streaming":
        from .drivers.streaming import StreamingDriver
        return StreamingDriver
    if kind == "trace":
        from .drivers.trace import TraceDriver
        return TraceDriver
    if kind == "prefix_reuse":
        from .drivers.prefix_reuse import PrefixReuseDriver
        return PrefixReuseDriver
    if kind in ("tsunami", "tenants"):
        from .drivers.serving import ServingDriver
        return ServingDriver
    raise ScenarioError(f"unknown scenario kind {kind!r}")


@dataclass
class RunResult:
    result: dict
    decisions: list
    ops: dict

    @property
    def metrics(self) -> dict:
        return self.result["metrics"]


def environment() -> dict:
    import numpy
    env = {
        "synapse": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import simpy
        env["simpy"] = simpy.__version__
    except ImportError:
        pass
    return env


def run_scenario(scenario: Scenario, backend_name: str = "sim", source: str = "scenario",
                 progress: bool = False, observe=None) -> RunResult:
    """Run ``scenario``; refused first (one ScenarioError line) if this machine cannot hold
    what it is estimated to need, and stopped if it runs past its estimated steps.
    ``observe(driver, backend)``, if given, returns a probe whose ``step()`` runs after
    every step and ``finish(records)`` after the run (live metrics: synapse.monitor)."""
    from .scenarios.estimate import (StepGuard, check_device, check_needs, device_free_bytes,
                                     estimate_scenario)
    profile = load_profile(scenario.profile)
    if backend_name not in BACKENDS:
        raise ScenarioError(f"unknown backend {backend_name!r}; expected one of "
                            f"{', '.join(BACKENDS)}")
    needs = estimate_scenario(scenario, backend_name, source)
    check_needs(scenario, needs, backend_name, profile, source)
    backend = make_backend(backend_name, profile)
    try:
        if backend_name == "cuda":
            check_device(needs, device_free_bytes(), source)
        driver = driver_for(scenario.kind)(scenario, backend, profile, source)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=getattr(driver, "num_steps", None), unit="step",
                       desc=f"{scenario.name} on {backend_name}", file=sys.stderr, leave=False)
        driver.rec.on_step = StepGuard(needs.steps, source, bar.update if bar else None)
        probe = observe(driver, backend) if observe is not None else None
        if probe is not None:
            driver.rec.on_step = _both(driver.rec.on_step, probe.step)
        t0 = time.perf_counter()
        backend.run(driver.process())
        wall = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        records = backend.records()
        if probe is not None:
            probe.finish(records)
        c = driver.mgr.counters
        metrics = {
            "wall_s": wall,
            "sim_time_s": backend.now() if backend.simulated else None,
            # Work after the timed region (reference passes) is not part of the run.
            "run_time_s": getattr(driver, "run_end_s", None) or backend.now(),
            "host_busy_s": backend.host_busy_s(),
            # wall time of the manager's planning calls, measured on hardware backends (on
            # the simulator a host measurement would make its results irreproducible)
            "decision_s": None if backend.simulated else
            getattr(getattr(driver, "mgr", None), "decision_s", None),
            "l1_hits": c.l1_hits, "l2_hits": c.l2_hits, "misses": c.misses,
            "evictions": c.evictions, "demotions": c.demotions, "drops": c.drops,
            "forced_evictions": c.forced_evictions, "fetches": c.fetches,
            "prefetches": c.prefetches, "refusals": c.refusals,
            "lost_blocks": driver.lost_blocks(),
            "needle_retained": None, "output_rel_error": None,
        }
        busy, dec, span = metrics["host_busy_s"], metrics["decision_s"], metrics["run_time_s"]
        if busy is not None and dec is not None and span and span > 0:
            # the host's time apart from the policy's decisions, as a share of the run's own
            # time: the wall time around the run also holds first-use set-up (on the H200 a
            # needle's wall was 9.2 s for a run of 1.13 s), which would dilute the share
            metrics["host_rest_s"] = max(0.0, busy - dec)
            metrics["host_rest_fraction"] = metrics["host_rest_s"] / span
            metrics["decision_fraction"] = dec / span
        accessed = c.l1_hits + c.l2_hits + c.misses
        metrics["l1_hit_rate"] = c.l1_hits / accessed if accessed else None
        metrics.update(summarize(records, driver.rec.step_s))
        metrics.update(driver.metrics())
        res = getattr(driver, "residency_report", None)
        if res is not None:
            metrics.update(res.as_dict())
        env = environment()
        env["backend"] = backend.environment()
        result = {
            "scenario": scenario.name,
            "kind": scenario.kind,
            "backend": backend_name,
            "policy": scenario.policy.eviction,
            "config": to_dict(scenario),
            "environment": env,
            "metrics": metrics,
            "timeline": driver.rec.timeline(),
        }
        return RunResult(result, list(driver.decisions()), ops_table(records))
    finally:
        backend.close()


def _both(first, second):
    if first is None:
        return second

    def both(n):
        first(n)
        second(n)
    return both


def _jsonable(o):
    import numpy as np
    if isinstance(o, np.generic):  # NumPy scalars: integers, floats and bools alike
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_result(run: RunResult, out_dir: Path) -> Path:
    """Write ops.json, decisions.jsonl and then result.json into ``out_dir``, each
    atomically: a folder with a result.json holds all three, whole."""
    from .outputs import atomic_write, make_dir
    make_dir(out_dir)
    atomic_write(out_dir / OPS_FILE, json.dumps(run.ops, default=_jsonable))
    lines = "".join(json.dumps({"step": s, "action": a, "blocks": ids}) + "\n"
                    for s, a, ids in run.decisions)
    atomic_write(out_dir / DECISIONS_FILE, lines)
    atomic_write(out_dir / RESULT_FILE, json.dumps(run.result, indent=1, default=_jsonable))
    return out_dir / RESULT_FILE


def default_out_dir(scenario: Scenario, backend: str, root: Path = Path("runs")) -> Path:
    base = root / f"{scenario.name}-{scenario.policy.eviction}-{backend}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out
