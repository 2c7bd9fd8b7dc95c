"""Host busy time between consecutive submits of calibrate's driver pieces (diagnosis).

    python benchmarks/host_gaps.py --measurements profiles/h200-s7.measurements.json

Each piece is replayed on the simulator (its decisions, and so its ops, are those of the
cuda run), which names the tickets the driver waits for after each submit. A gap between
two submits of the cuda op records is host busy time where the driver waited for nothing
that ended inside it; where it did, the busy part is the op's preparation (its device start
less its submit, when that start came first) plus the time from the last awaited end to
the next submit. The estimate is checked against each piece's measured host busy time:
per-op-kind host costs could then be fitted from hundreds of gaps instead of a few totals.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path


def runs_of(cols: dict) -> list[list[int]]:
    """Op indices of each run in concatenated op records (the submit clock restarts)."""
    runs, cur = [], []
    for i, s in enumerate(cols["submit_s"]):
        if cur and s < cols["submit_s"][cur[-1]]:
            runs.append(cur)
            cur = []
        cur.append(i)
    return runs + [cur] if cur else runs


def replay_waits(name: str, overrides, profile: str) -> list[dict]:
    """Per op in submit order: its kind, the ops waited for before the next submit, and
    the L1 pages unmapped before it (a trim waits for every stream)."""
    from synapse.runner import driver_for
    from synapse.scenarios.loader import load_scenario
    from synapse.sim.backend import SimBackend
    from synapse.sim.profile import load_profile
    prof = load_profile(profile)
    sc = load_scenario(name, list(overrides) + ["checks.data=false"])
    be = SimBackend(prof)
    rows, index, unmapped = [], {}, collections.Counter()
    enqueue, wait, unmap = be._enqueue, be.wait, be.unmap_pages

    def counted_enqueue(op, stream, after):
        rows.append({"kind": op.kind, "waits": [], "unmaps": unmapped.pop("n", 0)})
        ticket = enqueue(op, stream, after)
        index[id(ticket)] = len(rows) - 1
        return ticket

    def counted_wait(tickets):
        if rows:
            rows[-1]["waits"] += [index[id(t)] for t in tickets if id(t) in index]
        return wait(tickets)

    def counted_unmap(n):
        unmapped["n"] += n
        return unmap(n)
    be._enqueue, be.wait, be.unmap_pages = counted_enqueue, counted_wait, counted_unmap
    be.run(driver_for(sc.kind)(sc, be, prof, "host gaps").process())
    return rows


def gap_busy(cols: dict, idx: list[int], rows: list[dict]) -> list[float]:
    """Estimated host busy seconds from each submit to the next (the last op: none)."""
    sub = [cols["submit_s"][i] for i in idx]
    start = [cols["start_s"][i] for i in idx]
    end = [cols["end_s"][i] for i in idx]
    out = []
    for j in range(len(idx) - 1):
        a, b = sub[j], sub[j + 1]
        ends = [end[k] for k in rows[j]["waits"] if a < end[k] < b]
        if rows[j + 1]["unmaps"]:
            ends += [end[k] for k in range(j + 1) if a < end[k] < b]
        if not ends:
            out.append(b - a)
            continue
        last = max(ends)
        out.append(max(0.0, min(start[j], last) - a) + (b - last))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measurements", type=Path, required=True)
    a = ap.parse_args(argv)
    from synapse.calibrate import build_profile_checked, write_profile
    m = json.loads(a.measurements.read_text())
    runs = m["driver_runs"]
    work = Path(tempfile.mkdtemp(prefix="synapse-host-gaps-"))
    base, _ = build_profile_checked("h200", m, str(a.measurements))
    # the replay needs the L1 arena's pages (they decide which ranges are zeroed)
    base = replace(base, host=replace(base.host, page_bytes=int(runs.get("l1_page_bytes") or 0)))
    write_profile(base, work / "base.yaml")
    cols = runs["op_records"]
    pieces = runs_of(cols)
    if len(pieces) != len(runs["host_samples"]):
        print(f"host_gaps: {len(pieces)} runs in the op records, "
              f"{len(runs['host_samples'])} host samples", file=sys.stderr)
        return 2
    for s, idx in zip(runs["host_samples"], pieces):
        name = s["piece"].split(" (")[0]
        rows = replay_waits(name, s["overrides"], str(work / "base.yaml"))
        if [r["kind"] for r in rows] != [cols["kind"][i] for i in idx]:
            print(f"host_gaps: {s['piece']}: the replay's ops differ from the records",
                  file=sys.stderr)
            return 2
        busy = sum(gap_busy(cols, idx, rows)) + cols["submit_s"][idx[0]]
        print(f"{s['piece']:<44} ops {len(idx):>5}  host measured {s['host_s']:.4f} s, "
              f"from the gaps {busy:.4f} s ({busy / s['host_s'] - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
