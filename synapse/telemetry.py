"""Telemetry: the same fields from every backend.

A ``Recorder`` collects one row per step (time, L1/L2 occupancy) while a driver runs;
``summarize`` turns the backend's op records and the manager's counters into the metrics
of ``result.json``: hits per tier, bytes moved per direction, latency percentiles per op
kind and per step. ``prometheus_text`` renders those metrics in the Prometheus text
exposition format through ``prometheus_client`` when it is installed.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .ops import OpRecord

PERCENTILES = (50, 90, 99)


def latency_summary(durations_s) -> dict:
    d = np.asarray(durations_s, np.float64) * 1e6
    if d.size == 0:
        return {"count": 0}
    out = {"count": int(d.size), "mean_us": float(d.mean()), "max_us": float(d.max())}
    for p, v in zip(PERCENTILES, np.percentile(d, PERCENTILES)):
        out[f"p{p}_us"] = float(v)
    return out


class Recorder:
    def __init__(self) -> None:
        self.rows: dict[str, list] = defaultdict(list)
        self._last_t = 0.0
        self.step_s: list[float] = []
        self.on_step = None  # e.g. a progress bar's update

    def step(self, index: int, now_s: float, **values) -> None:
        self.rows["step"].append(index)
        self.rows["t_s"].append(now_s)
        for k, v in values.items():
            self.rows[k].append(v)
        self.step_s.append(now_s - self._last_t)
        self._last_t = now_s
        if self.on_step is not None:
            self.on_step(1)

    def timeline(self) -> dict:
        return {k: list(v) for k, v in self.rows.items()}


def summarize(records: list[OpRecord], step_s: list[float]) -> dict:
    """Bytes per direction and latency percentiles per op kind (and per step)."""
    by_kind: dict[str, list] = defaultdict(list)
    bytes_dir = {"h2d": 0, "d2h": 0, "d2d": 0, "h2h": 0}
    bytes_purpose: dict[str, int] = defaultdict(int)
    for r in records:
        by_kind[r.kind].append(r.duration_s)
        if r.kind.startswith("copy_"):
            direction = r.kind[5:]
            bytes_dir[direction] += r.nbytes
            bytes_purpose[f"{r.purpose}_{direction}"] += r.nbytes
    latency = {k: latency_summary(v) for k, v in sorted(by_kind.items())}
    latency["step"] = latency_summary(step_s)
    return {"bytes_h2d": bytes_dir["h2d"], "bytes_d2h": bytes_dir["d2h"],
            "bytes_compacted": bytes_dir["d2d"] + bytes_dir["h2h"],
            "bytes_by_purpose": dict(sorted(bytes_purpose.items())), "latency": latency}


def ops_table(records: list[OpRecord]) -> dict:
    """The op records as columns (for the dashboard's stream lanes and ``compare``)."""
    names = ("kind", "purpose", "stream", "submit_s", "start_s", "end_s", "nbytes", "count")
    return {n: [getattr(r, n) for r in records] for n in names}


def prometheus_text(metrics: dict, labels: dict[str, str]) -> str:
    """Render numeric metrics in the Prometheus exposition format (prometheus_client)."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    reg = CollectorRegistry()
    names = sorted(labels)
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        g = Gauge(f"synapse_{key}", key.replace("_", " "), names, registry=reg)
        g.labels(*[labels[n] for n in names]).set(float(value))
    for kind, lat in metrics.get("latency", {}).items():
        for stat, v in lat.items():
            if stat == "count":
                continue
            name = f"synapse_latency_{kind}_{stat}"
            g = Gauge(name, f"{kind} latency {stat}", names, registry=reg)
            g.labels(*[labels[n] for n in names]).set(v)
    return generate_latest(reg).decode()
