"""Sweep grids: ``key=v1,v2`` lists and ``start:stop:step`` ranges over scenario and profile keys.

A key is exactly a ``--set`` key of the scenario (``memory.l1_budget``, ``seed``...) or
``profile.<field>`` of its hardware profile. Ranges keep their unit (``8GiB:32GiB:8GiB``,
``10%:40%:5%``) and step in decimal, so ``0.1:0.3:0.1`` is exactly 0.1, 0.2, 0.3; the stop is
included. Everything wrong (an unknown key, with a did-you-mean; an empty range; a repeated
value) is a one-line ``ScenarioError``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from .config import field_paths
from .errors import ScenarioError
from .units import _UNITS

PROFILE_PREFIX = "profile."
MAX_POINTS = 100_000


@dataclass(frozen=True)
class Axis:
    """One grid key and its values, as override text (parsed like ``--set`` values)."""

    key: str
    values: tuple[str, ...]


_NUM = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z%]*)"
_RANGE_RE = re.compile(rf"^\s*{_NUM}\s*:\s*{_NUM}\s*(?::\s*{_NUM})?\s*$")


def expand_range(key: str, text: str) -> list[str] | None:
    """``start:stop[:step]`` -> the values from start to stop inclusive, or None if ``text``
    is not a range. Units are kept (``8GiB:32GiB:8GiB``, ``5%:20%:5%``); decimal
    arithmetic, so ``0.1:0.3:0.1`` gives exactly 0.1, 0.2, 0.3."""
    m = _RANGE_RE.match(text)
    if not m:
        return None
    a, ua, b, ub, s, us = m.groups()
    us = us if s is not None else ua
    units = {u for u in (ua, ub, us) if u}
    where = f"--grid {key}={text}"
    if len(units) > 1:
        raise ScenarioError(f"{where}: range bounds and step must share one unit, got "
                            f"{', '.join(sorted(units))}")
    unit = units.pop() if units else ""
    if unit and unit != "%" and unit.lower() not in _UNITS:
        raise ScenarioError(f"{where}: unknown unit {unit!r} (sizes such as GiB or MB, or %)")
    try:
        start, stop = Decimal(a), Decimal(b)
        step = Decimal(s) if s is not None else Decimal(1)
    except InvalidOperation:
        raise ScenarioError(f"{where}: expected numbers in start:stop:step") from None
    if step <= 0 or stop < start:
        raise ScenarioError(f"{where}: empty range (expected start <= stop and a step > 0)")
    n = int((stop - start) / step) + 1
    if n > MAX_POINTS:
        raise ScenarioError(f"{where}: {n} values, more than {MAX_POINTS}")
    return [_fmt_decimal(start + i * step) + unit for i in range(n)]


def _fmt_decimal(d: Decimal) -> str:
    text = format(d.normalize(), "f")
    return "0" if text in ("-0", "") else text


def parse_grid(specs: list[str] | tuple[str, ...]) -> list[Axis]:
    """``["policy.eviction=lru,h2o", "memory.l1_budget=10%:30%:10%"]`` -> axes, in order."""
    if not specs:
        raise ScenarioError("--grid: expected at least one key=v1,v2,... (or key=start:stop:step)")
    axes: list[Axis] = []
    for spec in specs:
        if "=" not in spec:
            raise ScenarioError(f"--grid {spec!r}: expected key=v1,v2,... or key=start:stop:step")
        key, raw = (t.strip() for t in spec.split("=", 1))
        if not key or any(not part for part in key.split(".")):
            raise ScenarioError(f"--grid {spec!r}: expected key=v1,v2,... or key=start:stop:step")
        if any(a.key == key for a in axes):
            raise ScenarioError(f"--grid {key}: given twice (put every value in one --grid)")
        values = expand_range(key, raw)
        if values is None:
            values = [v.strip() for v in raw.split(",")]
            if not raw.strip() or any(not v for v in values):
                raise ScenarioError(f"--grid {spec!r}: empty value (expected key=v1,v2,...)")
        if len(set(values)) != len(values):
            raise ScenarioError(f"--grid {key}: repeated value in {raw!r}")
        axes.append(Axis(key, tuple(values)))
    return axes


def grid_keys(kind: str) -> list[str]:
    """Every key a grid may name for a scenario of ``kind``: scenario fields, the workload's
    fields, and the profile's (prefixed ``profile.``)."""
    from .scenarios.schema import WORKLOADS, Scenario
    from .sim.profile import Profile
    keys = [k for k in field_paths(Scenario) if k != "workload"]
    keys += [f"workload.{k}" for k in field_paths(WORKLOADS[kind])]
    keys += [PROFILE_PREFIX + k for k in field_paths(Profile) if k not in ("name", "measured")]
    return keys


def check_keys(axes: list[Axis], kind: str) -> None:
    known = grid_keys(kind)
    for a in axes:
        if a.key in known:
            continue
        close = difflib.get_close_matches(a.key, known, n=1, cutoff=0.6)
        if not close:  # a typo in the last part only: match on it
            last = {k.rsplit(".", 1)[-1]: k for k in known}
            hit = difflib.get_close_matches(a.key.rsplit(".", 1)[-1], list(last), n=1, cutoff=0.6)
            close = [last[hit[0]]] if hit else []
        hint = f"; did you mean {close[0]!r}?" if close else " (see `synapse validate`)"
        raise ScenarioError(f"--grid {a.key}: not a field of the {kind} scenario or its "
                            f"profile{hint}")
