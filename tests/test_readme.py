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


def test_the_transformers_example_runs_as_printed(tmp_path, monkeypatch):
    """The README's "Use it from transformers" example, executed verbatim (it writes
    runs/hf-h2o under the working directory)."""
    import pytest
    pytest.importorskip("transformers")
    text = (ROOT / "README.md").read_text()
    start = text.index("```python", text.index("## Use it from transformers")) + len("```python")
    code = text[start:text.index("```", start)]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Use it from transformers)", "exec"), {"__name__": "readme"})
    result = (tmp_path / "runs" / "hf-h2o" / "result.json").read_text()
    assert '"hf_cache"' in result
