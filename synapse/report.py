"""Plain-text summaries of results for the terminal."""

from __future__ import annotations

from .units import fmt_bytes, fmt_seconds


def summary_table(result: dict) -> str:
    m = result["metrics"]
    rows = [
        ("scenario", f"{result['scenario']} ({result['kind']})"),
        ("backend / policy", f"{result['backend']} / {result['policy']}"),
        ("run time", fmt_seconds(m.get("run_time_s")) + (" simulated" if m.get("sim_time_s") is not None else " measured")),
        ("wall time", fmt_seconds(m.get("wall_s"))),
        ("L1 hits / L2 hits / misses", f"{m['l1_hits']} / {m['l2_hits']} / {m['misses']}"),
        ("L1 hit rate", "-" if m.get("l1_hit_rate") is None else f"{m['l1_hit_rate']:.3f}"),
        ("evictions (demoted / dropped)", f"{m['evictions']} ({m['demotions']} / {m['drops']})"),
        ("fetches / prefetches", f"{m['fetches']} / {m['prefetches']}"),
        ("refusals / lost blocks", f"{m['refusals']} / {m['lost_blocks']}"),
        ("bytes H2D / D2H", f"{fmt_bytes(m['bytes_h2d'])} / {fmt_bytes(m['bytes_d2h'])}"),
    ]
    for key, label in (("needle_retained", "needle retained"),
                       ("output_rel_error", "output rel. error vs dense"),
                       ("effective_gb_per_s", "effective bandwidth GB/s"),
                       ("stall_s", "compute stall"),
                       ("cross_tenant_denied", "cross-tenant reads refused")):
        if key in m and m[key] is not None:
            v = m[key]
            if key == "stall_s":
                v = fmt_seconds(v)
            elif isinstance(v, float):
                v = f"{v:.4g}"
            rows.append((label, str(v)))
    step = m.get("latency", {}).get("step", {})
    if step.get("count"):
        rows.append(("step p50 / p99", f"{fmt_seconds(step['p50_us'] * 1e-6)} / "
                                       f"{fmt_seconds(step['p99_us'] * 1e-6)}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
