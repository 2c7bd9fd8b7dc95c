"""The simulator's host-time model, fitted on calibrate's driver pieces only, against full runs.

    python benchmarks/sim_host_model.py --out benchmarks/results/sim_host_model.json

Reads a measurements file that ``synapse calibrate`` wrote on a GPU (default: the H200
session of 2026-12-01, ``benchmarks/results/h200-2026-12-01-s3``), fits a profile from it
with each host model, runs every scenario that has a committed cuda run on the simulator
with that profile, and prints per scenario the predicted and measured host time and run
time. The full runs are never used in any fit: they are only compared with.

The models:

- ``plain``: ``step_us * steps + submit_us * ops + per_item_us * rows`` fitted to the
  pieces' own counts (what ``calibrate`` did before the counted fit);
- ``counted``: the pieces replayed on the simulator (same decisions) to count what it
  charges host time for, L1 pages mapped and unmapped included, with what was measured
  directly held fixed (pinned zeroing at the memset rate, a further row at the
  micro-benchmark's cost, attention's submit from back-to-back submits in the pieces'
  op records) and the rest fitted; where the pieces recorded them (calibrate since this
  model), the arena's own page timers and the decisions' time are used instead of fits.

A measurements file older than the counted fit does not say the L1 page size: it is then
taken from the cuda scenario runs' environment (``l1_arena``), which the script prints.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "h200-2026-12-01-s3"
SCENARIOS = ("needle", "streaming", "tsunami", "tenants", "needle_heldout", "tsunami_heldout")
HELD_OUT = ("needle_heldout", "tsunami_heldout")


def fail(msg: str) -> int:
    print(f"sim_host_model: {msg}", file=sys.stderr)
    return 2


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(fail(f"{path}: not found ({what})")) from None
    except (OSError, ValueError) as e:
        raise SystemExit(fail(f"{path}: not readable JSON ({what}): {e}")) from None


def page_bytes_of_runs(runs_dir: Path, scenarios) -> int | None:
    """The L1 page size the cuda scenario runs report (``environment.backend.l1_arena``)."""
    for s in scenarios:
        p = runs_dir / f"{s}-cuda" / "result.json"
        if p.is_file():
            arena = json.loads(p.read_text())["environment"]["backend"].get("l1_arena", "")
            m = re.search(r"(\d+) MiB pages", arena)
            return int(m.group(1)) << 20 if m else 0
    return None


def shown(path: Path) -> str:
    """A path as the report keeps it: relative to the repository where it lies inside."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def repeat_spread(samples: list[dict]) -> dict[str, float]:
    """Per piece run more than once: (largest - smallest) / smallest of its host time."""
    by: dict[str, list] = {}
    for s in samples:
        by.setdefault(s["piece"], []).append(s["host_s"])
    return {p: max(v) / min(v) - 1 for p, v in by.items() if len(v) > 1 and min(v) > 0}


def fitted_profiles(measurements: dict, source: Path, page_bytes: int | None, work: Path):
    """(model name, profile path, fit report) for each host model."""
    from synapse.calibrate import build_profile_checked, driver_fit_checked, write_profile
    base, _ = build_profile_checked("h200", measurements, str(source))
    runs = measurements["driver_runs"]
    out = []
    plain = {k: v for k, v in runs.items() if k != "l1_page_bytes"}
    counted = dict(runs)
    if counted.get("l1_page_bytes") is None and page_bytes is not None:
        counted["l1_page_bytes"] = page_bytes
    for name, r in (("plain", plain), ("counted", counted)):
        path = work / f"{name}.yaml"
        prof, report = driver_fit_checked(base, r, path.with_suffix(".optable.json"), str(source))
        write_profile(prof, path)
        out.append((name, path, report))
    return out


def compare(profile: Path, runs_dir: Path, scenarios, progress) -> list[dict]:
    from synapse.runner import run_scenario
    from synapse.scenarios.loader import load_scenario
    rows = []
    for s in progress(scenarios):
        ref = runs_dir / f"{s}-cuda" / "result.json"
        if not ref.is_file():
            continue
        cu = json.loads(ref.read_text())["metrics"]
        sim = run_scenario(load_scenario(s, [f"profile={profile}", "checks.data=false"]),
                           "sim").metrics
        rows.append({"scenario": s, "held_out": s in HELD_OUT,
                     "host_s": {"sim": sim["host_busy_s"], "cuda": cu["host_busy_s"],
                                "rel_error": sim["host_busy_s"] / cu["host_busy_s"] - 1},
                     "run_time_s": {"sim": sim["run_time_s"], "cuda": cu["run_time_s"],
                                    "rel_error": sim["run_time_s"] / cu["run_time_s"] - 1},
                     "cuda_decision_s": cu.get("decision_s")})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measurements", type=Path,
                    default=RESULTS / "profile-fitted" / "h200.measurements.json",
                    help="a measurements file from synapse calibrate on a GPU")
    ap.add_argument("--runs", type=Path, default=RESULTS / "scenario-runs",
                    help="folder of <scenario>-cuda/result.json runs to compare with")
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    from tqdm import tqdm

    from synapse.errors import SynapseError
    m = read_json(a.measurements, "a measurements file from synapse calibrate")
    if not isinstance(m, dict) or "driver_runs" not in m:
        return fail(f"{a.measurements}: driver_runs: missing, expected calibrate's driver "
                    f"pieces (calibrate on a GPU records them)")
    page_bytes = m["driver_runs"].get("l1_page_bytes")
    page_source = "recorded by calibrate"
    if page_bytes is None:
        page_bytes = page_bytes_of_runs(a.runs, a.scenarios)
        page_source = f"from the cuda runs' environment in {shown(a.runs)}"
    print(f"measurements: {shown(a.measurements)}\nL1 page size: {page_bytes} B ({page_source})")
    spread = repeat_spread(m["driver_runs"]["host_samples"])
    if spread:
        print("repeats of one piece differ in host time by "
              + ", ".join(f"{v:.0%} ({p})" for p, v in sorted(spread.items(), key=lambda x: -x[1]))
              + ": no fit to these pieces can be surer than that")
    work = Path(tempfile.mkdtemp(prefix="synapse-host-model-"))
    report = {"measurements": shown(a.measurements), "runs": shown(a.runs),
              "piece_repeat_spread": spread,
              "l1_page_bytes": page_bytes, "l1_page_bytes_source": page_source, "models": {}}
    try:
        models = fitted_profiles(m, a.measurements, page_bytes, work)
        for name, path, fit in models:
            h = fit["host"]
            bar = lambda xs: tqdm(xs, desc=f"{name} model", leave=False)  # noqa: E731
            rows = compare(path, a.runs, a.scenarios, bar)
            report["models"][name] = {
                "host": {k: v for k, v in h.items() if k != "runs"},
                "pieces": [{k: r[k] for k in ("piece", "host_s", "predicted_s", "rel_error")}
                           for r in h["runs"]],
                "scenarios": rows}
            print(f"\n{name} model, fitted on {len(h['runs'])} piece runs: "
                  f"|error| on the pieces p50 {h['rel_error']['p50']:.1%}, max "
                  f"{h['rel_error']['max']:.1%}")
            from synapse.calibrate import format_driver_fit
            print("  " + format_driver_fit(fit)[0])
            print(f"  {'scenario':<18} {'host sim':>9} {'cuda':>7} {'error':>7}   "
                  f"{'run sim':>8} {'cuda':>7} {'error':>7}")
            for r in rows:
                h_, t = r["host_s"], r["run_time_s"]
                tag = "  (held out)" if r["held_out"] else ""
                print(f"  {r['scenario']:<18} {h_['sim']:>8.3f}s {h_['cuda']:>6.3f}s "
                      f"{h_['rel_error']:>+7.1%}   {t['sim']:>7.3f}s {t['cuda']:>6.3f}s "
                      f"{t['rel_error']:>+7.1%}{tag}")
            worst = max(abs(r["run_time_s"]["rel_error"]) for r in rows)
            print(f"  largest run-time |error|: {worst:.1%}")
    except SynapseError as e:
        return fail(str(e))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
