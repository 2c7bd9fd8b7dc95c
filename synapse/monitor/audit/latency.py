"""Latency stability: the step-latency tail with and without L2 traffic, and how much of
the transfer time was hidden behind compute, from the runs' op records.

- The needle scenario twice with the same workload, L1 budget and policy: evicted blocks
  dropped (no L2 traffic: checked, not assumed) and demoted to L2 in fp16 (and fetched
  back). Both attend over what is in L1, so the difference is the tier traffic. The tail
  ratio is p99(with) / p99(without).
- Hidden fraction: for every copy between the tiers (demote, fetch, prefetch; not the
  ingest of new tokens), the part of its [start, end] interval during which the compute
  stream was busy, over the copies' total time; for the needle run (KV blocks) and the
  streaming run (layer weights through the ring). A copy-bound run cannot hide more than
  its compute time, so the graded figure is the overlap efficiency: hidden time over
  min(copy time, compute time).
"""

from __future__ import annotations

import numpy as np

from .grade import Check, at_least, at_most, equals, not_graded

TIER_COPIES = ("demote", "fetch", "prefetch")
P99_RATIO_LIMIT = 1.5
HIDDEN_LIMIT = 0.5


def hidden_fraction(ops: dict) -> tuple[float | None, float | None, float]:
    """(hidden / copy time, hidden / min(copy, compute time), copy seconds) from the
    ``ops.json`` columns."""
    kind, purpose, stream = ops["kind"], ops["purpose"], ops["stream"]
    start, end = np.asarray(ops["start_s"], float), np.asarray(ops["end_s"], float)
    comp = sorted((start[i], end[i]) for i in range(len(kind)) if stream[i] == "compute")
    merged: list[list[float]] = []
    for a, b in comp:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    starts = np.array([m[0] for m in merged]) if merged else np.zeros(0)
    ends = np.array([m[1] for m in merged]) if merged else np.zeros(0)
    total = hidden = 0.0
    for i in range(len(kind)):
        if not kind[i].startswith("copy_") or purpose[i] not in TIER_COPIES:
            continue
        a, b = start[i], end[i]
        total += b - a
        hidden += float(np.clip(np.minimum(ends, b) - np.maximum(starts, a), 0, None).sum())
    busy = float((ends - starts).sum())
    if total <= 0:
        return None, None, 0.0
    return hidden / total, (hidden / min(total, busy) if busy > 0 else None), total


def run(backend: str, needle_overrides: list, stream_overrides: list, run) -> tuple[list, dict]:
    """``run(name, overrides)`` -> RunResult (the audit passes its runner)."""
    flat = run("needle", needle_overrides + ["policy.demote=drop"])
    tiered = run("needle", needle_overrides + ["policy.demote=l2"])
    stream = run("streaming", stream_overrides)
    fm, tm = flat.metrics, tiered.metrics
    flat_traffic = sum(v for k, v in fm["bytes_by_purpose"].items()
                       if k.split("_")[0] in TIER_COPIES)
    p99_flat = fm["latency"]["step"]["p99_us"]
    p99_tier = tm["latency"]["step"]["p99_us"]
    hid_kv, eff_kv, kv_s = hidden_fraction(tiered.ops)
    hid_w, eff_w, w_s = hidden_fraction(stream.ops)
    checks: list[Check] = [
        equals("baseline_tier_copy_bytes", flat_traffic, 0,
               note="the run that drops evicted blocks really copied nothing between the tiers"),
        at_least("l2_run_moves", tm["evictions"] + tm["fetches"] + tm["prefetches"], 1,
                 note="the run with L2 traffic really moved blocks"),
        at_most("step_p99_ratio_with_over_without_l2", p99_tier / p99_flat, P99_RATIO_LIMIT,
                note=f"p99 {p99_tier:.0f} us with L2 traffic, {p99_flat:.0f} us without"),
    ]
    clock = "simulated" if backend == "sim" else "measured"
    for name, frac, eff, secs in (("kv_copy_overlap_efficiency", hid_kv, eff_kv, kv_s),
                                  ("weight_copy_overlap_efficiency", hid_w, eff_w, w_s)):
        note = (f"{secs * 1e3:.2f} ms of tier copies ({clock}), "
                f"{'-' if frac is None else f'{frac:.1%}'} of it hidden behind compute")
        if backend == "cpu":
            checks.append(not_graded(name, eff, f">= {HIDDEN_LIMIT}",
                                     note + "; the cpu backend runs every op synchronously at "
                                     "submit: nothing can overlap there by construction"))
        else:
            checks.append(at_least(name, eff, HIDDEN_LIMIT, note=note))
    details = {"clock": clock,
               "step_latency_without_l2_us": {k: fm["latency"]["step"][k] for k in ("p50_us", "p99_us")},
               "step_latency_with_l2_us": {k: tm["latency"]["step"][k] for k in ("p50_us", "p99_us")},
               "l2_run_bytes_h2d": tm["bytes_h2d"], "l2_run_bytes_d2h": tm["bytes_d2h"],
               "kv_copy_seconds": kv_s, "weight_copy_seconds": w_s,
               "kv_hidden_fraction": hid_kv, "weight_hidden_fraction": hid_w}
    return checks, details
