"""CI runs the README's test command verbatim; this keeps the two from drifting apart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text):
    return [ln.strip() for ln in text.splitlines() if ln.startswith("    python3 -m venv")]


def test_ci_runs_the_readme_test_command():
    readme = _commands((ROOT / "README.md").read_text())
    assert len(readme) >= 2, "the README opens with an install+run and a test command"
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
                if ln.startswith("python3 -m venv")]
    assert ci_lines == [readme[1]]


def test_readme_run_command_uses_the_default_scenario():
    first = _commands((ROOT / "README.md").read_text())[0]
    assert first.endswith("synapse run")
