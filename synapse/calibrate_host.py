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
On cuda, ``fit_host_counted`` fits instead against what the simulator counts when it
replays each piece (``replay_counts``: planning calls, L1 pages mapped and unmapped,
pinned bytes zeroed, ops per kind), with the costs measured directly held fixed (see
docs/time-model.md, "Host time, measured").
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
        # every op kind a scenario can issue is in some piece: INT4 demotion quantizes
        # on the way to L2 and dequantizes on the way back
        ("needle", ["workload.context_tokens=16384", "workload.decode_steps=32",
                    "policy.demote=l2_int4"], "16k context, 32 steps, INT4 demotion"),
        ("streaming", ["workload.passes=1"], "1 pass"),
        ("streaming", ["workload.passes=2"], "2 passes"),
        ("tsunami", ["workload.requests=16", "workload.decode_tokens=16"], "16 requests x 16"),
        ("tsunami", ["workload.requests=32", "workload.decode_tokens=32"], "32 requests x 32"),
        ("tenants", [_TENANTS % (3, 1024, 64, 4, 2048, 96)], "3 + 4 requests"),
        ("tenants", [_TENANTS % (6, 1024, 128, 8, 2048, 192)], "6 + 8 requests"),
    ],
}
HOST_TERMS = ("step", "submit", "row")
# Facts a piece's run records besides its host time (older measurement files lack them):
# its overrides (so the simulator can replay it), the manager's decision time and calls,
# and the L1 arena's page maps and unmaps with the host time they took (cuda, VMM arena).
SAMPLE_EXTRAS = ("overrides", "decision_s", "decision_calls", "vmm")


@dataclass(frozen=True)
class HostSample:
    """One run's host time and what the simulator charges host time for."""

    piece: str
    steps: int
    ops: int
    rows: int
    host_s: float
    overrides: tuple | None = None
    decision_s: float | None = None
    decision_calls: int | None = None
    vmm: dict | None = None

    def as_dict(self) -> dict:
        d = {"piece": self.piece, "steps": self.steps, "ops": self.ops, "rows": self.rows,
             "host_s": self.host_s}
        for k in SAMPLE_EXTRAS:
            v = getattr(self, k)
            if v is not None:
                d[k] = list(v) if k == "overrides" else v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HostSample":
        extras = {k: d[k] for k in SAMPLE_EXTRAS if d.get(k) is not None}
        if "overrides" in extras:
            extras["overrides"] = tuple(extras["overrides"])
        return cls(d["piece"], int(d["steps"]), int(d["ops"]), int(d["rows"]),
                   float(d["host_s"]), **extras)


def sample_from_run(piece: str, records, steps: int, host_busy_s: float,
                    ops_on_host: bool, **extras) -> HostSample:
    """A ``HostSample`` from a run's op records and its measured host busy time
    (``extras``: the facts of ``SAMPLE_EXTRAS`` the run recorded)."""
    rows = sum(r.count - 1 for r in records if r.kind in ROW_KINDS and r.count > 1)
    host = host_busy_s
    if ops_on_host:
        host -= sum(r.end_s - r.start_s for r in records)
    return HostSample(piece, steps, len(records), rows, max(0.0, host), **extras)


def _nonnegative_fit(a: np.ndarray, y: np.ndarray, w: np.ndarray):
    """Weighted least squares of ``y`` on the columns of ``a`` with every coefficient
    >= 0: a negative cost is no cost, so the most negative term is dropped and the rest
    refitted. Returns (coefficients, indices of the terms kept)."""
    active = [j for j in range(a.shape[1]) if a[:, j].any()]
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef, active


def fit_host(samples: list[HostSample]) -> dict:
    """Per-step, per-op and per-row host costs (microseconds) fitted to runs, with each
    run's predicted and measured host time and relative residual."""
    if len(samples) < len(HOST_TERMS):
        raise ValueError(f"fit_host needs at least {len(HOST_TERMS)} runs, got {len(samples)}")
    a = np.array([[s.steps, s.ops, s.rows] for s in samples], np.float64)
    y = np.array([s.host_s for s in samples], np.float64)
    if np.any(y <= 0):
        raise ValueError("a run measured no host time: nothing to fit")
    coef, active = _nonnegative_fit(a, y, 1.0 / y)
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
               repeats: int = 3):
    """Run each piece ``repeats`` times on ``backend_name`` (each run one equation of the
    host fit, its ops all in the table: two repeats of one piece differed by up to 22% in
    host time on the H200, so one or two runs are not enough); returns (host samples,
    every op record)."""
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
                                       ops_on_host=backend_name == "cpu",
                                       overrides=tuple(overrides), **counter.extras))
        records.extend(recs)
    return samples, records


class _StepCounter:
    """Counts the backend's safe points (where the simulator charges a step's host time)
    and keeps the run's op records."""

    def __init__(self):
        self.steps = 0
        self.records = []
        self.extras: dict = {}
        self._driver = self._backend = None

    def attach(self, driver, backend):
        inner = backend.step_done

        def step_done():
            self.steps += 1
            inner()
        backend.step_done = step_done  # this run's backend only
        self._driver, self._backend = driver, backend
        return self

    def step(self, n):
        pass

    def finish(self, records):
        self.records = list(records)
        mgr = getattr(self._driver, "mgr", None)
        if hasattr(mgr, "decision_calls") and not self._backend.simulated:  # a TierManager
            self.extras["decision_s"] = float(mgr.decision_s)
            self.extras["decision_calls"] = int(mgr.decision_calls)
        vmm = arena_stats(self._backend)
        if vmm is not None:
            self.extras["vmm"] = vmm


def arena_stats(backend) -> dict | None:
    """The L1 virtual-memory arena's page maps and unmaps and the host time they took
    (``kv.vmm.VmmArena`` keeps them), read before the backend closes; None where L1 is
    not such an arena."""
    arena = backend.l1_arena() if hasattr(backend, "l1_arena") else None
    if arena is None:
        return None
    return {"page_bytes": int(arena.page_bytes), "maps": int(arena.num_maps),
            "map_s": float(arena.map_s), "unmaps": int(arena.num_unmaps),
            "unmap_s": float(arena.unmap_s)}


# -- the host model fitted to what the simulator counts ------------------------------------
# Terms of the counted fit: per step, per op (other kinds), per L1 page mapped or unmapped,
# per request an attention op serves (a serving step's Python per running request).
COUNTED_TERMS = ("step", "submit", "page", "request")
MIN_GAPS = 50  # back-to-back submits of a kind needed to take its submit cost from them


def piece_overrides(sample: HostSample, backend_name: str):
    """The overrides a sample's piece ran with: recorded, or (older files) looked up by
    its label in ``PIECES``; None when neither knows it."""
    if sample.overrides is not None:
        return sample.overrides
    for name, overrides, what in PIECES.get(backend_name, ()):
        if sample.piece == f"{name} ({what})":
            return tuple(overrides)
    return None


def replay_counts(sample: HostSample, backend_name: str, base_profile: str,
                  page_bytes: int) -> dict | None:
    """What the simulator charges host time for in this sample's piece, counted by
    running the piece on it (decisions are the same on every backend): steps, ops per
    kind, further rows, requests served by attention ops, L1 pages mapped and unmapped (an
    arena of ``page_bytes`` pages; 0: none) and bytes of pinned memory zeroed. None when
    the piece is not known."""
    from dataclasses import replace

    from .runner import driver_for
    from .scenarios.loader import load_scenario
    from .sim.backend import SimBackend
    from .sim.profile import load_profile
    overrides = piece_overrides(sample, backend_name)
    if overrides is None:
        return None
    name = sample.piece.split(" (")[0]
    prof = load_profile(base_profile)
    prof = replace(prof, host=replace(prof.host, page_bytes=int(page_bytes)))
    sc = load_scenario(name, list(overrides) + ["checks.data=false"])
    backend = SimBackend(prof)
    driver = driver_for(sc.kind)(sc, backend, prof, f"calibrate replay {name}")
    backend.run(driver.process())
    records = backend.records()
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    return {**backend.host_counts, "ops": len(records), "ops_by_kind": kinds,
            "rows": sum(r.count - 1 for r in records if r.kind in ROW_KINDS and r.count > 1),
            "decision_calls": backend.host_counts["decisions"]}


def back_to_back_us(cols: dict, kind: str) -> tuple[float, int] | None:
    """The median host time between two consecutive submits of ``kind`` (op records as
    ``ops.json`` columns, runs concatenated): the host cost of one such op where the
    driver issues them in a row (attention for each running request); None with fewer
    than ``MIN_GAPS`` such pairs."""
    k, s = cols["kind"], cols["submit_s"]
    gaps = [s[i] - s[i - 1] for i in range(1, len(k))
            if k[i] == k[i - 1] == kind and s[i] > s[i - 1]]
    if len(gaps) < MIN_GAPS:
        return None
    return float(np.median(gaps)) * 1e6, len(gaps)


def fit_host_counted(samples: list[HostSample], counts: list[dict], fixed: dict) -> dict:
    """Host costs fitted to the pieces against what the simulator counts in them
    (``replay_counts``). ``fixed`` holds what was measured directly and is taken out of
    each run's host time before the fit: ``memset_gb_per_s`` (pinned zeroing),
    ``per_item_us`` (a further row: one driver call), ``submit_us_by_kind`` (from
    back-to-back submits) and, where the arena timed them, ``page_map_us`` and
    ``page_unmap_us``, and where the runs timed their decisions, ``decision_us`` (a
    planning call's own time: decisions less the page maps and pinned zeroing they
    include). The rest is fitted as ``step_us * steps + submit_us * other ops +
    page_us * pages + request_us * requests`` (pages mapped plus unmapped where their
    costs were not measured; requests: those the attention ops serve, one per running
    request of a serving step), least squares weighted for relative error, costs held at
    >= 0."""
    by_kind = dict(fixed.get("submit_us_by_kind", {}))
    measured_pages = fixed.get("page_map_us") is not None
    a, y, known = [], [], []
    for s, c in zip(samples, counts):
        fixed_s = (c["pinned_zero_bytes"] / (fixed["memset_gb_per_s"] * 1e9)
                   + c["rows"] * fixed["per_item_us"] * 1e-6
                   + sum(c["ops_by_kind"].get(k, 0) * us * 1e-6 for k, us in by_kind.items()))
        pages = c["pages_mapped"] + c["pages_unmapped"]
        if measured_pages:
            fixed_s += (c["pages_mapped"] * fixed["page_map_us"]
                        + c["pages_unmapped"] * fixed["page_unmap_us"]) * 1e-6
            pages = 0
        other = c["ops"] - sum(c["ops_by_kind"].get(k, 0) for k in by_kind)
        if fixed.get("decision_us") is not None:
            fixed_s += c["decision_calls"] * fixed["decision_us"] * 1e-6
        a.append([c["steps"], other, pages, c.get("requests", 0)])
        y.append(s.host_s - fixed_s)
        known.append(fixed_s)
    a, y = np.array(a, np.float64), np.array(y, np.float64)
    total = np.array([s.host_s for s in samples], np.float64)
    coef, active = _nonnegative_fit(a, y, 1.0 / total)  # relative to the run's host time
    pred = a @ coef + np.array(known)
    err = np.abs((pred - total) / total)
    page_us = float(coef[2] * 1e6)
    out = {"step_us": float(coef[0] * 1e6), "submit_us": float(coef[1] * 1e6),
           "per_item_us": float(fixed["per_item_us"]), "submit_us_by_kind": by_kind,
           "page_map_us": float(fixed["page_map_us"]) if measured_pages else page_us,
           "page_unmap_us": float(fixed["page_unmap_us"]) if measured_pages else page_us,
           "decision_us": float(fixed.get("decision_us") or 0.0),
           "request_us": float(coef[3] * 1e6),
           "terms_fitted": [COUNTED_TERMS[j] for j in active],
           "rel_error": {"p50": float(np.median(err)), "max": float(err.max())},
           "runs": [{**s.as_dict(), "predicted_s": float(p), "rel_error": float((p - s.host_s) / s.host_s)}
                    for s, p in zip(samples, pred)]}
    return out
