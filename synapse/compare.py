"""Comparing two runs (or two sweeps) of one scenario: how far is the model from the hardware?

The simulator's answers are worth something only next to a measure of their error. Given
two results of the same scenario, ``compare_runs`` reports, per metric, the relative error
``(model - reference) / reference``, where the *model* is the ``sim`` run when exactly one
of the two is one (the other, measured on ``cpu`` or ``cuda``, is the reference); with two
runs of one kind, A is the model and B the reference. Metrics: end-to-end run time, hit
rates and counters, bytes moved per direction, latency percentiles per op kind (copies,
kernels, steps), seconds per op kind, and one sentence naming the op kind or host phase
whose difference is largest, with its share of the run-time difference; and whether the
two made identical placement decisions, with the first divergence (step, action, blocks)
when they did not.

"The same scenario" means the same resolved configuration except the fields that do not
change what is run: ``profile`` (the simulator's hardware model: the very thing being
judged, e.g. a calibrated profile against the GPU it came from), ``checks`` (run-time
self-checks) and ``description``. Anything else differing is refused with one line.

Two sweep folders are matched point by point on their grid values.
"""

from __future__ import annotations

import math
from pathlib import Path

from .results import (RunFiles, ResultsError, folder_kind, load_run, run_dir)

IGNORED_CONFIG = ("profile", "checks", "description")
# (label, metric key) in the order the table prints them.
HEADLINE = (
    ("run time (s)", "run_time_s"),
    ("L1 hit rate", "l1_hit_rate"),
    ("L1 hits", "l1_hits"),
    ("L2 hits", "l2_hits"),
    ("misses", "misses"),
    ("evictions", "evictions"),
    ("fetches", "fetches"),
    ("prefetches", "prefetches"),
    ("bytes H2D", "bytes_h2d"),
    ("bytes D2H", "bytes_d2h"),
    ("needle retained", "needle_retained"),
    ("host busy (s)", "host_busy_s"),
)
LATENCY_STATS = ("p50_us", "p90_us", "p99_us", "mean_us")


def rel_error(model, reference) -> float | None:
    """(model - reference) / reference; None where undefined (missing, zero or not numbers)."""
    if isinstance(model, bool) or isinstance(reference, bool):
        return 0.0 if model == reference else None
    if not isinstance(model, (int, float)) or not isinstance(reference, (int, float)):
        return None
    if reference == 0:
        return 0.0 if model == 0 else None
    e = (model - reference) / reference
    return e if math.isfinite(e) else None


def config_difference(a: dict, b: dict, path: str = "") -> str | None:
    """The first key path where two resolved configs differ (ignored fields aside)."""
    for key in sorted(set(a) | set(b)):
        if not path and key in IGNORED_CONFIG:
            continue
        p = f"{path}.{key}" if path else key
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            d = config_difference(va, vb, p)
            if d:
                return d
        elif va != vb:
            return f"{p} is {va!r} in the first and {vb!r} in the second"
    return None


def _roles(a: RunFiles, b: RunFiles) -> tuple[str, str]:
    ba, bb = a.result.get("backend"), b.result.get("backend")
    if ba != "sim" and bb == "sim":
        return "b", "a"
    return "a", "b"


def diff_decisions(model: list[dict] | None, reference: list[dict] | None) -> dict:
    """Whether two decision traces are identical, and where they first part; identical is
    None (not compared) when either run has no decision trace."""
    if model is None or reference is None:
        return {"identical": None, "count_model": None if model is None else len(model),
                "count_reference": None if reference is None else len(reference),
                "first_divergence": None}
    out = {"identical": model == reference, "count_model": len(model),
           "count_reference": len(reference), "first_divergence": None}
    if out["identical"]:
        return out
    n = min(len(model), len(reference))
    i = next((k for k in range(n) if model[k] != reference[k]), n)
    out["first_divergence"] = {"index": i,
                               "model": model[i] if i < len(model) else None,
                               "reference": reference[i] if i < len(reference) else None}
    return out


def compare_runs(a: RunFiles, b: RunFiles, with_timelines: bool = True) -> dict:
    """The comparison of two runs of one scenario, as plain data (``compare.json``)."""
    diff = config_difference(a.result["config"], b.result["config"])
    if diff:
        raise ResultsError(f"{a.path} and {b.path} are runs of different scenarios: {diff}")
    ra, rb = _roles(a, b)
    runs = {"a": a, "b": b}
    model, ref = runs[ra], runs[rb]
    mm, rm = model.metrics, ref.metrics
    metrics = []
    for label, key in HEADLINE:
        if key in mm or key in rm:
            metrics.append({"metric": key, "label": label, "model": mm.get(key),
                            "reference": rm.get(key),
                            "rel_error": rel_error(mm.get(key), rm.get(key))})
    shown = {k for _, k in HEADLINE}
    other = sorted(k for k in set(mm) & set(rm) if k not in shown and k != "wall_s"
                   and isinstance(mm[k], (int, float)) and isinstance(rm[k], (int, float)))
    for key in other:
        metrics.append({"metric": key, "label": key, "model": mm[key], "reference": rm[key],
                        "rel_error": rel_error(mm[key], rm[key]), "headline": False})
    latency = []
    lm, lr = mm.get("latency", {}), rm.get("latency", {})
    for op in sorted(set(lm) | set(lr), key=lambda k: (k == "step", k)):
        for stat in LATENCY_STATS:
            vm, vr = lm.get(op, {}).get(stat), lr.get(op, {}).get(stat)
            if vm is None and vr is None:
                continue
            latency.append({"op": op, "stat": stat, "model": vm, "reference": vr,
                            "rel_error": rel_error(vm, vr),
                            "count_model": lm.get(op, {}).get("count", 0),
                            "count_reference": lr.get(op, {}).get("count", 0)})
    report = {
        "kind": "runs",
        "scenario": a.result.get("scenario"),
        "scenario_kind": a.result.get("kind"),
        "policy": a.result.get("policy"),
        "a": _describe(a), "b": _describe(b),
        "model": ra, "reference": rb,
        "model_backend": model.result.get("backend"),
        "reference_backend": ref.result.get("backend"),
        "ignored_config": {k: [model.result["config"].get(k), ref.result["config"].get(k)]
                           for k in IGNORED_CONFIG
                           if model.result["config"].get(k) != ref.result["config"].get(k)},
        "metrics": metrics,
        "latency": latency,
        "decisions": diff_decisions(model.decisions, ref.decisions),
    }
    report["op_totals"] = op_totals(mm, rm)
    report["explanation"] = explain(mm, rm, report["op_totals"])
    if with_timelines:
        report["timelines"] = {"model": model.result.get("timeline", {}),
                               "reference": ref.result.get("timeline", {})}
    return report


def op_totals(mm: dict, rm: dict) -> list[dict]:
    """Seconds spent per op kind (mean x count) in each run, and the host's busy time:
    the parts a run-time difference is made of (op times overlap one another and the
    host, so they are shares of the difference's sources, not of the critical path)."""
    out = []
    lm, lr = mm.get("latency", {}), rm.get("latency", {})
    for op in sorted((set(lm) | set(lr)) - {"step"}):
        tm = _total_s(lm.get(op))
        tr = _total_s(lr.get(op))
        if tm is None and tr is None:
            continue
        out.append({"part": op, "model_s": tm, "reference_s": tr,
                    "count_model": lm.get(op, {}).get("count", 0),
                    "count_reference": lr.get(op, {}).get("count", 0),
                    "diff_s": (tm or 0.0) - (tr or 0.0)})
    hm, hr = mm.get("host_busy_s"), rm.get("host_busy_s")
    if isinstance(hm, (int, float)) and isinstance(hr, (int, float)):
        out.append({"part": "host", "model_s": hm, "reference_s": hr, "diff_s": hm - hr})
    return out


def _total_s(stats: dict | None) -> float | None:
    if not stats or stats.get("mean_us") is None:
        return None
    return stats["mean_us"] * stats.get("count", 0) * 1e-6


def explain(mm: dict, rm: dict, totals: list[dict]) -> dict | None:
    """Where the largest run-time difference comes from: the op kind (time summed over its
    ops) or the host's busy time whose difference is largest, with its size as a share of
    the run-time difference. None when the run times are not both known."""
    tm, tr = mm.get("run_time_s"), rm.get("run_time_s")
    if not isinstance(tm, (int, float)) or not isinstance(tr, (int, float)) or not totals:
        return None
    diff = tm - tr
    ranked = sorted(totals, key=lambda t: -abs(t["diff_s"]))
    top = ranked[0]
    share = top["diff_s"] / diff if diff else None

    def says(t, name):
        more = "more" if t["diff_s"] > 0 else "less"
        part = f"{name}, {abs(t['diff_s']):.3g} s {more} in the model"
        return part + (f" ({t['diff_s'] / diff:.0%} of the run-time difference)" if diff else "")
    def label(t, ops_note=""):
        return "host busy time" if t["part"] == "host" else t["part"] + ops_note
    sentence = (f"run time {fmt_error(rel_error(tm, tr))} ({diff:+.3g} s): the largest "
                f"difference is {says(top, label(top, ' (summed over its ops)'))}")
    if len(ranked) > 1 and ranked[1]["diff_s"]:  # the host's time can contain the ops' own
        sentence += f"; next {says(ranked[1], label(ranked[1]))}"
    return {"part": top["part"], "diff_s": top["diff_s"], "run_time_diff_s": diff,
            "share": share, "next": ranked[1]["part"] if len(ranked) > 1 else None,
            "sentence": sentence + "."}


def _describe(r: RunFiles) -> dict:
    return {"path": str(r.path.resolve()), "backend": r.result.get("backend"),
            "policy": r.result.get("policy"), "scenario": r.result.get("scenario"),
            "profile": r.result["config"].get("profile")}


def compare_sweeps(a_dir: Path, b_dir: Path) -> dict:
    """Two sweep folders, matched point by point on grid values."""
    from .sweep import POINTS_DIR, load_sweep

    ma, rows_a = load_sweep(a_dir)
    mb, rows_b = load_sweep(b_dir)
    keys_a = [k for k, _ in ma["grid"]]
    keys_b = [k for k, _ in mb["grid"]]
    if sorted(keys_a) != sorted(keys_b):
        raise ResultsError(f"{a_dir} and {b_dir} sweep different keys "
                           f"({', '.join(keys_a)} vs {', '.join(keys_b)})")
    diff = config_difference(ma["base_config"], mb["base_config"])
    if diff:
        raise ResultsError(f"{a_dir} and {b_dir} are sweeps of different scenarios: {diff}")

    def key_of(row):
        return tuple(str(row.get(k)) for k in keys_a)

    by_a = {key_of(r): r for r in rows_a}
    by_b = {key_of(r): r for r in rows_b}
    points, unmatched = [], []
    model_backend = reference_backend = None
    for k in list(by_a) + [k for k in by_b if k not in by_a]:
        row_a, row_b = by_a.get(k), by_b.get(k)
        values = dict(zip(keys_a, k))
        if row_a is None or row_b is None:
            unmatched.append({"values": values, "only_in": "a" if row_b is None else "b"})
            continue
        entry = {"values": values, "a_point": row_a["point"], "b_point": row_b["point"]}
        if row_a.get("status") != "ok" or row_b.get("status") != "ok":
            entry["status"] = "error"
            entry["error"] = row_a.get("error") or row_b.get("error")
            points.append(entry)
            continue
        rep = compare_runs(load_run(a_dir / POINTS_DIR / row_a["point"], with_ops=False),
                           load_run(b_dir / POINTS_DIR / row_b["point"], with_ops=False),
                           with_timelines=False)
        model_backend, reference_backend = rep["model_backend"], rep["reference_backend"]
        entry.update(status="ok", model=rep["model"],
                     metrics={m["metric"]: {k2: m[k2] for k2 in ("model", "reference", "rel_error")}
                              for m in rep["metrics"] if m.get("headline", True)},
                     step_p50_rel_error=next((x["rel_error"] for x in rep["latency"]
                                              if x["op"] == "step" and x["stat"] == "p50_us"), None),
                     decisions=rep["decisions"])
        points.append(entry)
    if not points:
        raise ResultsError(f"{a_dir} and {b_dir}: no point with the same grid values in both")
    return {"kind": "sweeps", "scenario": ma["scenario"], "scenario_kind": ma.get("kind"),
            "a": {"path": str(a_dir.resolve()), "backend": ma["backend"]},
            "b": {"path": str(b_dir.resolve()), "backend": mb["backend"]},
            "grid_keys": keys_a, "model_backend": model_backend,
            "reference_backend": reference_backend, "points": points, "unmatched": unmatched}


def compare_paths(a: Path, b: Path) -> dict:
    """Compare two runs or two sweeps, whichever the paths are."""
    ka, kb = folder_kind(a), folder_kind(b)
    if ka == "sweep" or kb == "sweep":
        if ka != kb:
            raise ResultsError(f"compare: {a} is a {ka or 'folder without results'} and {b} a "
                               f"{kb or 'folder without results'}; expected two runs or two sweeps")
        return compare_sweeps(a if a.is_dir() else a.parent, b if b.is_dir() else b.parent)
    return compare_runs(load_run(run_dir(a)), load_run(run_dir(b)))


def default_out_dir(report: dict, root: Path = Path("runs")) -> Path:
    base = root / (f"compare-{report['scenario']}-{report.get('model_backend') or 'a'}"
                   f"-vs-{report.get('reference_backend') or 'b'}")
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


# -- printing ---------------------------------------------------------------------------
def fmt_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fmt_error(e) -> str:
    return "-" if e is None else f"{e:+.1%}"


def _table(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return [line(header), *(line(r) for r in rows)]


def _decisions_line(d: dict) -> str:
    if d["identical"] is None:
        return "decisions: not compared (a run folder has no decisions.jsonl)"
    if d["identical"]:
        return f"decisions: identical ({d['count_model']} decisions)"
    fd = d["first_divergence"]

    def show(e):
        if e is None:
            return "(end of trace)"
        blocks = e.get("blocks", [])
        more = f" +{len(blocks) - 12} more" if len(blocks) > 12 else ""
        return f"step {e.get('step')} {e.get('action')} {blocks[:12]}{more}"
    return (f"decisions: DIFFER ({d['count_model']} vs {d['count_reference']}); first at "
            f"#{fd['index']}: model {show(fd['model'])} vs reference {show(fd['reference'])}")


def format_report(rep: dict) -> str:
    if rep["kind"] == "sweeps":
        return _format_sweeps(rep)
    m, r = rep[rep["model"]], rep[rep["reference"]]
    lines = [f"{rep['scenario']} ({rep['scenario_kind']}), policy {rep['policy']}: model = "
             f"{m['backend']} ({m['path']}), reference = {r['backend']} ({r['path']})"]
    if rep["ignored_config"]:
        lines.append("not compared: " + ", ".join(f"{k} {v[0]!r} vs {v[1]!r}"
                                                  for k, v in rep["ignored_config"].items()))
    rows = [(x["label"], fmt_value(x["model"]), fmt_value(x["reference"]),
             fmt_error(x["rel_error"])) for x in rep["metrics"] if x.get("headline", True)]
    lines += _table(("metric", "model", "reference", "rel. error"), rows)
    lat = [(f"{x['op']} {x['stat'][:-3]} (us)", fmt_value(x["model"]), fmt_value(x["reference"]),
            fmt_error(x["rel_error"])) for x in rep["latency"] if x["stat"] != "mean_us"]
    if lat:
        lines.append("")
        lines += _table(("latency", "model", "reference", "rel. error"), lat)
    tot = [(f"{x['part']} total (s)", fmt_value(x["model_s"]), fmt_value(x["reference_s"]),
            fmt_error(rel_error(x["model_s"], x["reference_s"])))
           for x in rep.get("op_totals", []) if x["part"] != "host"]
    if tot:
        lines.append("")
        lines += _table(("time per op kind", "model", "reference", "rel. error"), tot)
    lines.append("")
    lines.append(_decisions_line(rep["decisions"]))
    if rep.get("explanation"):
        lines.append(rep["explanation"]["sentence"])
    return "\n".join(lines)


def _format_sweeps(rep: dict) -> str:
    keys = rep["grid_keys"]
    lines = [f"sweeps of {rep['scenario']}: model = {rep['model_backend']}, reference = "
             f"{rep['reference_backend']} ({len(rep['points'])} matched points, "
             f"{len(rep['unmatched'])} unmatched)"]
    rows = []
    for p in rep["points"]:
        vals = [p["values"][k] for k in keys]
        if p["status"] != "ok":
            rows.append((*vals, "error", "-", "-", "-", p.get("error", "")[:40]))
            continue
        mt = p["metrics"]
        rows.append((*vals, fmt_error(mt.get("run_time_s", {}).get("rel_error")),
                     fmt_value(mt.get("l1_hit_rate", {}).get("model")),
                     fmt_value(mt.get("l1_hit_rate", {}).get("reference")),
                     fmt_error(p.get("step_p50_rel_error")),
                     "not compared" if p["decisions"]["identical"] is None else
                     "identical" if p["decisions"]["identical"] else
                     f"differ at #{p['decisions']['first_divergence']['index']}"))
    lines += _table((*keys, "run time err", "hit rate model", "hit rate ref", "step p50 err",
                     "decisions"), rows)
    ok = [p for p in rep["points"] if p["status"] == "ok"]
    same = sum(p["decisions"]["identical"] is True for p in ok)
    errs = [abs(p["metrics"]["run_time_s"]["rel_error"]) for p in ok
            if p["metrics"].get("run_time_s", {}).get("rel_error") is not None]
    summary = f"decisions identical in {same} of {len(ok)} points"
    if errs:
        summary += f"; run time |error| median {sorted(errs)[len(errs) // 2]:.1%}, max {max(errs):.1%}"
    lines += ["", summary]
    return "\n".join(lines)
