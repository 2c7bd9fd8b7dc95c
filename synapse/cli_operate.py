"""Operating commands: ``synapse audit`` (the readiness audit). Live metrics for a
scenario run are ``synapse run --serve-metrics PORT``; see docs/operate.md."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.option("--backend", default="cpu", show_default=True,
              type=click.Choice(["sim", "cpu", "cuda"]),
              help="Where the audits run. sim: scenario audits on the simulator, byte audits "
                   "on the cpu backend (the simulator moves no bytes).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("audit"), show_default=True,
              help="Folder for readiness_report.json and summary.txt.")
@click.option("--preset", type=click.Choice(["tiny", "shipped"]), default="tiny",
              show_default=True,
              help="Scenario sizes: tiny (seconds, what CI runs) or the shipped scenarios "
                   "(minutes on a GPU; very slow on cpu).")
@click.option("--seed", type=int, help="Seed of the random data (default: fresh, recorded "
                                       "in the report).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
def audit(backend, out, preset, seed, quiet):
    """Run the readiness audits for real and grade them: numerical integrity, latency
    stability, resiliency (tsunami at 2x/5x/10x capacity), tenant isolation, residency.

    Writes OUT/readiness_report.json (every check: value, threshold, pass, why) and
    OUT/summary.txt (what is printed). Exit status 0 whatever the grade; 2 for bad input.
    """
    from .cli import one_line_errors
    from .monitor.audit import run_audit, summary, write
    from .outputs import check_dir

    def go():
        check_dir(out, "--out")  # before minutes of audits, not after
        report = run_audit(backend, preset, seed, progress=not quiet and sys.stderr.isatty())
        path = write(report, out)
        if not quiet:
            click.echo(summary(report))
        click.echo(f"wrote {path}")
    one_line_errors(go)()


def register(main) -> None:
    main.add_command(audit)
