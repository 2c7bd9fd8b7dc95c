"""Where a scenario run's host time goes: cProfile over one run per scenario and backend.

Issue 11 asks that the host's time apart from policy decisions be at most 25% of the wall
time on cuda. This prints, per run, the run's own split (wall, host busy, decisions, the
rest) and the functions with the most own time, and writes the raw profile (``.pstats``)
and the text beside it, so the work can be aimed at what the profile shows.

    python benchmarks/profile_scenario.py --backend cuda --profile h200 --out $OUT/profile
    python benchmarks/profile_scenario.py --backend sim --scenarios needle --out /tmp/prof

Data checks are off (``checks.data=false``), as in ``scenario_pairs.py``: they compute
references on the host mid-run, which is verification, not the work being timed. cProfile
itself slows Python down (roughly 1.5-2x), so the split printed is from a separate run
without it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synapse.runner import run_scenario  # noqa: E402
from synapse.scenarios.loader import load_scenario  # noqa: E402

SPLIT = ("wall_s", "host_busy_s", "decision_s", "host_rest_s", "host_rest_fraction")


def _per_step(metrics: dict) -> dict:
    """Op and step counts of the run, and the host's time apart from decisions per step
    (hardware backends) or the simulator's own run time per step."""
    lat = metrics.get("latency", {})
    steps = lat.get("step", {}).get("count") or 0
    out = {"steps": steps, "ops": sum(v.get("count", 0) for k, v in lat.items() if k != "step"),
           "attention_ops": lat.get("attention", {}).get("count", 0)}
    rest = metrics.get("host_rest_s")
    if steps:
        out["wall_ms_per_step"] = 1e3 * metrics["wall_s"] / steps
        if rest is not None:
            out["host_rest_ms_per_step"] = 1e3 * rest / steps
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--profile", default="h200")
    ap.add_argument("--scenarios", default="needle,tsunami,tenants")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in a.scenarios.split(","):
        def load():
            return load_scenario(f"scenarios/{name}.yaml",
                                 [f"profile={a.profile}", "checks.data=false", *a.overrides])
        plain = run_scenario(load(), a.backend).result["metrics"]
        prof = cProfile.Profile()
        prof.enable()
        run_scenario(load(), a.backend)
        prof.disable()
        prof.dump_stats(str(a.out / f"{name}-{a.backend}.pstats"))
        text = io.StringIO()
        st = pstats.Stats(prof, stream=text).strip_dirs()
        st.sort_stats("tottime").print_stats(a.top)
        st.sort_stats("cumulative").print_stats(a.top)
        (a.out / f"{name}-{a.backend}.txt").write_text(text.getvalue())
        split = {k: plain.get(k) for k in SPLIT}
        split.update(_per_step(plain))
        summary[name] = split
        print(f"== {name} on {a.backend}: " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in split.items() if v is not None))
        print("\n".join(text.getvalue().splitlines()[:a.top + 12]))
    (a.out / "split.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
