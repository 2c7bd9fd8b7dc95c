"""Host time measured, not guessed: short pieces of each driver on the backend calibrated.

``synapse calibrate`` runs a short piece of every scenario driver (two sizes each, so the
per-step, per-op and per-row costs can be told apart) on the real backend (``cpu`` or
``cuda``), and from each run takes

- the host's busy time the backend measured (``host_busy_s``), less, on the ``cpu``
  backend, the ops' own execution (they run inside ``submit`` there, and the table
  predictor charges them);
- what the simulator charges host time for: steps (safe points), ops submitted, and
  further rows of batched ops (blocks moved).

``fit_host`` fits ``host_s = step_s * steps + submit_s * ops + row_s * rows`` by least
squares weighted for relative error, each run one equation, with coefficients held at
>= 0 (a negative cost is dropped and the rest refitted) and reports every run's residual.
The op records of the same runs give the table predictor (``sim.predictor.fit_table``):
durations over the sizes the scenarios actually use. No figure here is chosen; all come
from the runs of the machine being calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenarios.tiny import TINY_NEEDLE, TINY_STREAM, TINY_TENANTS, TINY_TSUNAMI

# Ops the simulator charges per further row (Copy, Ingest, Zero, Quantize, Dequantize).
ROW_KINDS = ("copy_h2d", "copy_d2h", "copy_d2d", "copy_h2h", "prefill", "memset",
             "int4_quantize", "int4_dequantize")

_TENANTS = ("workload.tenants=[{name: a, share: 0.5, requests: %d, prompt_tokens: %d, "
            "decode_tokens: %d},{name: b, share: 0.5, requests: %d, prompt_tokens: %d, "
            "decode_tokens: %d}]")

# (scenario, overrides, what this piece changes): two sizes of each driver. On cpu the
# tiny shapes the tests use (NumPy runs every op); on cuda the shipped shapes, shortened.
PIECES = {
    "cpu": [
        ("needle", TINY_NEEDLE, "tiny"),
        ("needle", TINY_NEEDLE + ["workload.context_tokens=4096", "workload.decode_steps=32"],
         "4k context, 32 steps"),
        ("needle", TINY_NEEDLE + ["workload.context_tokens=8192", "workload.decode_steps=8"],
         "8k context, 8 steps"),
        ("streaming", TINY_STREAM, "tiny"),
        ("streaming", TINY_STREAM + ["workload.passes=4"], "4 passes"),
        ("tsunami", TINY_TSUNAMI, "tiny"),
        ("tsunami", TINY_TSUNAMI + ["workload.requests=20", "workload.decode_tokens=40"],
         "20 requests x 40 tokens"),
        ("tenants", TINY_TENANTS, "tiny"),
        ("tenants", TINY_TENANTS[:-1] + [_TENANTS % (5, 64, 48, 10, 96, 64)],
         "5 + 10 requests"),
    ],
    "cuda": [
        # 20% of 8k is below one 2048-token prefill chunk: half the chunk
        ("needle", ["workload.context_tokens=8192", "workload.decode_steps=32",
                    "workload.prefill_chunk_tokens=1024"], "8k context, 32 steps"),
        ("needle", ["workload.context_tokens=16384", "workload.decode_steps=64"],
         "16k context, 64 steps"),
        ("needle", ["workload.context_tokens=65536", "workload.decode_steps=16"],
         "64k context, 16 steps"),
        ("streaming", ["workload.passes=1"], "1 pass"),
        ("streaming", ["workload.passes=2"], "2 passes"),
        ("tsunami", ["workload.requests=16", "workload.decode_tokens=16"], "16 requests x 16"),
        ("tsunami", ["workload.requests=32", "workload.decode_tokens=32"], "32 requests x 32"),
        ("tenants", [_TENANTS % (3, 1024, 64, 4, 2048, 96)], "3 + 4 requests"),
        ("tenants", [_TENANTS % (6, 1024, 128, 8, 2048, 192)], "6 + 8 requests"),
    ],
}
HOST_TERMS = ("step", "submit", "row")


@dataclass(frozen=True)
class HostSample:
    """One run's host time and what the simulator charges host time for."""

    piece: str
    steps: int
    ops: int
    rows: int
    host_s: float

    def as_dict(self) -> dict:
        return {"piece": self.piece, "steps": self.steps, "ops": self.ops, "rows": self.rows,
                "host_s": self.host_s}


def sample_from_run(piece: str, records, steps: int, host_busy_s: float,
                    ops_on_host: bool) -> HostSample:
    """A ``HostSample`` from a run's op records and its measured host busy time."""
    rows = sum(r.count - 1 for r in records if r.kind in ROW_KINDS and r.count > 1)
    host = host_busy_s
    if ops_on_host:
        host -= sum(r.end_s - r.start_s for r in records)
    return HostSample(piece, steps, len(records), rows, max(0.0, host))


def fit_host(samples: list[HostSample]) -> dict:
    """Per-step, per-op and per-row host costs (microseconds) fitted to runs, with each
    run's predicted and measured host time and relative residual."""
    if len(samples) < len(HOST_TERMS):
        raise ValueError(f"fit_host needs at least {len(HOST_TERMS)} runs, got {len(samples)}")
    a = np.array([[s.steps, s.ops, s.rows] for s in samples], np.float64)
    y = np.array([s.host_s for s in samples], np.float64)
    if np.any(y <= 0):
        raise ValueError("a run measured no host time: nothing to fit")
    w = 1.0 / y
    active = [j for j in range(a.shape[1]) if a[:, j].any()]
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))  # a negative cost is no cost: drop the most negative
    pred = a @ coef
    residuals = [{**s.as_dict(), "predicted_s": float(p),
                  "rel_error": float((p - s.host_s) / s.host_s)} for s, p in zip(samples, pred)]
    err = np.abs((pred - y) / y)
    return {"step_us": float(coef[0] * 1e6), "submit_us": float(coef[1] * 1e6),
            "per_item_us": float(coef[2] * 1e6),
            "terms_fitted": [HOST_TERMS[j] for j in active],
            "rel_error": {"p50": float(np.median(err)), "max": float(err.max())},
            "runs": residuals}


def run_pieces(backend_name: str, base_profile: str, progress=None, pieces=None,
               repeats: int = 2):
    """Run each piece ``repeats`` times on ``backend_name`` (each run one equation of the
    host fit, its ops all in the table: a machine shared with other work makes single
    runs noisy); returns (host samples, every op record)."""
    from .runner import run_scenario
    from .scenarios.loader import load_scenario

    samples, records = [], []
    pieces = PIECES[backend_name] if pieces is None else pieces
    for name, overrides, what in [p for p in pieces for _ in range(repeats)]:
        # timed as the scenario runs are timed (benchmarks/scenario_pairs.py): without the
        # reference checks, whose host time is no part of a run's
        sc = load_scenario(name, list(overrides) + [f"profile={base_profile}",
                                                    "checks.data=false"])
        counter = _StepCounter()
        label = f"{name} ({what})"
        if progress:
            progress(f"driver piece on {backend_name}: {label}")
        run = run_scenario(sc, backend_name, source=f"calibrate piece {name}",
                           observe=counter.attach)
        busy = run.metrics["host_busy_s"]
        recs = counter.records
        samples.append(sample_from_run(label, recs, counter.steps, busy,
                                       ops_on_host=backend_name == "cpu"))
        records.extend(recs)
    return samples, records


class _StepCounter:
    """Counts the backend's safe points (where the simulator charges a step's host time)
    and keeps the run's op records."""

    def __init__(self):
        self.steps = 0
        self.records = []

    def attach(self, driver, backend):
        inner = backend.step_done

        def step_done():
            self.steps += 1
            inner()
        backend.step_done = step_done  # this run's backend only
        return self

    def step(self, n):
        pass

    def finish(self, records):
        self.records = list(records)
