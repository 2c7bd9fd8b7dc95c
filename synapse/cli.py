"""The ``synapse`` command: thin wrappers over the library; results are files.

Every ``SynapseError`` (bad scenario, unknown name, missing backend, an output location
that cannot be written) and every usage error of click's (an unknown option, a bad choice)
ends the command with one line on stderr and exit code 2; a traceback means a bug.
Output locations are checked before any work starts (``synapse.outputs``).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from . import __version__
from .errors import ScenarioError, SynapseError


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SynapseError as e:
            click.echo(f"error: {_one_line(e)}", err=True)
            sys.exit(2)
    return wrapper


class OneLineGroup(click.Group):
    """Click's own usage errors (``--backend tpu``, an unknown option) as one line too,
    naming the command and where its help is, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else ""
            hint = (f" (see '{ctx.command_path} --help')"
                    if isinstance(e, click.UsageError) and ctx is not None else "")
            click.echo(f"error: {where}{_one_line(e.format_message())}{hint}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="synapse")
def main():
    """Tiered GPU memory for LLM inference: simulate a policy, then run it on the GPU.

    Start with `synapse run` (the needle scenario on the simulator) and `synapse list`.
    """


SET_HELP = "Override a scenario field, e.g. --set memory.l1_budget=10% (repeatable)."


@main.command()
@click.argument("scenario", required=False)
@click.option("--backend", "backend", default="sim", show_default=True,
              type=click.Choice(["sim", "cpu", "cuda"]),
              help="sim: SimPy model of the hardware profile. cpu: real bytes through the "
                   "hardware path's allocator, ring and INT4 layout with NumPy (a reference, "
                   "not a performance path). cuda: PyCUDA on an NVIDIA GPU.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--out", "out", type=click.Path(path_type=Path),
              help="Directory for result.json, decisions.jsonl and ops.json "
                   "(default: runs/<scenario>-<policy>-<backend>, never overwritten). "
                   "Checked before the run starts; each file is written whole or not at all.")
@click.option("--prometheus", type=click.Path(path_type=Path),
              help="Also write the metrics in Prometheus text format to this file.")
@click.option("--serve-metrics", "serve_port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Serve live /metrics and /health on PORT while the run goes (0: any free "
                   "port, printed); see docs/operate.md.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address --serve-metrics binds to.")
@click.option("--linger", type=click.FloatRange(min=0), default=0.0, show_default=True,
              metavar="SECONDS", help="With --serve-metrics: keep serving this long after the "
                                      "run, so a scraper sees the final counters.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary table.")
@one_line_errors
def run(scenario, backend, overrides, out, prometheus, serve_port, metrics_host, linger, quiet):
    """Run SCENARIO (a YAML path or a shipped name; default: needle) on a backend.

    Prints a summary table and writes result.json with the same fields from every
    backend, so runs can be compared (`synapse compare`) and plotted (`synapse dashboard`).
    The scenario is checked, its needs estimated against this machine and the output
    location tested before anything runs.
    """
    from .outputs import check_dir, check_file
    from .runner import default_out_dir, run_scenario
    from .scenarios.loader import load_scenario, resolve_path

    source = str(resolve_path(scenario)) + (" with --set" if overrides else "")
    sc = load_scenario(scenario, overrides)
    out_dir = out or default_out_dir(sc, backend)
    check_dir(out_dir, "--out")
    if prometheus:
        check_file(prometheus, "--prometheus")
    server = observe = None
    if serve_port is not None:
        from .monitor import serve
        from .monitor.run_probe import RunProbe
        server, observe = serve(serve_port, metrics_host), RunProbe
        click.echo(f"serving {server.url}/metrics and {server.url}/health", err=True)
    try:
        res = run_scenario(sc, backend, source, progress=not quiet and sys.stderr.isatty(),
                           observe=observe)
    finally:
        if server is not None:
            if linger:
                import time
                time.sleep(linger)
            server.close()
    path = _write_or_rescue(res, out_dir, sc.name)
    if prometheus:
        from .outputs import atomic_write
        from .telemetry import prometheus_text
        atomic_write(prometheus, prometheus_text(res.metrics, {"scenario": sc.name,
                                                               "backend": backend,
                                                               "policy": sc.policy.eviction}))
    if not quiet:
        from .report import summary_table
        click.echo(summary_table(res.result))
    click.echo(f"wrote {path}")


@main.command("serve-metrics")
@click.argument("scenario", required=False)
@click.option("--port", type=click.IntRange(0, 65535), default=9400, show_default=True,
              help="Port of /metrics and /health (0: any free port, printed).")
@click.option("--host", "metrics_host", default="127.0.0.1", show_default=True,
              help="Address to bind (the default keeps the endpoint on this machine).")
@click.option("--backend", "backend", default="sim", show_default=True,
              type=click.Choice(["sim", "cpu", "cuda"]), help="As for `synapse run`.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--out", "out", type=click.Path(path_type=Path),
              help="Directory for the run's files, as for `synapse run`.")
@click.option("--linger", type=click.FloatRange(min=0), default=0.0, show_default=True,
              metavar="SECONDS", help="Keep serving this long after the run, so a scraper "
                                      "sees the final counters.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary table.")
@click.pass_context
def serve_metrics(ctx, scenario, port, metrics_host, backend, overrides, out, linger, quiet):
    """Run SCENARIO with live Prometheus /metrics and /health served while it goes.

    The same run as `synapse run SCENARIO --serve-metrics PORT`: counters and histograms
    of hits per tier, bytes and copies per direction, evictions, refusals, migration
    latency and allocations per purpose (docs/operate.md).
    """
    ctx.invoke(run, scenario=scenario, backend=backend, overrides=overrides, out=out,
               prometheus=None, serve_port=port, metrics_host=metrics_host, linger=linger,
               quiet=quiet)


def _write_or_rescue(res, out_dir: Path, name: str) -> Path:
    """The result files into ``out_dir``; if that fails now (the disk filled up during the
    run, say), into a new temporary folder, named in the one-line error: a finished run is
    never lost."""
    import tempfile

    from .errors import OutputError
    from .runner import write_result
    try:
        return write_result(res, out_dir)
    except OutputError as e:
        rescue = Path(tempfile.mkdtemp(prefix=f"synapse-{name}-"))
        write_result(res, rescue)
        raise OutputError(f"{e}; the results were written to {rescue} instead") from None


@main.command()
@click.argument("scenario", required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--backend", default="sim", show_default=True,
              type=click.Choice(["sim", "cpu", "cuda"]),
              help="Backend to estimate the scenario's needs for (memory, steps, time).")
@one_line_errors
def validate(scenario, overrides, backend):
    """Check SCENARIO and print its resolved configuration (defaults, file, --set), then
    what it needs on a backend, checked against this machine as `synapse run` does."""
    import yaml

    from .config import to_dict
    from .scenarios.estimate import check_needs, estimate_scenario
    from .scenarios.loader import load_scenario, resolve_path
    from .sim.profile import load_profile

    source = str(resolve_path(scenario)) + (" with --set" if overrides else "")
    sc = load_scenario(scenario, overrides)
    profile = load_profile(sc.profile)
    needs = estimate_scenario(sc, backend, source)
    check_needs(sc, needs, backend, profile, source)
    click.echo(yaml.safe_dump(to_dict(sc), sort_keys=False).rstrip())
    click.echo(f"needs: {needs.describe(backend)}")
    click.echo(f"ok: {resolve_path(scenario)} is a valid {sc.kind} scenario")


@main.command()
@click.option("--backend", default="cuda", show_default=True,
              type=click.Choice(["cuda", "cpu", "disk"]),
              help="What to measure: cuda, this GPU, the disk and short runs of every driver; "
                   "cpu, short driver runs on the NumPy backend (no GPU needed; the link and "
                   "disk figures are --base's); disk, only the disk (others from --base).")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Profile to write, e.g. profiles/h100-mine.yaml (the raw measurements go "
                   "beside it as .measurements.json); checked before measuring starts.")
@click.option("--name", help="Profile name scenarios refer to (default: the file's stem).")
@click.option("--quick", is_flag=True, help="Smaller buffers and files, one short run per "
                                            "driver: about a quarter of the time.")
@click.option("--repeats", type=click.IntRange(1, 20), default=None,
              help="Runs of each driver piece (default 3; 1 with --quick): each run is one "
                   "equation of the host fit.")
@click.option("--pieces", type=click.Choice(["all", "small"]), default=None,
              help="Which driver pieces run: all (two or more sizes of each driver; the "
                   "default) or small (the smaller of each; the default with --quick).")
@click.option("--disk-dir", "disk_dir", type=click.Path(file_okay=False, path_type=Path),
              help="A directory on the disk the L3 tier will use (default: the output's "
                   "directory); temporary files are written there and removed.")
@click.option("--base", help="With --backend disk or cpu: the profile (name or path) whose "
                             "other figures the new profile keeps (cpu: default h100-sxm).")
@click.option("--from-measurements", "from_json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Fit a profile from a recorded .measurements.json instead of measuring.")
@one_line_errors
def calibrate(backend, output, name, quick, repeats, pieces, disk_dir, base, from_json):
    """Measure this GPU (link by transfer size, both directions, device copy, INT4 and
    attention kernels, GEMM, host overhead) and the local disk (sequential write and cold
    read), run short pieces of every scenario driver to fit the host's cost per step, op,
    row and L1 page mapped and a table of op durations, and write a hardware profile the simulator loads
    by name. Takes a minute or two. `--backend cpu` runs only the driver pieces, on the
    NumPy backend; `--backend disk --base h200` measures only the disk."""
    import json

    from .calibrate import build_profile_checked, with_disk, write_profile
    from .outputs import atomic_write, check_file
    from .results import read_json

    name = name or output.stem
    check_file(output, "-o")
    measurements = output.with_suffix(".measurements.json")
    disk_dir = disk_dir or output.resolve().parent
    progress = lambda msg: click.echo(f"measuring: {msg}", err=True)  # noqa: E731
    if backend == "disk" and base is None and not from_json:
        raise ScenarioError("calibrate --backend disk: --base PROFILE is needed (the profile "
                            "whose other figures are kept), e.g. --base h200")
    if backend == "cpu" and base is None:
        base = "h100-sxm"
    if from_json:
        raw = read_json(from_json)
    elif backend == "cpu":
        from .calibrate import measure_driver_runs
        from .sim.profile import load_profile
        check_file(measurements, "-o")
        load_profile(base)  # a bad --base is refused before anything runs
        raw = {"driver_runs": measure_driver_runs("cpu", base, progress, quick, repeats, pieces)}
    elif backend == "disk":
        raw = {"disk": _measure_disk(disk_dir, quick, progress)}
    else:
        check_file(measurements, "-o")
        try:
            import pycuda.driver  # noqa: F401  (measure_all imports it only once it starts)

            from .hw.measure import measure_all
        except ImportError as e:
            from .errors import BackendUnavailable
            raise BackendUnavailable(f"calibrate needs PyCUDA and an NVIDIA GPU ({e})") from None
        raw = measure_all(progress=progress, quick=quick)
        raw["disk"] = _measure_disk(disk_dir, quick, progress)
        from .calibrate import measure_driver_runs
        raw["driver_runs"] = measure_driver_runs("cuda", base or "h200", progress, quick,
                                                 repeats, pieces)
    if not from_json:
        atomic_write(measurements, json.dumps(raw, indent=1, default=str))
    measured_on = None
    if backend == "disk":
        from .sim.profile import load_profile
        prof, quality = with_disk(load_profile(base), name, raw["disk"])
        measured_on = (f"the disk at {raw['disk']['directory']} only; every other figure is "
                       f"profile {base}'s")
    elif "driver_runs" in raw and "h2d" not in raw:  # calibrate --backend cpu
        from dataclasses import replace as _replace

        from .sim.profile import load_profile
        base = base or raw["driver_runs"].get("base") or "h100-sxm"
        prof, quality = _replace(load_profile(base), name=name,
                                 device="host (NumPy cpu backend)", op_table="",
                                 measured={"base": base}), {}
        measured_on = f"the NumPy cpu backend of this host; link and disk figures are {base}'s"
    else:
        prof, quality = build_profile_checked(name, raw, str(from_json or measurements))
    fit_lines = []
    if "driver_runs" in raw:
        from .calibrate import driver_fit_checked, format_driver_fit
        prof, report = driver_fit_checked(prof, raw["driver_runs"],
                                          output.with_suffix(".optable.json"),
                                          str(from_json or measurements))
        fit_lines = format_driver_fit(report)
    write_profile(prof, output, measured_on)
    l, k = prof.link, prof.kernels
    if "h2d" in raw:
        click.echo(f"{prof.device}: H2D {l.h2d_gb_per_s:.1f} GB/s, D2H {l.d2h_gb_per_s:.1f} GB/s, "
                   f"both {l.duplex_gb_per_s:.1f} GB/s, copy fixed {l.copy_latency_us:.1f} us; "
                   f"attention {k.attention.gb_per_s:.0f} GB/s; INT4 q/dq "
                   f"{k.int4_quantize.gb_per_s:.0f}/{k.int4_dequantize.gb_per_s:.0f} GB/s; "
                   f"host submit {prof.host.submit_us:.1f} us + {prof.host.per_item_us:.1f} us per row, "
                   f"staging {prof.host.stage_gb_per_s:.1f} GB/s")
    if "disk" in raw:
        dk = prof.disk
        click.echo(f"disk {prof.disk.device}: read {dk.read.gb_per_s:.2f} GB/s + "
                   f"{dk.read.fixed_us:.0f} us a file, write {dk.write.gb_per_s:.2f} GB/s + "
                   f"{dk.write.fixed_us:.0f} us; page cache: {raw['disk']['cache_effects']}")
    for line in fit_lines:
        click.echo(line)
    worst = max(quality.values()) if quality else 0.0
    if quality:
        click.echo(f"fits: worst relative error {worst:.1%} ({', '.join(f'{k} {v:.1%}' for k, v in quality.items())})")
    click.echo(f"wrote {output}")


def _measure_disk(directory: Path, quick: bool, progress) -> dict:
    from .hw.measure_disk import DISK_SIZES, QUICK_SIZES, disk_sweep
    try:
        return disk_sweep(directory, QUICK_SIZES if quick else DISK_SIZES, progress=progress)
    except OSError as e:
        from .errors import StorageError
        raise StorageError(f"calibrate --disk-dir {directory}: {e}") from None


@main.command("list")
@one_line_errors
def list_cmd():
    """List shipped scenarios, eviction policies, hardware profiles and backends."""
    from .policy import POLICIES
    from .runner import BACKENDS
    from .scenarios.loader import builtin_scenarios
    from .sim.profile import available_profiles

    click.echo("scenarios: " + ", ".join(builtin_scenarios()))
    click.echo("policies:  " + ", ".join(POLICIES))
    click.echo("profiles:  " + ", ".join(f"{n} ({p})" for n, p in available_profiles().items()))
    click.echo("backends:  " + ", ".join(BACKENDS))


from .cli_whatif import register as _register_whatif; _register_whatif(main)  # noqa: E402,E702
from .cli_trace import register as _register_trace; _register_trace(main)  # noqa: E402,E702
from .cli_operate import register as _register_operate; _register_operate(main)  # noqa: E402,E702


if __name__ == "__main__":
    main()
