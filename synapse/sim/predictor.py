"""The simulator's time model: one predictor answers how long each op and host action takes.

The SimPy backend never computes a duration itself; it asks its ``Predictor``:

- ``op_seconds(op)``: an op that runs on a stream without the host link (kernels,
  device and host copies, disk I/O);
- ``link_fixed_seconds(op)``: a host-link copy's fixed part, held on a copy engine before
  its bytes flow through the shared link (``sim/link.py`` does the sharing);
- ``submit_seconds(op)``: host time to enqueue an op (and, for an attention op, the
  driver's work per request it serves);
- ``step_seconds()``: host time a driver spends per step outside its submits (the Python
  around the ops: planning, bookkeeping), charged at the step's safe point;
- ``decision_seconds()``: host time of one planning call of the manager (the policy's
  work: the simulator runs the same code and counts the calls);
- ``pinned_zero_seconds(nbytes)``: host memset of pinned memory (what a ``PinnedZero``
  costs where the host runs the ops: the cpu backend; elsewhere it is a D2H copy);
- ``page_map_seconds(pages)``, ``page_unmap_seconds(pages)``: host time to map L1 pages
  as a virtual-memory arena's live prefix grows, and to unmap them at a safe point.

Two predictors: ``ProfilePredictor``, the roofline/fit rates of the profile file, and
``TablePredictor``, per op kind (and per kind and purpose) a piecewise-linear fit over
sizes and rows to op records of a real run (the approach of Vidur's execution-time
predictor, written for our op kinds). A profile selects one with ``predictor: table``
and ``op_table: FILE``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ScenarioError
from ..ops import (Attention, Copy, Dequantize, DiskIO, Ingest, LayerCompute, PinnedZero, Prefill,
                   Quantize, Zero)
from .profile import Profile

PREDICTORS = ("profile", "table")
# Ops whose further rows cost host time (one driver call each on the hardware).
_ROW_OPS = (Copy, Ingest, Zero, Quantize, Dequantize)
# Op kinds that go through the host link model.
LINK_KINDS = ("copy_h2d", "copy_d2h")


def attention_requests(op: Attention) -> int:
    """Requests an attention op serves: its segments (a serving step's batch), else one."""
    return 1 if op.segments is None else len(op.segments) - 1


def is_link_op(op) -> bool:
    return (isinstance(op, Copy) and op.direction in ("h2d", "d2h")) or \
        (isinstance(op, Ingest) and not isinstance(op, Prefill))


class ProfilePredictor:
    """Durations from the profile's rates: ``fixed_us + bytes / rate`` (and a FLOP/s
    ceiling where given); host costs per op, per further row and per step."""

    name = "profile"

    def __init__(self, profile: Profile):
        self.profile = profile
        h = profile.host
        self._submit_s = h.submit_us * 1e-6
        self._submit_by_kind = {k: us * 1e-6 for k, us in h.submit_us_by_kind.items()}
        self._item_s = h.per_item_us * 1e-6
        self._step_s = h.step_us * 1e-6
        self._request_s = h.request_us * 1e-6
        self._stage_s_per_byte = (1.0 / (h.stage_gb_per_s * 1e9)
                                  if h.stage_gb_per_s and not h.ingest_dma else 0.0)
        self._memset_s_per_byte = 1.0 / (h.memset_gb_per_s * 1e9)
        self._latency_s = profile.link.copy_latency_us * 1e-6

    # -- host ---------------------------------------------------------------------
    def submit_seconds(self, op) -> float:
        by_kind = self._submit_by_kind
        cost = by_kind.get(op.kind, self._submit_s) if by_kind else self._submit_s
        if op.count > 1 and isinstance(op, _ROW_OPS):
            cost += (op.count - 1) * self._item_s
        if self._request_s and isinstance(op, Attention):
            cost += attention_requests(op) * self._request_s
        if isinstance(op, Ingest) and not isinstance(op, Prefill):  # host fills pinned staging
            cost += op.nbytes * self._stage_s_per_byte
        if self.profile.host.runs_ops:  # the backend executes the op inside submit
            cost += self.uncontended_seconds(op)
        return cost

    def step_seconds(self) -> float:
        return self._step_s

    def pinned_zero_seconds(self, nbytes: int) -> float:
        return nbytes * self._memset_s_per_byte

    def decision_seconds(self) -> float:
        return self.profile.host.decision_us * 1e-6

    def page_map_seconds(self, pages: int) -> float:
        return pages * self.profile.host.page_map_us * 1e-6

    def page_unmap_seconds(self, pages: int) -> float:
        return pages * self.profile.host.page_unmap_us * 1e-6

    # -- device -------------------------------------------------------------------
    def uncontended_seconds(self, op) -> float:
        """The op's whole duration when nothing shares the link with it."""
        if isinstance(op, PinnedZero) and self.profile.host.runs_ops:
            return self.pinned_zero_seconds(op.nbytes)  # the cpu backend's memset
        if is_link_op(op):
            return self.link_fixed_seconds(op) + self.op_seconds(op)
        return self.op_seconds(op)

    def link_fixed_seconds(self, op) -> float:
        return op.count * self._latency_s

    def op_seconds(self, op) -> float:
        """Seconds of an op on its stream; for a link copy, the bytes at the link's own
        rate (only the link model shares it; used when the host runs ops itself)."""
        p, k = self.profile, self.profile.kernels
        if is_link_op(op):
            d = "d2h" if isinstance(op, Copy) and op.direction == "d2h" else "h2d"
            return op.nbytes / ((p.link.d2h_gb_per_s if d == "d2h" else p.link.h2d_gb_per_s) * 1e9)
        if isinstance(op, Copy):
            if op.direction == "d2d":  # bytes read + written at the device copy rate
                return k.copy.seconds(2 * op.nbytes, 1)
            return p.host.memcpy_seconds(op.nbytes)
        if isinstance(op, Prefill):
            return k.gemm.seconds(0, 1, op.flops)
        if isinstance(op, DiskIO):
            rate = p.disk.read if op.direction == "read" else p.disk.write
            return rate.seconds(op.nbytes, op.count)
        if isinstance(op, Quantize):
            return k.int4_quantize.seconds(op.nbytes, op.count)
        if isinstance(op, Dequantize):
            return k.int4_dequantize.seconds(op.nbytes, op.count)
        if isinstance(op, Attention):
            return k.attention.seconds(op.nbytes, 1, op.flops)
        if isinstance(op, LayerCompute):
            return k.gemm.seconds(op.weight_bytes, 1, op.flops)
        if isinstance(op, Zero):
            return k.memset.seconds(op.nbytes, op.count)
        raise TypeError(f"the simulator has no cost model for {type(op).__name__}")


# -- the table predictor ------------------------------------------------------------
MAX_KNOTS = 6


@dataclass(frozen=True)
class KindFit:
    """``seconds = c0 + c1 * x + sum_j h_j * max(0, x - knot_j) + r * (rows - 1)`` with
    ``x`` the op's bytes in MiB: piecewise linear over sizes, linear in further rows."""

    knots_mib: tuple
    coef: tuple          # c0, c1, h_1..h_k, r
    bytes_range: tuple   # the sizes it was fitted on (beyond: the last segment continues)
    n: int
    rel_error: dict      # p50, p90, max of |predicted - measured| / measured on its points

    def seconds(self, nbytes: float, count: int = 1) -> float:
        x = nbytes / 2**20
        c = self.coef
        t = c[0] + c[1] * x + sum(h * max(0.0, x - k) for h, k in zip(c[2:-1], self.knots_mib))
        t += c[-1] * max(0, count - 1)
        return max(t, 0.0)

    def as_dict(self) -> dict:
        return {"knots_mib": list(self.knots_mib), "coef": list(self.coef),
                "bytes_range": list(self.bytes_range), "n": self.n, "rel_error": self.rel_error}


def _design(x_mib: np.ndarray, rows: np.ndarray, knots) -> np.ndarray:
    cols = [np.ones_like(x_mib), x_mib] + [np.maximum(0.0, x_mib - k) for k in knots]
    cols.append(np.maximum(0, rows - 1).astype(np.float64))
    return np.stack(cols, axis=1)


def _bins(x: np.ndarray, rows: np.ndarray, t: np.ndarray):
    """Records grouped by size and row count (powers of two), each group its medians and
    its size: one noisy op (a first call, a scheduler tick) moves a median, not a fit."""
    key = np.stack([np.floor(np.log2(np.maximum(x, 1e-9))), np.floor(np.log2(rows))], axis=1)
    _, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    groups = [np.flatnonzero(inv == g) for g in range(inv.max() + 1)]
    med = lambda v: np.array([np.median(v[g]) for g in groups])  # noqa: E731
    return med(x), med(rows), med(t), np.array([g.size for g in groups], np.float64)


def fit_kind(nbytes, seconds, counts=None) -> KindFit:
    """Least-squares fit of one op kind's records: grouped by size and rows (``_bins``),
    each group's median weighted for relative error (divided by its own time, so short
    ops count as much as long ones) and by the square root of its size. Knots sit at
    quantiles of the groups' sizes (at most ``MAX_KNOTS``); a column the data cannot
    determine (one size only, or one row count only) gets a zero coefficient. The stated
    error is over every record, not over the medians."""
    x_all = np.asarray(nbytes, np.float64) / 2**20
    t_all = np.asarray(seconds, np.float64)
    rows_all = np.ones_like(x_all) if counts is None else np.asarray(counts, np.float64)
    keep = t_all > 0
    x_all, t_all, rows_all = x_all[keep], t_all[keep], np.maximum(rows_all[keep], 1)
    if x_all.size == 0:
        raise ValueError("no op records with a positive duration")
    x, rows, t, n = _bins(x_all, rows_all, t_all)
    distinct = np.unique(x)
    k = min(MAX_KNOTS, max(0, distinct.size - 2))
    knots = tuple(float(v) for v in np.quantile(distinct, np.linspace(0, 1, k + 2)[1:-1])) \
        if k else ()
    a = _design(x, rows, knots)
    w = np.sqrt(n) / t
    coef = np.zeros(a.shape[1])
    usable = [j for j in range(a.shape[1]) if np.ptp(a[:, j]) > 0 or j == 0]
    last = a.shape[1] - 1
    if last in usable and 1 in usable and abs(np.corrcoef(a[:, 1], a[:, last])[0, 1]) > 0.99:
        usable.remove(last)  # rows grow with bytes (one block size): bytes alone say it
    sol, *_ = np.linalg.lstsq(a[:, usable] * w[:, None], t * w, rcond=None)
    coef[usable] = sol
    fit = KindFit(knots, tuple(float(c) for c in coef),
                  (int(round(x_all.min() * 2**20)), int(round(x_all.max() * 2**20))),
                  int(x_all.size), {})
    pred = np.array([fit.seconds(b * 2**20, int(r)) for b, r in zip(x_all, rows_all)])
    err = np.abs(pred - t_all) / t_all
    return KindFit(fit.knots_mib, fit.coef, fit.bytes_range, fit.n,
                   {"p50": float(np.median(err)), "p90": float(np.quantile(err, 0.9)),
                    "max": float(err.max())})


def fit_table(records) -> dict[str, KindFit]:
    """A ``KindFit`` per op kind, and per ``kind/purpose`` of it, from records
    (``OpRecord``s or ``ops.json`` columns): one kind can hold ops whose time has other
    causes (an ingest's payload is produced on the host inside the op on the cpu backend;
    a fetch is a copy), and the predictor takes the purpose's fit where there is one."""
    if isinstance(records, dict):  # ops.json columns
        cols = records
        kinds, purposes = cols["kind"], cols["purpose"]
        nb, cnt = cols["nbytes"], cols["count"]
        dur = [e - s for s, e in zip(cols["start_s"], cols["end_s"])]
    else:
        kinds, purposes = [r.kind for r in records], [r.purpose for r in records]
        nb, cnt = [r.nbytes for r in records], [r.count for r in records]
        dur = [r.end_s - r.start_s for r in records]
    by: dict[str, list] = {}
    for k, p, b, c, d in zip(kinds, purposes, nb, cnt, dur):
        by.setdefault(k, []).append((b, c, d))
        if p:
            by.setdefault(f"{k}/{p}", []).append((b, c, d))
    out = {}
    for k, pts in sorted(by.items()):
        b, c, d = zip(*pts)
        try:
            out[k] = fit_kind(b, d, c)
        except ValueError:
            continue  # only zero-length records (ops that did nothing): nothing to fit
    return out


def write_table(fits: dict[str, KindFit], path: Path, facts: dict | None = None) -> None:
    from ..outputs import atomic_write
    atomic_write(path, json.dumps({"op_table": 1, "facts": facts or {},
                                   "kinds": {k: f.as_dict() for k, f in fits.items()}}, indent=1))


def read_table(path: Path) -> dict[str, KindFit]:
    """An op table file; a file that is not one is one ScenarioError line naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: op table not found (profile field op_table; "
                            f"`synapse calibrate` writes it beside the profile)") from None
    except (OSError, ValueError) as e:
        raise ScenarioError(f"{path}: not a readable op table "
                            f"({' '.join(str(e).split())})") from None
    if not isinstance(data, dict) or not isinstance(data.get("kinds"), dict):
        raise ScenarioError(f"{path}: not an op table (expected a JSON object with 'kinds')")
    fits = {}
    for kind, d in data["kinds"].items():
        try:
            knots = tuple(float(v) for v in d["knots_mib"])
            coef = tuple(float(v) for v in d["coef"])
            if len(coef) != len(knots) + 3 or not all(math.isfinite(v) for v in coef):
                raise ValueError(f"{len(coef)} coefficients for {len(knots)} knots")
            fits[kind] = KindFit(knots, coef, tuple(d.get("bytes_range", (0, 0))),
                                 int(d.get("n", 0)), dict(d.get("rel_error", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ScenarioError(f"{path}: kinds.{kind}: expected knots_mib and coef "
                                f"(len(knots) + 3 numbers), got {d!r:.80} ({e})") from None
    return fits


class TablePredictor(ProfilePredictor):
    """Op durations from a table fitted to a real run's op records; kinds the
    table lacks (or host costs) come from the profile. A link copy's table time is its
    uncontended time: its fixed part is what exceeds the bytes at the link's rate, so
    the link model still shares bandwidth when copies overlap."""

    name = "table"

    def __init__(self, profile: Profile, fits: dict[str, KindFit]):
        super().__init__(profile)
        self.fits = fits

    def _table(self, op) -> float | None:
        """The op's table time, from the fit of its kind and purpose, else of its kind;
        None (the profile's model) where that fit saw no op this small: below its smallest
        size a fit's first segment is an extrapolation whose intercept may be anything
        (the H200 quick calibration's zero_on_free fit, from 22 MB up, gave 0 us at 5.5 MB
        where the GPU took 49 us), while the profile's fixed cost and rate were measured
        over small sizes too. Link copies keep their table (its fixed part carries the
        queueing behind other copies that the link model does not have: a 0.69 MB fetch
        took 43 us on the H200, 15 us at the link's rate)."""
        f = self.fits.get(f"{op.kind}/{op.purpose}") or self.fits.get(op.kind)
        # a purpose's fit out of its range does not fall back to the kind's: that one mixes
        # purposes (a memset on free and pinned zeroing by D2H copies)
        if f is None or (op.nbytes < f.bytes_range[0] and not is_link_op(op)):
            return None
        return f.seconds(op.nbytes, op.count)

    def link_fixed_seconds(self, op) -> float:
        t = self._table(op)
        if t is None:
            return super().link_fixed_seconds(op)
        return max(0.0, t - super().op_seconds(op))

    def op_seconds(self, op) -> float:
        t = None if is_link_op(op) else self._table(op)
        return super().op_seconds(op) if t is None else t


def predictor_for(profile: Profile):
    """The predictor a profile selects (``predictor:`` field)."""
    if profile.predictor == "table":
        if not profile.op_table:
            raise ScenarioError(f"profile {profile.name}: predictor 'table' needs op_table "
                                f"(the op table file written by synapse calibrate)")
        return TablePredictor(profile, read_table(Path(profile.op_table)))
    return ProfilePredictor(profile)
