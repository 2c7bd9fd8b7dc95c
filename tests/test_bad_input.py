"""Every bad input of issue 12 is one line naming the file, the field, the value and what
was expected, with exit code 2; and what a scenario needs is checked before it runs."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from cli_helpers import invoke, one_line_error
from synapse.errors import ScenarioError
from synapse.scenarios.estimate import Needs, StepGuard, check_needs, estimate_scenario
from synapse.scenarios.loader import load_scenario
from synapse.scenarios.tiny import TINY_NEEDLE, TINY_TSUNAMI
from synapse.sim.profile import load_profile

SHIPPED = Path(__file__).resolve().parents[1] / "scenarios"


@pytest.mark.parametrize("scenario, override, fragments", [
    # an integer field checked against choices
    ("needle", "model.head_dim=96", ("model.head_dim", "got 96", "one of 64, 128")),
    ("needle", "model.head_dim=256", ("model.head_dim", "got 256", "one of 64, 128")),
    ("needle", "memory.int4_group=0", ("memory.int4_group", "got 0", "one of 32, 64, 128")),
    ("needle", "memory.int4_group=16", ("memory.int4_group", "got 16", "one of 32, 64, 128")),
    # what the policy layer would refuse at run time is refused by the schema
    ("needle", "policy.low_watermark=0", ("policy.low_watermark", "got 0", "(0, 1]")),
    ("needle", "policy.high_watermark=0", ("policy.high_watermark", "got 0", "(0, 1]")),
    ("needle", "policy.eviction_ratio=0", ("policy.eviction_ratio", "got 0", "(0, 1]")),
    ("needle", "policy.low_watermark=0.99", ("policy.low_watermark", "0.99", "high_watermark")),
    ("needle", "policy.heavy_ratio=1.5", ("policy.heavy_ratio", "1.5", "[0, 1]")),
    ("needle", "policy.sink_blocks=-1", ("policy.sink_blocks", "-1", "[0, 65536]")),
    # overflowing and non-finite numbers
    ("needle", "memory.l1_budget=1e400", ("memory.l1_budget", "'1e400'", "finite")),
    ("needle", "memory.l1_budget=1e400GiB", ("memory.l1_budget", "'1e400GiB'", "finite")),
    ("needle", "memory.l2_budget=100000000000000000000000", ("memory.l2_budget", "at most 1 EiB")),
    ("needle", "workload.zipf_alpha=.inf", ("workload.zipf_alpha", "inf", "finite")),
    ("needle", "workload.recency_nats=.inf", ("workload.recency_nats", "inf", "finite")),
    ("needle", "workload.noise_std=.nan", ("workload.noise_std", "nan", "finite")),
    ("needle", "workload.zipf_alpha=1e400", ("workload.zipf_alpha", "1e400")),
    # values that used to hang for minutes
    ("streaming", "workload.batch_tokens=1.0e+308", ("workload.batch_tokens", "1e+308", "[1, 65536]")),
    ("needle", "workload.noise_rank=100000", ("workload.noise_rank", "100000", "[1, 125]")),
    ("needle", "memory.staging_blocks=1000000000", ("memory.staging_blocks", "1000000000",
                                                    "[1, 4096]")),
    ("needle", "workload.context_tokens=1000000000000", ("workload.context_tokens",
                                                         "1000000000000", "16777216")),
    # a field's bound says why
    ("needle", "model.layers=5000", ("model.layers", "5000", "[1, 1024]", "published")),
    ("needle", "workload.noise_rank=62", ("workload.noise_rank", "62", "head_dim - 3 = 61")),
    ("needle", "name=../../etc", ("name", "'../../etc'", "output folder")),
])
def test_bad_value_is_one_line_naming_field_value_and_expectation(scenario, override, fragments):
    if override.startswith("workload.noise_rank=62"):
        override_args = ["--set", "model.head_dim=64", "--set", override]
    else:
        override_args = ["--set", override]
    r = invoke("validate", SHIPPED / f"{scenario}.yaml", *override_args)
    one_line_error(r, f"{scenario}.yaml", *fragments)


def test_a_file_that_is_not_utf8_names_line_and_column(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"name: x\nkind: needle\ndescription: caf\xe9\n")
    one_line_error(invoke("validate", p), "latin1.yaml:3:17", "not UTF-8", "0xe9")


def test_a_nul_byte_is_a_yaml_error_on_one_line(tmp_path):
    p = tmp_path / "nul.yaml"
    p.write_bytes(b"name: x\x00\n")
    one_line_error(invoke("validate", p), "nul.yaml:1:8", "#x0000")


@pytest.mark.parametrize("depth", [20, 1000, 5000])
def test_deep_nesting_in_a_file_or_a_set_is_refused_before_any_recursion(tmp_path, depth):
    p = tmp_path / "deep.yaml"
    p.write_text("name: x\nkind: needle\nmodel: " + "[" * depth + "]" * depth + "\n")
    one_line_error(invoke("validate", p), "deep.yaml", "nested", "16")
    one_line_error(invoke("validate", "needle", "--set", "model=" + "{a: " * depth + "1"
                          + "}" * depth), "--set model", "nested")


def test_yaml_aliases_that_expand_without_end_are_refused(tmp_path):
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\nname: x\n")
    one_line_error(invoke("validate", p), "bomb.yaml", "values")


def test_an_integer_of_thousands_of_digits_is_one_line(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("name: x\nkind: needle\nseed: " + "9" * 5000 + "\n")
    one_line_error(invoke("validate", p), "big.yaml")


def test_a_deleted_kind_is_reported_as_missing_not_as_foreign_workload_keys(tmp_path):
    data = yaml.safe_load((SHIPPED / "tenants.yaml").read_text())
    del data["kind"]
    p = tmp_path / "tenants.yaml"
    p.write_text(yaml.safe_dump(data))
    r = invoke("validate", p)
    one_line_error(r, "tenants.yaml", "kind: missing", "fit kind 'tenants'")
    assert "unknown key" not in r.output


@pytest.mark.parametrize("args, fragments", [
    (("run", "needle", "--backend", "tpu"), ("synapse run", "--backend", "'tpu'", "--help")),
    (("run", "needle", "--bogus"), ("synapse run", "--bogus")),
    (("validate", "needle", "--set"), ("--set", "requires an argument")),
    (("sweep", "needle"), ("synapse sweep", "--grid")),
    (("nope",), ("synapse", "nope")),
])
def test_click_usage_errors_are_one_line_too(args, fragments):
    one_line_error(invoke(*args), *fragments)


def test_help_and_version_still_exit_0():
    assert invoke("--help").exit_code == 0
    assert invoke("run", "--help").exit_code == 0


# -- what a scenario needs, before it runs ------------------------------------------------
def test_a_context_that_cannot_fit_in_host_memory_is_refused_before_running():
    r = invoke("run", "needle", "--set", "workload.context_tokens=16000000", "-q")
    one_line_error(r, "needle.yaml", "workload.context_tokens", "got 16000000",
                   "of host memory", "attention matrix", "this machine has available")


def test_the_refusal_names_the_figure_and_the_limit():
    sc = load_scenario("needle", TINY_NEEDLE)
    needs = estimate_scenario(sc, "sim")
    with pytest.raises(ScenarioError, match=r"needs about .* of host memory .* available \(1\.00 KiB\)"):
        check_needs(sc, needs, "sim", load_profile(sc.profile), host_available=1024)


def test_cuda_device_memory_is_checked_against_the_profile():
    sc = load_scenario("streaming", ["workload.vram_budget=70GiB", "workload.layers=200",
                                     "workload.hidden=8192"])
    needs = estimate_scenario(sc, "cuda")
    assert needs.device_bytes > sc.workload.layers * 2 * 8192 * 8192 * 4 * 2
    with pytest.raises(ScenarioError, match="device memory, expected at most the HBM"):
        check_needs(sc, needs, "cuda", load_profile(sc.profile), host_available=None)


def test_a_run_estimated_beyond_a_day_is_refused():
    sc = load_scenario("needle", TINY_NEEDLE)
    slow = dataclasses.replace(estimate_scenario(sc, "sim"), seconds=1e9)
    with pytest.raises(ScenarioError, match="hours"):
        check_needs(sc, slow, "sim", load_profile(sc.profile), host_available=None)


def test_a_serving_request_that_could_never_fit_below_the_high_watermark_is_refused():
    sc = load_scenario("tsunami", TINY_TSUNAMI + ["workload.prompt_tokens=4096"])
    with pytest.raises(ScenarioError, match="workload.prompt_tokens: a request of 4096"):
        estimate_scenario(sc, "sim", "tsunami.yaml")


@pytest.mark.parametrize("name, sets", [("needle", TINY_NEEDLE), ("tsunami", TINY_TSUNAMI)])
def test_steps_and_ops_of_a_run_stay_within_the_estimate(name, sets):
    from conftest import run
    sc = load_scenario(name, sets)
    needs = estimate_scenario(sc, "sim")
    res = run(name, sets)
    assert len(res.result["timeline"]["step"]) <= needs.steps
    assert len(res.ops["kind"]) <= needs.ops


def test_a_run_past_its_step_bound_is_stopped_in_one_line():
    guard = StepGuard(3, "x.yaml")
    for _ in range(3):
        guard()
    with pytest.raises(ScenarioError, match="x.yaml: stopped after 3 steps"):
        guard()


def test_needs_describe_themselves_for_validate():
    r = invoke("validate", "needle", *[a for s in TINY_NEEDLE for a in ("--set", s)])
    assert r.exit_code == 0, r.output
    assert "needs: host" in r.output and "at most 24 steps" in r.output
    assert isinstance(estimate_scenario(load_scenario("needle", TINY_NEEDLE)), Needs)


def test_without_a_gpu_there_is_no_free_device_memory_to_check_against():
    from synapse.scenarios.estimate import check_device, device_free_bytes
    try:
        import pycuda.driver  # noqa: F401
        pytest.skip("PyCUDA is importable here")
    except ImportError:
        pass
    assert device_free_bytes() is None
    check_device(estimate_scenario(load_scenario("needle", TINY_NEEDLE), "cuda"), None)


@pytest.mark.cuda
def test_on_the_gpu_the_device_need_is_checked_against_its_free_memory():
    from synapse.scenarios.estimate import check_device, device_free_bytes
    try:
        from synapse.hw.cuda_backend import CudaBackend
        backend = CudaBackend()
    except Exception as e:  # ImportError, BackendUnavailable
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU: {e}")
    try:
        free = device_free_bytes()
        assert free is not None and free > 0
        needs = estimate_scenario(load_scenario("needle", TINY_NEEDLE), "cuda")
        check_device(needs, free)  # the tiny scenario fits
        with pytest.raises(ScenarioError, match="what this GPU has free"):
            check_device(dataclasses.replace(needs, device_bytes=free + 1), free)
    finally:
        backend.close()
