"""The command line as a new user meets it: help everywhere, one-line errors, exit 2."""

from pathlib import Path

import pytest

from synapse import __version__
from synapse.cli import main
from cli_helpers import invoke, one_line_error


SHIPPED = Path(__file__).resolve().parents[1] / "scenarios"



def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.output


def test_every_command_has_help():
    for name in main.list_commands(None):
        r = invoke(name, "--help")
        assert r.exit_code == 0, (name, r.output)
        assert main.get_command(None, name).help, f"{name} has no help text"
        assert "Usage:" in r.output



@pytest.mark.parametrize("override, fragments", [
    ("memory.l1_budgt=10%", ("memory.l1_budgt", "did you mean 'l1_budget'")),
    ("memory.l1_budget=-5GiB", ("memory.l1_budget", "'-5GiB'", "expected a size")),
    ("memory.l1_budget=900GiB", ("memory.l1_budget", "at most the HBM")),
    ("policy.eviction=lur", ("policy.eviction", "'lur'", "one of lru")),
    ("workload.context_tokens=abc", ("workload.context_tokens", "'abc'", "integer")),
    ("profile=nope", ("profile", "'nope'", "h100-sxm")),
    ("nokey", ("--set 'nokey'", "key.path=value")),
])
def test_bad_override_is_one_line_exit_2(tmp_path, override, fragments):
    out = tmp_path / "out"
    r = invoke("run", str(SHIPPED / "needle.yaml"), "--set", override, "-q", "--out", str(out))
    one_line_error(r, *fragments)
    assert not out.exists(), "a refused run must not leave an output folder"


def test_missing_file(tmp_path):
    one_line_error(invoke("run", str(tmp_path / "nope.yaml")), "nope.yaml", "no such file")


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nkind: needle\nmodel: {layers: 2\n")
    one_line_error(invoke("validate", str(p)), "bad.yaml:4", "YAML syntax error")


def test_wrong_type_in_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nkind: needle\nmodel: {layers: two}\n")
    one_line_error(invoke("validate", str(p)), "bad.yaml", "model.layers", "integer")


def test_unknown_kind_in_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nkind: neddle\n")
    one_line_error(invoke("validate", str(p)), "bad.yaml", "kind")


def test_cuda_backend_without_pycuda_is_one_line():
    pytest.importorskip("synapse")  # always present; documents intent
    try:
        import pycuda.driver  # noqa: F401
        pytest.skip("PyCUDA is importable here: the refusal path cannot be exercised")
    except ImportError:
        pass
    r = invoke("run", str(SHIPPED / "needle.yaml"), "--backend", "cuda", "-q")
    one_line_error(r, "--backend cuda", "PyCUDA")


def test_run_writes_result_and_prints_summary(tmp_path, small_needle):
    out = tmp_path / "run"
    sets = [a for kv in small_needle for a in ("--set", kv)]
    r = invoke("run", str(SHIPPED / "needle.yaml"), *sets, "--out", str(out))
    assert r.exit_code == 0, r.output
    assert (out / "result.json").exists() and (out / "decisions.jsonl").exists()
    assert "L1 hit rate" in r.output and "needle retained                True" in r.output


def test_list_names_scenarios_policies_profiles():
    r = invoke("list")
    assert r.exit_code == 0
    for name in ("needle", "streaming", "tsunami", "tenants", "h2o", "belady", "h100-sxm"):
        assert name in r.output


def test_missing_field(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("kind: needle\n")
    one_line_error(invoke("validate", str(p)), "m.yaml", "name", "missing field")


def test_zero_size(tmp_path):
    p = tmp_path / "z.yaml"
    p.write_text("name: x\nkind: needle\nmemory: {l1_budget: 0}\n")
    one_line_error(invoke("validate", str(p)), "z.yaml", "memory.l1_budget", "got 0", "> 0")
