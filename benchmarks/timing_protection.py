"""Cost of timing protection: the tenants scenario with tenant b (the one over its share, so swapped most) protected, its swap-ins
padded to a quantum, against the same run unpadded (tiny sizes; sim and cpu).

Prints and writes, per backend and quantum: run time, step p99, time added by padding,
and the protected tenant's observed swap-in durations (distinct values: unpadded they
vary with what was fetched; padded they are whole quanta).

    python benchmarks/timing_protection.py [--out benchmarks/results/timing_protection.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from synapse.drivers.serving import ServingDriver
from synapse.runner import make_backend
from synapse.scenarios.loader import load_scenario
from synapse.scenarios.tiny import TINY_TENANTS
from synapse.sim.profile import load_profile

PROTECT_B = TINY_TENANTS[-1].replace("{name: b, share: 0.5,", "{name: b, share: 0.5, protected: true,")
QUANTA_US = {"sim": (0, 100, 500), "cpu": (0, 2000, 10000)}


def run(backend: str, quantum_us: float) -> dict:
    sc = load_scenario("tenants", TINY_TENANTS[:-1] + [PROTECT_B,
                                                       f"policy.fetch_quantum_us={quantum_us}"])
    prof = load_profile(sc.profile)
    be = make_backend(backend, prof)
    try:
        d = ServingDriver(sc, be, prof)
        be.run(d.process())
        steps = sorted(d.rec.step_s)
        seen = d.protected_fetch_s
        return {"quantum_us": quantum_us, "run_time_s": be.now(),
                "step_p99_s": steps[int(0.99 * (len(steps) - 1))],
                "padded_fetches": d.padded_fetches, "fetch_pad_s": d.fetch_pad_s,
                "protected_swapins": len(seen),
                "protected_swapin_us": [round(s * 1e6, 1) for s in seen]}
    finally:
        be.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/timing_protection.json"))
    args = ap.parse_args()
    out = {"load_average_1_5_15": os.getloadavg(), "cpus": os.cpu_count()}
    for backend, quanta in QUANTA_US.items():
        rows = [run(backend, q) for q in quanta]
        base = rows[0]["run_time_s"]
        for r in rows:
            r["cost_of_run_time"] = r["run_time_s"] / base - 1
            r["pad_share_of_run_time"] = r["fetch_pad_s"] / r["run_time_s"]
            print(f"{backend} quantum {r['quantum_us']:>6.0f} us: run {r['run_time_s'] * 1e3:8.2f} ms "
                  f"({r['cost_of_run_time']:+.1%}), pad {r['fetch_pad_s'] * 1e3:.2f} ms over "
                  f"{r['padded_fetches']} swap-ins; protected swap-ins seen (us): "
                  f"{sorted(set(r['protected_swapin_us']))[:6]}")
        out[backend] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
