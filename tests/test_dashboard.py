"""`synapse dashboard`: pages built from result files, opened in headless Chromium.

The browser test loads each page (run, sweep, comparison) from disk with no network, dumps
the DOM after the scripts ran, and checks that every figure's div holds a rendered plot
(plotly's ``main-svg``) and that nothing was logged as an error; a screenshot of each page
is saved in the test's temporary folder. It is skipped, with the reason, where no
Chromium or Chrome binary is installed (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from conftest import run
from synapse.cli import main
from synapse.runner import write_result

TINY = ["workload.context_tokens=2048", "workload.decode_steps=16",
        "workload.prefill_chunk_tokens=256", "model.layers=2", "model.kv_heads=2",
        "model.head_dim=64"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A run, a sim/cpu comparison and a small sweep (policy x budget x seed)."""
    root = tmp_path_factory.mktemp("dash")
    write_result(run("needle", TINY), root / "run")
    write_result(run("needle", TINY, "cpu"), root / "cpu")
    r = invoke("compare", root / "run", root / "cpu", "-o", root / "compare")
    assert r.exit_code == 0, r.output
    sets = [a for s in TINY for a in ("--set", s)]
    r = invoke("sweep", "needle", *sets, "--grid", "policy.eviction=lru,h2o,belady",
               "--grid", "memory.l1_budget=20%,40%", "--grid", "seed=0,1", "-j", 1,
               "--out", root / "sweep", "-q")
    assert r.exit_code == 0, r.output
    return {"run": root / "run", "compare": root / "compare", "sweep": root / "sweep",
            "cpu": root / "cpu"}


def figures_in(html: str) -> list[str]:
    return re.findall(r'<div id="(fig-[^"]+)" class="plotly-graph-div"', html)


@pytest.mark.parametrize("kind, n_figures", [("run", 5), ("compare", 5), ("sweep", 5)])
def test_one_self_contained_page_per_folder(folders, tmp_path, kind, n_figures):
    out = tmp_path / "report.html"
    r = invoke("dashboard", folders[kind], "-o", out)
    assert r.exit_code == 0, r.output
    html = out.read_text()
    assert len(figures_in(html)) == n_figures, figures_in(html)
    # plotly.js is in the page (it opens offline), once, and nothing is fetched.
    assert html.count("plotly.js v") >= 1 and "cdn.plot.ly" not in html.split("</head>")[1]
    assert not re.search(r'<script[^>]+src="http', html)


def test_two_runs_make_a_comparison_page(folders, tmp_path):
    out = tmp_path / "two.html"
    r = invoke("dashboard", folders["run"], folders["cpu"], "-o", out)
    assert r.exit_code == 0, r.output
    html = out.read_text()
    assert "fig-cmp-steps" in html and "decisions: identical" in html


def test_sweep_figures_per_metric(folders, tmp_path):
    out = tmp_path / "m.html"
    r = invoke("dashboard", folders["sweep"], "-o", out, "--metric", "needle_retained",
               "--metric", "l1_hit_rate")
    assert r.exit_code == 0, r.output
    names = figures_in(out.read_text())
    assert "fig-line-memory_l1_budget-needle_retained" in names
    assert "fig-heat-memory_l1_budget-policy_eviction-l1_hit_rate" in names


@pytest.mark.parametrize("args, fragment", [
    (("{empty}",), "no results here"),
    (("{missing}",), "no such file"),
    (("{sweep}", "--metric", "hit_rate"), "did you mean 'l1_hit_rate'"),
])
def test_bad_input_is_one_line_and_writes_nothing(folders, tmp_path, args, fragment):
    (tmp_path / "empty").mkdir()
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "missing",
             "sweep": folders["sweep"]}
    out = tmp_path / "out.html"
    r = invoke("dashboard", *[a.format(**paths) for a in args], "-o", out)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], r.output
    assert not out.exists()
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_sweep_with_only_failed_points_has_nothing_to_plot(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    invoke("sweep", "needle", *sets, "--grid", "memory.l1_budget=900GiB", "-j", 1,
           "--out", tmp_path / "s", "-q")
    r = invoke("dashboard", tmp_path / "s")
    assert r.exit_code == 2 and "no finished point" in r.output
    assert not (tmp_path / "s" / "dashboard.html").exists()


# -- in a browser -----------------------------------------------------------------------
def _browser():
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


# Records errors and counts rendered plots into the DOM, where --dump-dom shows them.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { __errors.push(String(e.message)); });
(function () { var ce = console.error; console.error = function () {
  __errors.push(Array.prototype.join.call(arguments, ' ')); ce.apply(console, arguments); }; })();
window.addEventListener('load', function () { setTimeout(function () {
  var d = document.createElement('div'); d.id = 'probe';
  d.setAttribute('data-errors', JSON.stringify(__errors));
  d.setAttribute('data-rendered', document.querySelectorAll('.plotly-graph-div .main-svg').length);
  document.body.appendChild(d); }, 0); });
</script>"""


@pytest.mark.parametrize("kind", ["run", "compare", "sweep"])
def test_dashboard_renders_in_headless_chromium(folders, tmp_path, kind):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium/chrome binary on PATH (Debian: apt-get install chromium)")
    page = tmp_path / f"{kind}.html"
    assert invoke("dashboard", folders[kind], "-o", page).exit_code == 0
    html = page.read_text()
    probed = tmp_path / f"{kind}-probed.html"
    probed.write_text(html.replace("<head>", "<head>" + PROBE, 1))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--disable-extensions", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400",
             "--virtual-time-budget=5000"]
    shot = tmp_path / f"{kind}.png"
    dom = subprocess.run(flags + [f"--screenshot={shot}", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    figs = figures_in(html)
    assert figs
    # Every figure's div (they follow one another, never nested) holds a rendered plot.
    dumped = dom.stdout
    for i, fig in enumerate(figs):
        start = dumped.index(f'id="{fig}"')
        nxt = dumped.find(f'id="{figs[i + 1]}"') if i + 1 < len(figs) else len(dumped)
        assert 'class="main-svg"' in dumped[start:nxt], f"{fig} was not rendered"
    probe = re.search(r'<div id="probe" data-errors="([^"]*)" data-rendered="(\d+)"', dumped)
    assert probe, "the page's scripts did not run to the end"
    assert json.loads(probe.group(1).replace("&quot;", '"')) == []
    assert int(probe.group(2)) >= len(figs)
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    assert not [ln for ln in console if re.search(r"error|uncaught|failed", ln, re.I)], console
    assert shot.exists() and shot.stat().st_size > 10_000


def test_figures_as_png(folders, tmp_path):
    pytest.importorskip("kaleido")
    if _browser() is None:
        pytest.skip("kaleido needs Chrome or Chromium (Debian: apt-get install chromium)")
    r = invoke("dashboard", folders["run"], "-o", tmp_path / "r.html", "--png", tmp_path / "png")
    assert r.exit_code == 0, r.output
    if "png: skipped" in r.output:
        pytest.skip(r.output.strip().splitlines()[-1])
    pngs = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    assert pngs == ["hits.png", "lanes.png", "latency.png", "link.png", "occupancy.png"]
    assert all((tmp_path / "png" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in pngs)
