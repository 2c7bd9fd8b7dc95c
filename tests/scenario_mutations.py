"""Mutated scenarios, for the bad-input fuzz test and ``benchmarks/fuzz_inputs.py``.

A case starts from one of the four shipped scenarios, shrunk by the tiny overrides of
``synapse.scenarios.tiny`` (so an accepted case runs in a fraction of a second), and
breaks it the ways a user does: keys deleted or misspelt, values of another type,
non-finite and huge numbers, sizes with bad units, garbage bytes in the file, nesting
a thousand levels deep, and ``--set`` overrides carrying the same values.

``check_case`` is the contract both the test and the campaign hold every case to:
exit code 0 or 2, never a traceback, an error is one line; a scenario that is accepted
and estimated small enough to run here is run on the simulator and must finish within
its estimate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from hypothesis import strategies as st

from synapse.config import apply_overrides, field_paths
from synapse.scenarios.schema import WORKLOADS, Scenario
from synapse.scenarios.tiny import TINY_NEEDLE, TINY_STREAM, TINY_TENANTS, TINY_TSUNAMI

ROOT = Path(__file__).resolve().parents[1]
TINY = {"needle": TINY_NEEDLE, "streaming": TINY_STREAM, "tsunami": TINY_TSUNAMI,
        "tenants": TINY_TENANTS}
DEEP = "@@deep@@"  # placeholder a nested value replaces after dumping (the dumper recurses)

# Run an accepted case only when it is estimated to take at most this long here.
RUN_BELOW_S = 6.0


@dataclass(frozen=True)
class Case:
    scenario: str               # the shipped scenario it started from
    text: bytes                 # the scenario file as written
    sets: tuple[str, ...]       # --set arguments
    what: tuple[str, ...]       # the mutations, for a failure report

    def describe(self) -> str:
        return f"{self.scenario}: {'; '.join(self.what)}"


def base_data(name: str) -> dict:
    data = yaml.safe_load((ROOT / "scenarios" / f"{name}.yaml").read_text())
    return apply_overrides(data, TINY[name])


def _paths(node, prefix=()):
    """Every key path of a nested dict/list (list items by index)."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_paths(v, prefix + (k,)))
    return out


def _parent(data, path):
    node = data
    for k in path[:-1]:
        node = node[k]
    return node


# -- values -------------------------------------------------------------------------------
SPECIAL_NUMBERS = [0, -1, 1, 3, 7, 96, 256, 2**31, 2**63, 10**9, 10**12, 10**18, 10**100,
                   10**400, float("inf"), -float("inf"), float("nan"), 1e308, -1e308, 1e-320,
                   0.5, 1.5, 1e-9, 1e9, 1e15]
BAD_SIZES = ["1e400", "1e400GiB", "12 parsecs", "-5GiB", "0GiB", "120%", "0%", "%", "nan%",
             "inf%", "-inf%", "1e-9%", "5QiB", "1.5.5GiB", "0x10", "", " ", "8GiB", "16EiB",
             "1e30TiB", "9" * 50, "100%", "1KiB", "64 KiB", "1e308", "1.0e+308", ".inf",
             "1e-400", "2TB", "0.5B", "3.7KiB"]
TEXT_VALUES = ["lru", "h2o", "needle", "tenants", "yes", "null", "~", "[]", "{}", "\u00e9\u00e8",
               "a" * 300, "../../etc", "x/y", "\t", "true"]

numbers = st.one_of(st.integers(-10, 10**6), st.sampled_from(SPECIAL_NUMBERS),
                    st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(numbers, st.sampled_from(BAD_SIZES), st.sampled_from(TEXT_VALUES),
                    st.text(max_size=12), st.booleans(), st.none())
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.sampled_from(["a", "name", "share", "kind"]), scalars,
                                   max_size=2))
depths = st.one_of(st.integers(2, 40), st.sampled_from([100, 500, 1000, 3000]))


def nested_text(depth: int, flavour: str) -> str:
    if flavour == "list":
        return "[" * depth + "1" + "]" * depth
    return "{a: " * depth + "1" + "}" * depth


def value_text(v) -> str:
    """A value as ``--set`` text (parsed as YAML by the loader)."""
    if isinstance(v, str):
        return v
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def typo(key: str, i: int, how: int) -> str:
    if not key:
        return "x"
    i %= len(key)
    if how == 0:
        return key[:i] + key[i + 1:] or "x"
    if how == 1:
        return key[:i] + key[i] + key[i:]
    if how == 2 and len(key) > 1:
        j = (i + 1) % len(key)
        chars = list(key)
        chars[i], chars[j] = chars[j], chars[i]
        return "".join(chars)
    return key.upper() if key.upper() != key else key + "_"


def set_keys(name: str) -> list[str]:
    """Keys ``--set`` may name: every field of the scenario's schema, and a few that the
    file has only by index (tenants)."""
    kind = base_data(name)["kind"]
    keys = [k for k in field_paths(Scenario) if k != "workload"]
    keys += [f"workload.{k}" for k in field_paths(WORKLOADS[kind])]
    return sorted(keys)


# -- mutations ----------------------------------------------------------------------------
@st.composite
def cases(draw, scenarios=tuple(TINY), plausible: bool = False) -> Case:
    """A broken scenario; with ``plausible``, only numbers scaled by 1/8 to 8 (mostly
    valid, so the run-within-estimate half of the contract gets exercised)."""
    name = draw(st.sampled_from(scenarios))
    data = base_data(name)
    what: list[str] = []
    deep = None
    for _ in range(draw(st.integers(1 if plausible else 0, 3))):
        paths = _paths(data)
        if plausible:
            paths = [p for p in paths if isinstance(_parent(data, p)[p[-1]], (int, float))
                     and not isinstance(_parent(data, p)[p[-1]], bool)]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _parent(data, path), path[-1]
        op = "scale" if plausible else draw(st.sampled_from(
            ["delete", "typo", "value", "value", "deep", "scale", "scale", "scale"]))
        if op == "delete":
            if isinstance(parent, list):
                parent.pop(key)
            else:
                del parent[key]
            what.append(f"delete {'.'.join(map(str, path))}")
        elif op == "typo" and isinstance(parent, dict):
            new = typo(str(key), draw(st.integers(0, 30)), draw(st.integers(0, 3)))
            parent[new] = parent.pop(key)
            what.append(f"rename {'.'.join(map(str, path))} -> {new}")
        elif op == "scale" and isinstance(parent[key], (int, float)) \
                and not isinstance(parent[key], bool):
            # a plausible edit: most stay valid, so accepted scenarios get run too
            k = draw(st.integers(-3, 3))
            old = parent[key]
            parent[key] = type(old)(old * 2.0**k) if isinstance(old, float) else \
                max(0, old * 2**k if k >= 0 else old // 2**-k)
            what.append(f"{'.'.join(map(str, path))} {old!r} -> {parent[key]!r}")
        elif op == "deep" and deep is None:
            deep = nested_text(draw(depths), draw(st.sampled_from(["list", "dict"])))
            parent[key] = DEEP
            what.append(f"{'.'.join(map(str, path))} nested {deep[:12]}...")
        else:
            v = draw(values)
            parent[key] = v
            what.append(f"{'.'.join(map(str, path))} = {v!r:.60}")
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=10**6)
    if deep is not None:
        text = text.replace(repr(DEEP), deep).replace(DEEP, deep)
    raw = text.encode("utf-8")
    if plausible:
        return Case(name, raw, (), tuple(what))
    if draw(st.integers(0, 9)) == 0:  # garbage bytes somewhere in the file
        junk = draw(st.binary(min_size=1, max_size=8))
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + junk + raw[at:]
        what.append(f"bytes {junk!r} at {at}")
    sets = []
    keys = set_keys(name)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(keys))
        if draw(st.integers(0, 5)) == 0:
            key = typo(key, draw(st.integers(0, 40)), draw(st.integers(0, 3)))
        if draw(st.integers(0, 9)) == 0:
            val = nested_text(draw(depths), draw(st.sampled_from(["list", "dict"])))
        else:
            val = value_text(draw(values))
        sets.append(f"{key}={val}")
        what.append(f"--set {sets[-1][:60]}")
    return Case(name, raw, tuple(sets), tuple(what) or ("unchanged",))


# -- the contract -------------------------------------------------------------------------
@dataclass
class Verdict:
    stage: str            # validate | run
    exit_code: int
    output: str
    problem: str | None   # None: the case met the contract
    ran: bool = False
    estimate: object = None
    wall_s: float | None = None


def _problem(r) -> str | None:
    exc = r.exception
    if exc is not None and not isinstance(exc, SystemExit):
        return f"traceback: {type(exc).__name__}: {exc}"[:300]
    if "Traceback" in r.output:
        return "traceback in the output"
    if r.exit_code not in (0, 2):
        return f"exit code {r.exit_code}"
    if r.exit_code == 2:
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        if len(lines) != 1:
            return f"error of {len(lines)} lines"
        if not lines[0].startswith("error: "):
            return "error line does not start with 'error: '"
    return None


def check_case(case: Case, work: Path, run: bool = True, measure_memory: bool = False) -> Verdict:
    """Validate the case with the CLI; if accepted, estimate it and, when the estimate is
    small, run it on the simulator and hold the run to its estimate (steps, ops, wall time
    and, with ``measure_memory``, the tracemalloc peak against the host-memory estimate)."""
    import tracemalloc

    from click.testing import CliRunner

    from synapse.cli import main

    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{case.scenario}.yaml"
    path.write_bytes(case.text)
    sets = [a for s in case.sets for a in ("--set", s)]
    r = CliRunner().invoke(main, ["validate", str(path), *sets])
    v = Verdict("validate", r.exit_code, r.output, _problem(r))
    if v.problem or r.exit_code != 0 or not run:
        return v
    try:
        from synapse.scenarios.estimate import estimate_scenario
        from synapse.scenarios.loader import load_scenario
    except ImportError:  # before estimates existed: run every accepted case
        est = None
    else:
        est = estimate_scenario(load_scenario(str(path), list(case.sets)), "sim")
        v.estimate = est
        if est.seconds > RUN_BELOW_S:
            return v
    out = work / "out"
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["run", str(path), *sets, "-q", "--out", str(out)])
    v = Verdict("run", r.exit_code, r.output, _problem(r), ran=True, estimate=est,
                wall_s=time.perf_counter() - t0)
    peak = None
    if measure_memory and r.exit_code == 0:  # again, traced (tracemalloc slows a run)
        tracemalloc.start()
        try:
            CliRunner().invoke(main, ["run", str(path), *sets, "-q", "--out", str(work / "again")])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    if v.problem or r.exit_code != 0 or est is None:
        return v
    result = json.loads((out / "result.json").read_text())
    steps = len(result["timeline"].get("step", []))
    ops = len(json.loads((out / "ops.json").read_text())["kind"])
    if steps > est.steps:
        v.problem = f"ran {steps} steps, estimated at most {est.steps}"
    elif ops > est.ops:
        v.problem = f"ran {ops} ops, estimated at most {est.ops}"
    elif v.wall_s > est.seconds:
        v.problem = f"took {v.wall_s:.2f} s, estimated at most {est.seconds:.2f} s"
    elif peak is not None and peak > est.host_bytes:
        v.problem = f"peak of {peak / 2**20:.1f} MiB, estimated at most {est.host_bytes / 2**20:.1f} MiB"
    return v
