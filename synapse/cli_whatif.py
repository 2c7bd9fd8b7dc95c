"""What-if commands: ``synapse sweep``, ``synapse compare``, ``synapse dashboard``.

Thin wrappers like the rest of the CLI: the work is in ``sweep``, ``compare`` and
``dashboard``; results are files. Bad input (an unknown grid key, an empty range, results
of two different scenarios, a folder with no results) is one line on stderr, exit code 2,
and nothing written. ``register`` adds the commands to the ``synapse`` group.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click


def _one_line_errors(fn):
    # Looked up at call time: synapse.cli imports this module at its end.
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .cli import one_line_errors
        return one_line_errors(fn)(*args, **kwargs)
    return wrapper


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


@click.command()
@click.argument("scenario", required=False)
@click.option("--grid", "grid", multiple=True, required=True, metavar="KEY=V1,V2|A:B:STEP",
              help="A grid axis: a scenario key (as for --set) or profile.<field>, with a list "
                   "of values or an inclusive range, e.g. --grid policy.eviction=lru,h2o "
                   "--grid memory.l1_budget=5%:40%:5% --grid profile.link.h2d_gb_per_s=25:100:25 "
                   "(repeatable: the sweep is the cross product).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a scenario field for every point (repeatable).")
@click.option("--backend", default="sim", show_default=True,
              type=click.Choice(["sim", "cpu", "cuda"]), help="Backend every point runs on.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Points run at once (default: the number of CPUs; 1 runs them in this "
                   "process; with --executor dask, the local cluster's workers).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Sweep folder (default: sweeps/<scenario>-<backend>), checked before the "
                   "first point runs. Rerunning with the same folder resumes: finished points "
                   "are not run again.")
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local",
              show_default=True,
              help="local: processes on this machine. dask: a Dask cluster (--scheduler, or a "
                   "local one).")
@click.option("--scheduler", metavar="ADDRESS",
              help="Dask scheduler, e.g. tcp://10.0.0.5:8786 (with --executor dask).")
@click.option("--retry-failed", is_flag=True, help="Run the points that failed before again.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_one_line_errors
def sweep(scenario, grid, overrides, backend, jobs, out, executor, scheduler, retry_failed, quiet):
    """Run SCENARIO over the cross product of --grid axes; one row per point.

    Writes OUT/sweep.csv and OUT/sweep.jsonl (grid values, status, error, metrics) and each
    point's result files under OUT/points/. A point that fails is recorded with its error
    and the sweep goes on. Exit status: 0 when every point ran, 1 when some failed (see
    the table's error column) or a worker died, 130 when interrupted (rerun to resume),
    2 for bad input (nothing written).
    """
    from .errors import ScenarioError
    from .outputs import check_dir
    from .sweep import plan_sweep, run_sweep

    plan = plan_sweep(scenario, grid, overrides, backend)
    if jobs is None:
        jobs = 1 if backend == "cuda" else (os.cpu_count() or 1)
    if backend == "cuda" and jobs > 1 and executor == "local":
        raise ScenarioError("--backend cuda: points share the GPU, so run them one at a time "
                            "(-j 1), or spread them over GPUs with --executor dask")
    out = out or Path("sweeps") / f"{plan.name}-{backend}"
    check_dir(out, "--out")
    outcome = run_sweep(plan, out, jobs=jobs, executor=executor, scheduler=scheduler,
                        retry_failed=retry_failed, progress=not quiet, log=_echo_err)
    msg = (f"{outcome.total} points: {outcome.ran} ran, {outcome.skipped} already done, "
           f"{outcome.failed} failed")
    if outcome.lost:
        msg += f", {outcome.lost} lost to a dead worker (rerun to retry)"
    click.echo(f"{msg}; wrote {out / 'sweep.csv'}")
    if outcome.interrupted:
        _echo_err(f"interrupted: rerun the same command to resume ({out})")
        sys.exit(130)
    if outcome.failed or outcome.lost:
        sys.exit(1)


@click.command()
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for compare.json (default: runs/compare-<scenario>-<A>-vs-<B>, "
                   "never overwritten).")
@_one_line_errors
def compare(a, b, out):
    """Line up two runs (folders or result.json) or two sweeps of the same scenario.

    Reports, per metric, the relative error of the model against the reference (the sim
    run is the model when exactly one of the two is; otherwise A is compared with B):
    run time, per-op latency percentiles, hit rates, bytes moved; and whether both made
    the same eviction/prefetch decisions (the first divergence, if not). Writes
    compare.json, which `synapse dashboard` plots.
    """
    from .compare import compare_paths, default_out_dir, format_report
    from .outputs import atomic_write
    from .results import COMPARE_FILE
    import json

    report = compare_paths(a, b)
    out = out or default_out_dir(report)
    atomic_write(out / COMPARE_FILE, json.dumps(report, indent=1, default=str))
    click.echo(format_report(report))
    click.echo(f"wrote {out / COMPARE_FILE}")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file to write (default: DIR/dashboard.html).")
@click.option("--png", "png_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also save every figure as PNG in this folder (needs kaleido and Chrome "
                   "or Chromium; skipped with a note otherwise).")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="Sweeps: draw the figures for this metric first (repeatable: one set of "
                   "figures per metric), e.g. --metric needle_retained --metric l1_hit_rate.")
@_one_line_errors
def dashboard(paths, output, png_dir, metrics):
    """One self-contained HTML page (plotly.js embedded: opens offline) from result files.

    PATHS is a run folder (occupancy and link timelines, stream lanes, hit rates,
    latency percentiles), a sweep folder (heat maps and metric-vs-parameter lines, one
    line per policy), a comparison folder (compare.json), or two run folders (compared
    on the fly: timelines overlaid and the error table).
    """
    from .dashboard import build_dashboard, default_output, write_pngs
    from .errors import ScenarioError
    from .outputs import check_dir

    if len(paths) > 2:
        raise ScenarioError(f"dashboard: expected one folder or two runs, got {len(paths)} paths")
    if png_dir:
        check_dir(png_dir, "--png")
    page = build_dashboard(list(paths), list(metrics) or None)
    output = output or default_output(paths[0])
    page.write(output)
    click.echo(f"wrote {output} ({len(page.figures)} figures)")
    if png_dir:
        note = write_pngs(page, png_dir)
        click.echo(note)


def register(group: click.Group) -> None:
    for cmd in (sweep, compare, dashboard):
        group.add_command(cmd)
