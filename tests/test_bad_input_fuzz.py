"""Property: however a shipped scenario is broken, the CLI answers with exit code 0 or 2,
never a traceback, and an error is one line; an accepted scenario finishes within its
estimate.

What runs here, honestly: every case is validated by ``synapse validate`` (which also
estimates its needs against this machine). An accepted case estimated at under
``RUN_BELOW_S`` seconds is then run on the simulator with ``synapse run`` and its steps,
ops and wall time are compared with the estimate; an accepted case estimated longer is
only validated and estimated (its estimate must still be within the limits, or validate
would have refused it). The cases start from the shipped scenarios shrunk by the tiny
overrides, so most accepted ones run. ``benchmarks/fuzz_inputs.py`` runs the same cases
by the thousand.
"""

from hypothesis import HealthCheck, given, settings

from scenario_mutations import check_case, cases

EXAMPLES = 120  # ~20 s here; the campaign script runs 1500+
PLAUSIBLE = 30  # mostly accepted and run: ~20 s


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_mutated_scenarios_exit_0_or_2_with_one_line_and_finish_within_their_estimate(
        case, tmp_path_factory):
    v = check_case(case, tmp_path_factory.mktemp("case"))
    assert v.problem is None, f"{case.describe()}\n{v.stage}: {v.problem}\n{v.output[-2000:]}"


@settings(max_examples=PLAUSIBLE, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(case=cases(plausible=True))
def test_plausibly_edited_scenarios_run_within_their_estimate_or_are_refused_in_one_line(
        case, tmp_path_factory):
    v = check_case(case, tmp_path_factory.mktemp("case"))
    assert v.problem is None, f"{case.describe()}\n{v.stage}: {v.problem}\n{v.output[-2000:]}"
