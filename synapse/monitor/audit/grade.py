"""Checks and the grade: a stated function of measured numbers.

A ``Check`` compares one measured value with a threshold. ``passed`` is None when the
check could not be graded on this backend, and ``note`` says why (e.g. the ``cpu``
backend runs ops synchronously, so no copy can overlap compute there).

The grade (``GRADE_RULE``, also written into every report):

- an audit's score = checks passed / checks graded (audits with none graded: no score);
- the overall score = the mean of the audits' scores;
- the letter: F if any *critical* check failed (a block lost, a request neither served nor
  refused, a cross-tenant read served, freed memory not zero, an fp16 round trip not
  bit-exact, INT4 error over its bound, an allocation in the wrong kind of memory);
  otherwise A at 1.0, B from 0.9, C from 0.75, D from 0.5, F below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GRADE_RULE = ("audit score = passed / graded checks; overall = mean of audit scores; "
              "F if any critical check failed, else A = 1.0, B >= 0.9, C >= 0.75, D >= 0.5, F below")
LETTERS = ((1.0, "A"), (0.9, "B"), (0.75, "C"), (0.5, "D"))


@dataclass
class Check:
    name: str
    value: object          # the measured number (or count)
    threshold: str         # what passing means, e.g. "== 0", "<= 1.0"
    passed: bool | None    # None: not graded here (note says why)
    critical: bool = False
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def at_most(name: str, value, limit, critical: bool = False, note: str = "") -> Check:
    return Check(name, value, f"<= {limit}", value is not None and value <= limit, critical, note)


def at_least(name: str, value, limit, critical: bool = False, note: str = "") -> Check:
    return Check(name, value, f">= {limit}", value is not None and value >= limit, critical, note)


def equals(name: str, value, want, critical: bool = False, note: str = "") -> Check:
    return Check(name, value, f"== {want}", value == want, critical, note)


def not_graded(name: str, value, threshold: str, note: str) -> Check:
    return Check(name, value, threshold, None, False, note)


def audit_score(checks: list[Check]) -> float | None:
    graded = [c for c in checks if c.passed is not None]
    return sum(bool(c.passed) for c in graded) / len(graded) if graded else None


def grade(audits: dict[str, list[Check]]) -> tuple[float | None, str]:
    scores = [s for s in (audit_score(c) for c in audits.values()) if s is not None]
    if not scores:
        return None, "F"
    score = sum(scores) / len(scores)
    if any(c.critical and c.passed is False for cs in audits.values() for c in cs):
        return score, "F"
    for floor, letter in LETTERS:
        if score >= floor - 1e-12:
            return score, letter
    return score, "F"
