"""Calibration: turn timings measured on a real GPU into a hardware profile.

Every rate in a profile has the form ``time = fixed_us + bytes / rate`` (kernels with an
arithmetic ceiling also ``flops / tflops``). ``fit_rate`` fits that line to measured
(bytes, seconds) points by least squares weighted for relative error, so small transfers
(which fix the fixed cost) count as much as large ones (which fix the bandwidth).
``build_profile`` assembles a ``Profile`` from a measurement record; the measuring itself
(``synapse.hw.measure``) needs the GPU, the fitting and the file format do not.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from .config import build, to_dict
from .errors import ScenarioError
from .sim.profile import Disk, Host, Kernels, Link, Profile, Rate


def fit_rate(nbytes, seconds, calls=1, tflops: float = 0.0) -> Rate:
    """Least-squares fit of ``seconds = calls * fixed + nbytes / rate``.

    ``nbytes``/``seconds`` are per measurement (medians of repeats); ``calls`` is how many
    calls each measurement made. Relative weighting: each point's residual is divided by
    its own time. Returns a ``Rate`` in microseconds and GB/s.
    """
    x = np.asarray(nbytes, np.float64)
    t = np.asarray(seconds, np.float64)
    c = np.broadcast_to(np.asarray(calls, np.float64), x.shape)
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("fit_rate needs measurements at two or more sizes")
    w = 1.0 / t
    a = np.stack([c * w, x * w], axis=1)
    (fixed, per_byte), *_ = np.linalg.lstsq(a, t * w, rcond=None)
    if per_byte <= 0:
        raise ValueError(f"measurements do not grow with size (slope {per_byte:.3g} s/B)")
    return Rate(fixed_us=max(0.0, float(fixed) * 1e6), gb_per_s=float(1e-9 / per_byte),
                tflops=tflops)


def fit_error(rate: Rate, nbytes, seconds, calls=1) -> float:
    """Largest relative error of the fitted line over the measured points."""
    x = np.asarray(nbytes, np.float64)
    pred = np.asarray([rate.seconds(b, int(c)) for b, c in
                       zip(x, np.broadcast_to(np.asarray(calls), x.shape))])
    return float(np.max(np.abs(pred - np.asarray(seconds)) / np.asarray(seconds)))


def build_profile(name: str, m: dict) -> tuple[Profile, dict]:
    """A profile from a measurement record (see ``synapse.hw.measure.measure_all``).

    Returns the profile and the fit quality (largest relative error per fitted rate).
    """
    def rate(key, tflops=0.0):
        pts = m[key]
        r = fit_rate(pts["bytes"], pts["seconds"], pts.get("calls", 1), tflops)
        quality[key] = round(fit_error(r, pts["bytes"], pts["seconds"], pts.get("calls", 1)), 4)
        return r

    quality: dict[str, float] = {}
    h2d, d2h = rate("h2d"), rate("d2h")
    link = Link(h2d_gb_per_s=h2d.gb_per_s, d2h_gb_per_s=d2h.gb_per_s,
                duplex_gb_per_s=float(m["duplex_gb_per_s"]),
                copy_latency_us=(h2d.fixed_us + d2h.fixed_us) / 2,
                copy_engines=int(m["copy_engines"]))
    gemm = m["gemm"]
    kernels = Kernels(
        attention=rate("attention"),
        int4_quantize=rate("int4_quantize"),
        int4_dequantize=rate("int4_dequantize"),
        memset=rate("memset"),
        gemm=Rate(fixed_us=float(gemm["fixed_us"]), gb_per_s=float(gemm["gb_per_s"]),
                  tflops=float(gemm["tflops"])),
    )
    if m.get("device_copy_gb_per_s"):  # read + written; the launch cost is a memset's
        kernels = replace(kernels, copy=Rate(fixed_us=kernels.memset.fixed_us,
                                                         gb_per_s=float(m["device_copy_gb_per_s"])))
    host = Host(submit_us=float(m["host_submit_us"]),
                per_item_us=max(0.0, float(m.get("host_per_item_us", 0.0))),
                memset_gb_per_s=float(m["host_memset_gb_per_s"]),
                stage_gb_per_s=float(m.get("host_stage_gb_per_s", 0.0)))
    disk = disk_from_record(m["disk"], quality) if "disk" in m else Disk()
    prof = Profile(name=name, device=m["environment"].get("device", ""),
                   hbm_bytes=int(m["hbm_bytes"]), host_pinned_bytes=int(m["host_pinned_bytes"]),
                   link=link, kernels=kernels, host=host, disk=disk,
                   measured={"environment": {k: str(v) if not isinstance(v, (int, float, dict)) else v
                                             for k, v in m["environment"].items()}, "fit_max_rel_error": quality,
                             "device_copy_gb_per_s": m.get("device_copy_gb_per_s"),
                             "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    if "disk" in m:
        prof = replace(prof, measured=dict(prof.measured, disk=disk_facts(m["disk"])))
    return prof, quality


def disk_from_record(d: dict, quality: dict) -> Disk:
    """The disk section from ``synapse.hw.measure_disk.disk_sweep``'s record."""
    rates = {}
    for direction in ("read", "write"):
        pts = d[direction]
        rates[direction] = fit_rate(pts["bytes"], pts["seconds"], pts.get("calls", 1))
        quality[f"disk_{direction}"] = round(fit_error(rates[direction], pts["bytes"],
                                                       pts["seconds"], pts.get("calls", 1)), 4)
    return Disk(device=f"{d.get('filesystem') or d['directory']} (measured, {d['method']})",
                read=rates["read"], write=rates["write"])


def with_disk(base: Profile, name: str, d: dict) -> tuple[Profile, dict]:
    """``base`` with its disk section measured (``calibrate --backend disk``)."""
    quality: dict[str, float] = {}
    disk = disk_from_record(d, quality)
    measured = dict(base.measured, disk=disk_facts(d), disk_fit_max_rel_error=quality)
    return replace(base, name=name, disk=disk, measured=measured), quality


def disk_facts(d: dict) -> dict:
    """How the disk was measured (kept with the profile)."""
    return {k: d[k] for k in ("directory", "filesystem", "method", "cache_effects",
                              "read_gb_per_s", "cached_read_gb_per_s")}


def write_profile(prof: Profile, path: Path, measured_on: str | None = None) -> None:
    """Write the profile YAML (atomically), checked to load back."""
    from .outputs import atomic_write
    header = (f"# Measured by `synapse calibrate` on {measured_on or prof.device}.\n"
              f"# Rates are GB/s (1e9 bytes/s); fixed costs are microseconds.\n")
    text = header + yaml.safe_dump(to_dict(prof), sort_keys=False)
    build(Profile, yaml.safe_load(text), str(path))  # what we write must load back
    atomic_write(path, text)


def build_profile_checked(name: str, m, source: str) -> tuple[Profile, dict]:
    """``build_profile`` for a record read from a file: a record that is not one (a key
    missing, a value of the wrong type, measurements that cannot be fitted) is one
    ScenarioError line naming the file."""
    if not isinstance(m, dict):
        raise ScenarioError(f"{source}: expected a measurement record (a JSON object) from "
                            f"synapse calibrate, got {type(m).__name__}")
    try:
        return build_profile(name, m)
    except KeyError as e:
        raise ScenarioError(f"{source}: not a measurement record from synapse calibrate "
                            f"(no {e.args[0]!r})") from None
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        raise ScenarioError(f"{source}: cannot fit a profile from these measurements "
                            f"({' '.join(str(e).split())})") from None


def measure_driver_runs(backend_name: str, base_profile: str, progress=None,
                        quick: bool = False, repeats: int | None = None,
                        pieces: str | None = None) -> dict:
    """Short pieces of every driver on the real backend (``calibrate_host.PIECES``; with
    ``quick`` the smaller piece of each, once; ``pieces`` "all" or "small" and
    ``repeats`` say otherwise): the host samples and the op records, as the plain data a
    measurements file keeps."""
    from .calibrate_host import PIECES, run_pieces
    from .telemetry import ops_table
    chosen = PIECES[backend_name]
    if (pieces or ("small" if quick else "all")) == "small":
        chosen = [p for i, p in enumerate(chosen) if i == 0 or chosen[i - 1][0] != p[0]]
    repeats = repeats or (1 if quick else 3)
    samples, records = run_pieces(backend_name, base_profile, progress, chosen, repeats=repeats)
    # the L1 arena's page size (0: one allocation): the simulator replays the pieces with
    # it to count the page maps the host paid for
    page_bytes = next((s.vmm["page_bytes"] for s in samples if s.vmm), 0)
    return {"backend": backend_name, "base": base_profile, "l1_page_bytes": page_bytes,
            "host_samples": [s.as_dict() for s in samples], "op_records": ops_table(records)}


def counted_host_fit(prof: Profile, runs: dict, samples) -> dict | None:
    """The host fit against what the simulator counts in each piece (``calibrate_host.
    fit_host_counted``), for cuda runs that say their L1 page size; None where that
    cannot be done (cpu runs, an older file without the page size, a piece the replay
    does not know): the plain fit is used then."""
    from .calibrate_host import back_to_back_us, fit_host_counted, replay_counts
    page_bytes = runs.get("l1_page_bytes")
    if runs["backend"] != "cuda" or page_bytes is None:
        return None
    replayed: dict = {}  # a piece run twice is replayed once: the simulator is deterministic
    for s in samples:
        key = (s.piece, s.overrides)
        if key not in replayed:
            replayed[key] = replay_counts(s, runs["backend"], runs.get("base") or "h200",
                                          int(page_bytes))
    counts = [replayed[(s.piece, s.overrides)] for s in samples]
    if any(c is None for c in counts):
        return None
    fixed = {"memset_gb_per_s": prof.host.memset_gb_per_s, "per_item_us": prof.host.per_item_us,
             "submit_us_by_kind": {}}
    att = back_to_back_us(runs["op_records"], "attention")
    if att is not None:
        fixed["submit_us_by_kind"]["attention"] = att[0]
    timed = [s.vmm for s in samples if s.vmm and s.vmm["maps"] and s.vmm["unmaps"]]
    if timed:  # the arena's own timers: a cost per page measured, not fitted
        fixed["page_map_us"] = 1e6 * sum(v["map_s"] for v in timed) / sum(v["maps"] for v in timed)
        fixed["page_unmap_us"] = 1e6 * sum(v["unmap_s"] for v in timed) / sum(v["unmaps"] for v in timed)
    # Pieces whose driver has a tier manager timed its planning calls (streaming has none:
    # no decision_s, no calls in its replay); requiring every piece to have one left the
    # H200 quick calibration of 2026-12-02 without a decision cost.
    planned = [(s, c) for s, c in zip(samples, counts)
               if s.decision_s is not None and s.vmm and c["decision_calls"]]
    if timed and planned and all(s.decision_s is not None for s, c in zip(samples, counts)
                                 if c["decision_calls"]):
        # planning calls map the L1 pages they allocate and zero the pinned L2 they free
        # (commit); what remains is the policy's and the manager's own time
        memset = prof.host.memset_gb_per_s * 1e9
        own = sum(s.decision_s - s.vmm["map_s"] - c["pinned_zero_bytes"] / memset
                  for s, c in planned)
        fixed["decision_us"] = max(0.0, 1e6 * own / sum(c["decision_calls"] for _, c in planned))
    fit = fit_host_counted(samples, counts, fixed)
    fit["page_bytes"] = int(page_bytes)
    fit["measured"] = {"attention_back_to_back": None if att is None else
                       {"us": att[0], "pairs": att[1]},
                       "page_costs_timed": bool(timed),
                       "decision_s": [s.decision_s for s in samples]
                       if planned else None}
    return fit


def with_driver_fit(prof: Profile, runs: dict, op_table: Path) -> tuple[Profile, dict]:
    """``prof`` with its host costs fitted to driver runs and its predictor set to a table
    of op durations fitted to their op records (written to ``op_table``). Returns the
    profile and the fit report: host coefficients with each run's residual, and per op
    kind the table's error and, beside it, the error of a roofline line refitted to the
    same records (the other predictor's best on these sizes)."""
    from .calibrate_host import HostSample, fit_host
    from .sim.predictor import fit_table, write_table
    samples = [HostSample.from_dict(s) for s in runs["host_samples"]]
    host_fit = counted_host_fit(prof, runs, samples) or fit_host(samples)
    fits = fit_table(runs["op_records"])
    cols = runs["op_records"]
    kinds_report = {}
    for kind, f in fits.items():
        pts = [(b, c, e - s) for k, p, b, c, s, e in zip(
            cols["kind"], cols["purpose"], cols["nbytes"], cols["count"], cols["start_s"],
            cols["end_s"]) if kind in (k, f"{k}/{p}") and e > s]
        entry = {"n": f.n, "bytes_range": list(f.bytes_range), "table_rel_error": f.rel_error}
        b, c, d = (np.array(v, np.float64) for v in zip(*pts))
        try:
            line = fit_rate(b, d, c)
            entry["line_rel_error"] = {"p50": float(np.median(np.abs(
                np.array([line.seconds(x, int(n)) for x, n in zip(b, c)]) - d) / d)),
                "max": fit_error(line, b, d, c)}
        except ValueError as e:
            entry["line_rel_error"] = f"no line fit: {e}"
        kinds_report[kind] = entry
    write_table(fits, op_table, {"backend": runs["backend"], "runs": len(samples)})
    host = replace(prof.host, step_us=host_fit["step_us"], submit_us=host_fit["submit_us"],
                   per_item_us=host_fit["per_item_us"], runs_ops=runs["backend"] == "cpu",
                   ingest_dma=runs["backend"] == "cuda",
                   submit_us_by_kind=host_fit.get("submit_us_by_kind", {}),
                   page_bytes=host_fit.get("page_bytes", 0),
                   page_map_us=host_fit.get("page_map_us", 0.0),
                   page_unmap_us=host_fit.get("page_unmap_us", 0.0),
                   decision_us=host_fit.get("decision_us", 0.0),
                   request_us=host_fit.get("request_us", 0.0))
    report = {"host": host_fit, "op_kinds": kinds_report}
    measured = dict(prof.measured, driver_fit={
        "backend": runs["backend"],
        "host": {k: host_fit[k] for k in ("step_us", "submit_us", "per_item_us",
                                           "submit_us_by_kind", "page_bytes", "page_map_us",
                                           "page_unmap_us", "decision_us", "request_us",
                                           "terms_fitted", "rel_error",
                                           "measured") if k in host_fit},
        "host_micro_benchmark": {"submit_us": prof.host.submit_us,
                                 "per_item_us": prof.host.per_item_us},
        "op_table_rel_error": {k: v["table_rel_error"] for k, v in kinds_report.items()}})
    return replace(prof, host=host, predictor="table", op_table=op_table.name,
                   measured=measured), report


def format_driver_fit(report: dict) -> list[str]:
    """The fit report as lines for the terminal: host coefficients, each run's residual,
    and each op kind's error (table and line)."""
    h = report["host"]
    kinds = "".join(f" ({k} {us:.1f} us)" for k, us in h.get("submit_us_by_kind", {}).items())
    pages = (f" + {h['page_map_us']:.1f} / {h['page_unmap_us']:.1f} us per L1 page mapped / "
             f"unmapped" if h.get("page_bytes") else "")
    decisions = (f" + {h['decision_us']:.1f} us per planning call" if h.get("decision_us")
                 else "")
    if h.get("request_us"):
        decisions += f" + {h['request_us']:.1f} us per request an attention op serves"
    lines = [f"host: {h['step_us']:.1f} us per step + {h['submit_us']:.2f} us per op{kinds} + "
             f"{h['per_item_us']:.2f} us per further row{pages}{decisions} (fitted: "
             f"{', '.join(h['terms_fitted'])}); "
             f"|error| p50 {h['rel_error']['p50']:.1%}, max {h['rel_error']['max']:.1%}"]
    for r in h["runs"]:
        lines.append(f"  {r['piece']:<44} steps {r['steps']:>5} ops {r['ops']:>6} rows "
                     f"{r['rows']:>7}: measured {r['host_s']:.4f} s, fitted "
                     f"{r['predicted_s']:.4f} s ({r['rel_error']:+.1%})")
    for kind, e in report["op_kinds"].items():
        t, ln = e["table_rel_error"], e["line_rel_error"]
        line = (f"{ln['p50']:.1%} / {ln['max']:.1%}" if isinstance(ln, dict) else ln)
        lines.append(f"  {kind:<24} {e['n']:>6} ops, {e['bytes_range'][0]:,}-{e['bytes_range'][1]:,} "
                     f"B: table |error| p50/p90 {t['p50']:.1%} / {t['p90']:.1%}; line p50/max {line}")
    return lines


def driver_fit_checked(prof: Profile, runs, op_table: Path, source: str) -> tuple[Profile, dict]:
    """``with_driver_fit`` for runs read from a file: a record that is not one is one
    ScenarioError line naming the file."""
    try:
        return with_driver_fit(prof, runs, op_table)
    except KeyError as e:
        raise ScenarioError(f"{source}: driver_runs: not a record of calibrate's driver runs "
                            f"(no {e.args[0]!r})") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ScenarioError(f"{source}: driver_runs: cannot fit host costs and an op table "
                            f"({' '.join(str(e).split())})") from None
