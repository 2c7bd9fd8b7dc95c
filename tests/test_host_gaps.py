"""benchmarks/host_gaps.py: the host busy time between submits, from op records."""

from pathlib import Path

import pytest


@pytest.fixture
def hg(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import host_gaps
    return host_gaps


def test_runs_are_split_where_the_submit_clock_restarts(hg):
    assert hg.runs_of({"submit_s": [0.1, 0.2, 0.05, 0.3, 0.01]}) == [[0, 1], [2, 3], [4]]


def test_a_gap_is_busy_unless_the_driver_waited_for_an_op_that_ended_inside_it(hg):
    cols = {"submit_s": [0.0, 1.0, 5.0, 6.0], "start_s": [0.2, 1.5, 5.1, 6.1],
            "end_s": [0.5, 4.0, 5.2, 6.2]}
    rows = [{"waits": [], "unmaps": 0},    # no wait: the whole gap is host work
            {"waits": [1], "unmaps": 0},   # waited for op 1 (ended at 4): 0.5 before, 1 after
            {"waits": [], "unmaps": 0},    # not waited for, but the next submit follows a
            {"waits": [], "unmaps": 1}]    # trim, which waits for every stream: 0.1 + 0.8
    assert hg.gap_busy(cols, [0, 1, 2, 3], rows) == pytest.approx([1.0, 1.5, 0.9])
    rows[3]["unmaps"] = 0
    assert hg.gap_busy(cols, [0, 1, 2, 3], rows)[2] == pytest.approx(1.0)
