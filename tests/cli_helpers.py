"""What the CLI tests share: invoking the command and the one-line error contract."""

from click.testing import CliRunner

from synapse.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="synapse")


def one_line_error(r, *fragments):
    """Exit code 2, exactly one non-empty line, no traceback, naming each fragment."""
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for f in fragments:
        assert f in lines[0], lines[0]
