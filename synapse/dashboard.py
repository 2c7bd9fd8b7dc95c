"""Dashboards: one self-contained HTML page of plotly figures, built from result files alone.

What the page shows depends on the folder:

- a run (``result.json``, ``ops.json``): L1/L2 occupancy over time, link traffic per
  direction, the streams as lanes (compute, H2D, D2H: overlap is visible as bars at the
  same time on different lanes), hits per tier and the running L1 hit rate, latency
  percentiles per op kind;
- a sweep (``sweep.json`` + the points' rows): for every swept parameter a line plot of a
  metric against it with one line per policy, and heat maps over every pair of swept
  parameters; a menu in each figure switches the metric; parameters not on a figure's
  axes are averaged (so a sweep over seeds gives rates, e.g. needle retention);
- a comparison (``compare.json``, or two run folders compared on the fly): simulated and
  measured timelines overlaid, latency percentiles side by side and the error table.

plotly.js is embedded once in the page (what ``include_plotlyjs=True`` does), so the file
opens offline. ``write_pngs`` saves the same figures as PNG through kaleido, for papers.
"""

from __future__ import annotations

import html
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from .outputs import atomic_write
from .results import COMPARE_FILE, ResultsError, folder_kind, load_run, read_json

MAX_LANE_OPS = 20_000      # ops drawn as lanes (the earliest ones); more makes a heavy page
MAX_TABLE_ROWS = 500
LINK_BINS = 200
FIG_HEIGHT = 420
LANE_ORDER = ("host", "compute", "h2d", "d2h")


@dataclass
class Page:
    title: str
    subtitle: str = ""
    # (figure name, heading, plotly Figure) and raw HTML blocks, in page order
    blocks: list = field(default_factory=list)

    @property
    def figures(self) -> list:
        return [(b[1], b[3]) for b in self.blocks if b[0] == "figure"]

    def figure(self, name: str, heading: str, fig) -> None:
        fig.update_layout(height=fig.layout.height or FIG_HEIGHT, template="plotly_white",
                          margin=dict(l=60, r=30, t=50, b=50))
        self.blocks.append(("figure", name, heading, fig))

    def html_block(self, heading: str, body: str) -> None:
        self.blocks.append(("html", heading, body))

    def render(self) -> str:
        import plotly.io as pio
        from plotly.offline import get_plotlyjs

        parts = []
        for b in self.blocks:
            if b[0] == "figure":
                _, name, heading, fig = b
                div = pio.to_html(fig, full_html=False, include_plotlyjs=False,
                                  div_id=f"fig-{name}",
                                  config={"displaylogo": False, "responsive": True})
                parts.append(f"<section><h2>{html.escape(heading)}</h2>{div}</section>")
            else:
                parts.append(f"<section><h2>{html.escape(b[1])}</h2>{b[2]}</section>")
        return (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title>"
            f"<style>{_CSS}</style>"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(self.title)}</h1><p class=\"sub\">{html.escape(self.subtitle)}</p>"
            + "\n".join(parts) + "</body></html>\n")

    def write(self, path: Path) -> None:
        atomic_write(path, self.render())


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}"
        "h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}.sub{color:#555}"
        "table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;"
        "padding:2px 8px;text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}"
        "pre{background:#f7f7f7;padding:.6em;font-size:.8em;overflow:auto}")


def _table_html(header: list[str], rows: list[list], left: int = 1) -> str:
    def cell(tag, v, i):
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(str(v))}</{tag}>"
    out = ["<table><tr>" + "".join(cell("th", h, i) for i, h in enumerate(header)) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(r)) + "</tr>")
    return "".join(out) + "</table>"


# -- entry points -----------------------------------------------------------------------
def build_dashboard(paths: list[Path], metrics: list[str] | None = None) -> Page:
    """The page for a run, sweep or comparison folder, or for two run folders.

    ``metrics`` (sweeps only): one set of sweep figures per metric, each showing it first
    (the figures' menus switch to any other), so a PNG export holds the metric wanted."""
    if len(paths) == 2:
        from .compare import compare_paths
        return compare_page(compare_paths(paths[0], paths[1]))
    path = paths[0]
    if not path.exists():
        raise ResultsError(f"{path}: no such file or folder")
    kind = folder_kind(path)
    folder = path if path.is_dir() else path.parent
    if kind == "compare":
        return compare_page(read_json(folder / COMPARE_FILE))
    if kind == "sweep":
        return sweep_page(folder, metrics)
    if kind == "run":
        return run_page(folder)
    raise ResultsError(f"{path}: no results here (expected a run folder with result.json, a "
                       f"sweep folder with sweep.json or a compare.json)")


def default_output(path: Path) -> Path:
    folder = path if path.is_dir() else path.parent
    return folder / "dashboard.html"


def write_pngs(page: Page, out_dir: Path) -> str:
    """Every figure as ``NAME.png``; returns one line saying what was done or why not."""
    try:
        import kaleido  # noqa: F401
        import plotly.io as pio
    except ImportError:
        return "png: skipped (kaleido is not installed: pip install 'synapse-tiers[whatif]')"
    import plotly.graph_objects as go
    figs = page.figures
    paths = [out_dir / f"{name}.png" for name, _ in figs]
    # A PNG cannot use a metric menu: drop it (the figure shows its first metric).
    still = []
    for _, f in figs:
        g = go.Figure(f)
        g.layout.updatemenus = ()
        still.append(g)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if hasattr(pio, "write_images"):  # plotly >= 6.1: one browser for all figures
            pio.write_images(still, [str(p) for p in paths], width=1100, height=None, scale=1)
        else:
            for g, p in zip(still, paths):
                g.write_image(str(p), width=1100, scale=1)
    except Exception as e:  # no Chrome/Chromium, a sandbox refusing it, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"png: skipped (kaleido could not render: {first})"
    return f"wrote {len(paths)} PNG figures to {out_dir}"


# -- a run --------------------------------------------------------------------------------
def run_page(folder: Path) -> Page:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    run = load_run(folder)
    r, m = run.result, run.metrics
    simulated = m.get("sim_time_s") is not None
    page = Page(f"{r['scenario']} ({r['kind']}) — {r['policy']} on {r['backend']}",
                f"{folder} · run time {_ms(m.get('run_time_s'))} ms "
                f"{'simulated' if simulated else 'measured'}")
    page.html_block("Summary", _summary_html(m))
    tl = r.get("timeline", {})
    if tl.get("t_s"):
        t = [x * 1e3 for x in tl["t_s"]]
        fig = go.Figure()
        for key, name in (("l1_bytes", "L1 (HBM)"), ("l2_bytes", "L2 (pinned host)")):
            if key in tl:
                fig.add_scatter(x=t, y=[b / 2**20 for b in tl[key]], name=name,
                                mode="lines", line_shape="hv")
        fig.update_layout(xaxis_title="time (ms)", yaxis_title="occupancy (MiB)")
        page.figure("occupancy", "L1 / L2 occupancy", fig)
    ops = run.ops or {}
    if ops.get("kind"):
        page.figure("link", "Link traffic per direction", link_figure(ops))
        page.figure("lanes", "Streams as lanes (overlap of compute and copies)",
                    lanes_figure(ops))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.35, 0.65],
                        subplot_titles=("accesses by tier", "running L1 hit rate"))
    counts = [m.get("l1_hits", 0), m.get("l2_hits", 0), m.get("misses", 0)]
    fig.add_bar(x=["L1 hit", "L2 hit", "miss"], y=counts, marker_color=["#2a9d8f", "#e9c46a", "#e76f51"],
                showlegend=False, row=1, col=1)
    if tl.get("l1_hits"):
        rate = []
        for h1, h2, mi in zip(tl["l1_hits"], tl.get("l2_hits", []), tl.get("misses", [])):
            n = h1 + h2 + mi
            rate.append(h1 / n if n else None)
        fig.add_scatter(x=tl["step"], y=rate, mode="lines", name="L1 hit rate",
                        showlegend=False, row=1, col=2)
        fig.update_xaxes(title_text="step", row=1, col=2)
        fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    page.figure("hits", "Hit rates", fig)
    page.figure("latency", "Latency percentiles per op kind", latency_figure(
        {"": m.get("latency", {})}))
    page.html_block("Configuration",
                    f"<pre>{html.escape(json.dumps(r.get('config', {}), indent=1))}</pre>")
    return page


def _ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:.3f}"


def _summary_html(m: dict) -> str:
    keys = ("run_time_s", "l1_hit_rate", "needle_retained", "output_rel_error", "l1_hits",
            "l2_hits", "misses", "evictions", "fetches", "prefetches", "refusals",
            "lost_blocks", "bytes_h2d", "bytes_d2h", "effective_gb_per_s", "stall_s")
    from .compare import fmt_value
    rows = [[k, fmt_value(m[k])] for k in keys if k in m and m[k] is not None]
    return _table_html(["metric", "value"], rows)


def link_figure(ops: dict):
    """Throughput per direction over time: each copy's bytes spread over its duration."""
    import numpy as np
    import plotly.graph_objects as go

    kind = np.asarray(ops["kind"])
    start, end = np.asarray(ops["start_s"], float), np.asarray(ops["end_s"], float)
    nbytes = np.asarray(ops["nbytes"], float)
    t1 = float(end.max()) if end.size else 1.0
    edges = np.linspace(0.0, t1 if t1 > 0 else 1.0, LINK_BINS + 1)
    width = edges[1] - edges[0]
    fig = go.Figure()
    for direction, name in (("copy_h2d", "host → device (H2D)"), ("copy_d2h", "device → host (D2H)")):
        sel = kind == direction
        gb = np.zeros(LINK_BINS)
        for s, e, b in zip(start[sel], end[sel], nbytes[sel]):
            dur = max(e - s, 1e-12)
            lo = np.clip(edges[:-1], s, e)
            hi = np.clip(edges[1:], s, e)
            gb += b * (hi - lo) / dur
        fig.add_scatter(x=(edges[:-1] + width / 2) * 1e3, y=gb / width / 1e9, name=name,
                        mode="lines", line_shape="hv")
    fig.update_layout(xaxis_title="time (ms)", yaxis_title="throughput (GB/s)")
    return fig


def lanes_figure(ops: dict):
    """A Gantt chart of ops: one lane per stream, one colour per op kind."""
    import plotly.graph_objects as go

    n = len(ops["kind"])
    order = sorted(range(n), key=lambda i: ops["start_s"][i])[:MAX_LANE_OPS]
    streams = sorted({ops["stream"][i] for i in order},
                     key=lambda s: (LANE_ORDER.index(s) if s in LANE_ORDER else 99, s))
    fig = go.Figure()
    for kind in sorted({ops["kind"][i] for i in order}):
        xs, ys = [], []
        for i in order:
            if ops["kind"][i] != kind:
                continue
            xs += [ops["start_s"][i] * 1e3, ops["end_s"][i] * 1e3, None]
            ys += [ops["stream"][i]] * 2 + [None]
        fig.add_scatter(x=xs, y=ys, mode="lines", name=kind, line=dict(width=18),
                        hoverinfo="x+name")
    fig.update_yaxes(categoryorder="array", categoryarray=streams[::-1], type="category")
    title = "time (ms)" + (f" — first {MAX_LANE_OPS} of {n} ops" if n > MAX_LANE_OPS else "")
    fig.update_layout(xaxis_title=title, height=120 + 60 * len(streams))
    return fig


def latency_figure(series: dict[str, dict]):
    """Grouped bars of p50/p90/p99 per op kind; ``series`` maps a label to metrics.latency."""
    import plotly.graph_objects as go

    ops = sorted(set().union(*(set(v) for v in series.values())), key=lambda k: (k == "step", k))
    fig = go.Figure()
    for label, lat in series.items():
        for stat in ("p50_us", "p90_us", "p99_us"):
            ys = [lat.get(op, {}).get(stat) for op in ops]
            fig.add_bar(x=ops, y=ys, name=f"{label} {stat[:-3]}".strip())
    fig.update_layout(barmode="group", yaxis_type="log", yaxis_title="latency (us)")
    return fig


# -- a sweep ------------------------------------------------------------------------------
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star")
PREFERRED_METRICS = ("l1_hit_rate", "needle_retained", "run_time_s", "output_rel_error",
                     "bytes_h2d", "bytes_d2h", "evictions", "fetches", "misses", "step_p99_us")


def _metric_value(v):
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, (int, float)):
        return float(v)
    return None


def sweep_page(folder: Path, chosen: list[str] | None = None) -> Page:
    from .sweep import load_sweep

    manifest, rows = load_sweep(folder)
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        raise ResultsError(f"{folder}: a sweep with no finished point yet "
                           f"({len(rows)} failed); nothing to plot")
    grid = [(k, list(v)) for k, v in manifest["grid"]]
    keys = [k for k, _ in grid]
    skip = set(keys) | {"point", "status", "error", "backend", "policy", "wall_s"}
    metrics = sorted({k for r in ok for k, v in r.items()
                      if k not in skip and _metric_value(v) is not None})
    metrics = [m for m in PREFERRED_METRICS if m in metrics] + \
              [m for m in metrics if m not in PREFERRED_METRICS]
    page = Page(f"sweep of {manifest['scenario']} ({manifest['kind']}) on {manifest['backend']}",
                f"{folder} · {len(rows)} of {manifest['points']} points done, "
                f"{len(rows) - len(ok)} failed · grid: "
                + "; ".join(f"{k} = {', '.join(v)}" for k, v in grid))
    for m in chosen or []:
        if m not in metrics:
            import difflib
            close = difflib.get_close_matches(m, metrics, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ResultsError(f"--metric {m}: not a numeric metric of this sweep; {hint}"
                               f"(one of {', '.join(metrics)})")
    policy_key = "policy.eviction" if "policy.eviction" in keys else None
    policies = ([v for v in dict(grid)[policy_key]] if policy_key
                else sorted({r["policy"] for r in ok}))
    for first in chosen or [metrics[0]]:
        order = [first] + [m for m in metrics if m != first]
        tag = f"-{first}" if chosen else ""
        for xkey, xvals in grid:
            if xkey == policy_key:
                continue
            page.figure(_safe(f"line-{xkey}{tag}"), f"{first} against {xkey}, one line per policy",
                        sweep_lines(ok, xkey, xvals, policies, order, keys))
        if policy_key and len(keys) == 1:
            page.figure(_safe(f"policies{tag}"), f"{first} per policy",
                        sweep_lines(ok, policy_key, policies, policies, order, keys))
        for (ka, va), (kb, vb) in list(itertools.combinations(grid, 2))[:6]:
            if len(va) < 2 and len(vb) < 2:
                continue
            # the policy on the vertical axis: a heat map that reads as a table of policies
            if ka == policy_key:
                (ka, va), (kb, vb) = (kb, vb), (ka, va)
            page.figure(_safe(f"heat-{ka}-{kb}{tag}"), f"Heat map of {first}: {kb} × {ka}",
                        sweep_heatmap(ok, ka, va, kb, vb, order, keys))
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        page.html_block(f"Failed points ({len(failed)})", _table_html(
            ["point", *keys, "error"], [[r["point"], *[r.get(k) for k in keys], r.get("error")]
                                        for r in failed[:MAX_TABLE_ROWS]], left=len(keys) + 2))
    cols = ["point", *keys, *[m for m in metrics[:8]]]
    from .compare import fmt_value
    page.html_block("Points", _table_html(
        cols, [[fmt_value(r.get(c)) if c in metrics else r.get(c) for c in cols]
               for r in ok[:MAX_TABLE_ROWS]], left=len(keys) + 1))
    return page


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _mean_by(rows, keys_fn, metric) -> dict:
    acc: dict = {}
    for r in rows:
        v = _metric_value(r.get(metric))
        if v is None:
            continue
        s = acc.setdefault(keys_fn(r), [0.0, 0])
        s[0] += v
        s[1] += 1
    return {k: s / n for k, (s, n) in acc.items()}


def _others_note(keys, used) -> str:
    rest = [k for k in keys if k not in used]
    return f" (mean over {', '.join(rest)})" if rest else ""


def _metric_menu(metrics, make_args):
    return [dict(buttons=[dict(label=m, method="update", args=make_args(m)) for m in metrics],
                 direction="down", x=0.0, xanchor="left", y=1.18, yanchor="top")]


def sweep_lines(rows, xkey, xvals, policies, metrics, keys):
    import plotly.graph_objects as go

    used = {xkey, "policy.eviction"}
    note = _others_note(keys, used)

    def ys(metric, policy):
        means = _mean_by(rows, lambda r: (r["policy"], str(r.get(xkey))), metric)
        return [means.get((policy, x)) for x in xvals]

    fig = go.Figure()
    for i, pol in enumerate(policies):
        # dashes and symbols keep policies with equal values (lines on top of each other)
        # apart, in print too
        fig.add_scatter(x=list(xvals), y=ys(metrics[0], pol), name=pol, mode="lines+markers",
                        line=dict(dash=DASHES[i % len(DASHES)], width=2.5),
                        marker=dict(symbol=SYMBOLS[i % len(SYMBOLS)], size=9 + 2 * (i % 3)))
    fig.update_xaxes(type="category", title_text=xkey)
    fig.update_layout(yaxis_title=metrics[0] + note, margin_t=80)
    fig.update_layout(updatemenus=_metric_menu(metrics, lambda m: [
        {"y": [ys(m, p) for p in policies]}, {"yaxis.title.text": m + note}]))
    return fig


def sweep_heatmap(rows, xkey, xvals, ykey, yvals, metrics, keys):
    import plotly.graph_objects as go

    note = _others_note(keys, {xkey, ykey})

    def z(metric):
        means = _mean_by(rows, lambda r: (str(r.get(xkey)), str(r.get(ykey))), metric)
        return [[means.get((x, y)) for x in xvals] for y in yvals]

    fig = go.Figure(go.Heatmap(x=list(xvals), y=list(yvals), z=z(metrics[0]),
                               colorscale="Viridis", texttemplate="%{z:.3g}"))
    fig.update_xaxes(type="category", title_text=xkey)
    fig.update_yaxes(type="category", title_text=ykey, autorange="reversed")
    fig.update_layout(title=dict(text=metrics[0] + note, x=0.5), margin_t=80)
    fig.update_layout(updatemenus=_metric_menu(metrics, lambda m: [
        {"z": [z(m)]}, {"title.text": m + note}]))
    return fig


# -- a comparison -------------------------------------------------------------------------
def compare_page(rep: dict) -> Page:
    if rep.get("kind") == "sweeps":
        return _compare_sweeps_page(rep)
    if rep.get("kind") != "runs":
        raise ResultsError("compare.json: not a synapse comparison (no kind)")
    import plotly.graph_objects as go
    from .compare import _decisions_line, fmt_error, fmt_value

    mb, rb = rep["model_backend"], rep["reference_backend"]
    page = Page(f"{rep['scenario']} ({rep['scenario_kind']}), {rep['policy']}: {mb} (model) "
                f"vs {rb} (reference)",
                f"model {rep[rep['model']]['path']} · reference {rep[rep['reference']]['path']}")
    rows = [[x["label"], fmt_value(x["model"]), fmt_value(x["reference"]),
             fmt_error(x["rel_error"])] for x in rep["metrics"] if x.get("headline", True)]
    rows += [[f"{x['op']} {x['stat'][:-3]} (us)", fmt_value(x["model"]),
              fmt_value(x["reference"]), fmt_error(x["rel_error"])]
             for x in rep["latency"] if x["stat"] != "mean_us"]
    page.html_block("Errors of the model against the reference",
                    f"<p>{html.escape(_decisions_line(rep['decisions']))}</p>"
                    + _table_html(["metric", f"model ({mb})", f"reference ({rb})",
                                   "rel. error"], rows))
    tls = rep.get("timelines", {})
    tm, tr = tls.get("model", {}), tls.get("reference", {})
    if tm.get("t_s") and tr.get("t_s"):
        fig = go.Figure()
        for tl, label in ((tm, f"{mb} (model)"), (tr, f"{rb} (reference)")):
            fig.add_scatter(x=tl["step"], y=[t * 1e3 for t in tl["t_s"]], name=label, mode="lines")
        fig.update_layout(xaxis_title="step", yaxis_title="time at the end of the step (ms)")
        page.figure("cmp-steps", "Simulated and measured timelines: time per step", fig)
        fig = go.Figure()
        for tl, label in ((tm, f"{mb} (model)"), (tr, f"{rb} (reference)")):
            d = [b - a for a, b in zip([0.0] + tl["t_s"][:-1], tl["t_s"])]
            fig.add_scatter(x=tl["step"], y=[x * 1e6 for x in d], name=label, mode="lines")
        fig.update_layout(xaxis_title="step", yaxis_title="step duration (us)", yaxis_type="log")
        page.figure("cmp-step-duration", "Step durations overlaid", fig)
        fig = go.Figure()
        for tl, label, dash in ((tm, f"{mb} (model)", "solid"), (tr, f"{rb} (reference)", "dot")):
            for key, tier in (("l1_bytes", "L1"), ("l2_bytes", "L2")):
                if key in tl:
                    fig.add_scatter(x=[t * 1e3 for t in tl["t_s"]],
                                    y=[b / 2**20 for b in tl[key]], name=f"{tier} {label}",
                                    mode="lines", line=dict(dash=dash), line_shape="hv")
        fig.update_layout(xaxis_title="time (ms)", yaxis_title="occupancy (MiB)")
        page.figure("cmp-occupancy", "L1 / L2 occupancy overlaid", fig)
    lat_m = {x["op"]: {} for x in rep["latency"]}
    lat_r = {x["op"]: {} for x in rep["latency"]}
    for x in rep["latency"]:
        lat_m[x["op"]][x["stat"]] = x["model"]
        lat_r[x["op"]][x["stat"]] = x["reference"]
    if lat_m:
        page.figure("cmp-latency", "Latency percentiles, model and reference",
                    latency_figure({mb: lat_m, rb: lat_r}))
    errs = [(x["label"], x["rel_error"]) for x in rep["metrics"]
            if x.get("headline", True) and x["rel_error"] is not None]
    errs += [(f"{x['op']} {x['stat'][:-3]}", x["rel_error"]) for x in rep["latency"]
             if x["stat"] in ("p50_us", "p99_us") and x["rel_error"] is not None]
    if errs:
        fig = go.Figure(go.Bar(x=[e * 100 for _, e in errs], y=[k for k, _ in errs],
                               orientation="h"))
        fig.update_layout(xaxis_title="relative error of the model (%)",
                          height=140 + 22 * len(errs), yaxis_autorange="reversed")
        page.figure("cmp-errors", "Relative error per metric", fig)
    return page


def _compare_sweeps_page(rep: dict) -> Page:
    import plotly.graph_objects as go
    from .compare import fmt_error, fmt_value

    keys = rep["grid_keys"]
    page = Page(f"sweeps of {rep['scenario']}: {rep['model_backend']} (model) vs "
                f"{rep['reference_backend']} (reference)",
                f"A {rep['a']['path']} · B {rep['b']['path']} · {len(rep['points'])} matched "
                f"points, {len(rep['unmatched'])} unmatched")
    ok = [p for p in rep["points"] if p["status"] == "ok"]
    labels = [", ".join(str(p["values"][k]) for k in keys) for p in ok]
    if ok:
        fig = go.Figure()
        for metric, name in (("run_time_s", "run time"), ("l1_hit_rate", "L1 hit rate")):
            fig.add_bar(x=labels, y=[(p["metrics"].get(metric, {}).get("rel_error") or 0) * 100
                                     for p in ok], name=name)
        fig.add_bar(x=labels, y=[(p.get("step_p50_rel_error") or 0) * 100 for p in ok],
                    name="step p50")
        fig.update_layout(barmode="group", yaxis_title="relative error of the model (%)",
                          xaxis_title=", ".join(keys))
        page.figure("cmp-sweep-errors", "Relative error per point", fig)
    rows = []
    for p in rep["points"]:
        vals = [p["values"][k] for k in keys]
        if p["status"] != "ok":
            rows.append([*vals, "error", "-", "-", p.get("error", "")])
            continue
        mt = p["metrics"]
        rows.append([*vals, fmt_error(mt.get("run_time_s", {}).get("rel_error")),
                     fmt_value(mt.get("l1_hit_rate", {}).get("model")),
                     fmt_value(mt.get("l1_hit_rate", {}).get("reference")),
                     "identical" if p["decisions"]["identical"] else
                     f"differ at #{p['decisions']['first_divergence']['index']}"])
    page.html_block("Points", _table_html([*keys, "run time error", "hit rate model",
                                           "hit rate reference", "decisions"], rows,
                                          left=len(keys)))
    return page
