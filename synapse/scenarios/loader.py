"""Loading a scenario: defaults -> YAML file -> ``--set`` overrides, strictly checked.

A scenario is named by path (``scenarios/needle.yaml``) or by the name of one that ships
with Synapse (``needle``); with neither, the needle scenario is the default.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Sequence

from ..config import apply_overrides, build, load_yaml
from ..errors import ScenarioError
from .schema import KINDS, MAX_REQUESTS, WORKLOADS, Scenario

DEFAULT_SCENARIO = "needle"


def builtin_dir() -> Path:
    """The shipped scenarios: ``scenarios/`` in a checkout, ``synapse._scenarios`` installed."""
    try:
        p = Path(str(resources.files("synapse._scenarios")))
        if p.is_dir():
            return p
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "scenarios"


def builtin_scenarios() -> dict[str, Path]:
    d = builtin_dir()
    return {p.stem: p for p in sorted(d.glob("*.yaml"))} if d.is_dir() else {}


def resolve_path(name_or_path: str | None) -> Path:
    if name_or_path is None:
        name_or_path = DEFAULT_SCENARIO
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in name_or_path:
        return p
    shipped = builtin_scenarios()
    if name_or_path in shipped:
        return shipped[name_or_path]
    import difflib
    close = difflib.get_close_matches(name_or_path, shipped, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ScenarioError(f"{name_or_path}: no such file or shipped scenario{hint} "
                        f"(shipped: {', '.join(shipped)})")


def load_scenario(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> Scenario:
    path = resolve_path(name_or_path)
    source = str(path) + (" with --set" if overrides else "")
    data = apply_overrides(load_yaml(path), list(overrides))
    workload = data.pop("workload", None)
    if workload is not None and not isinstance(workload, dict):
        raise ScenarioError(f"{source}: workload: expected a mapping, got "
                            f"{type(workload).__name__}")
    if "kind" not in data and workload:
        _check_kind_given(workload, source)
    scenario = build(Scenario, data, source)
    if scenario.kind not in KINDS:  # the field check already refused it; keep mypy calm
        raise ScenarioError(f"{source}: kind: unknown kind {scenario.kind!r}")
    wl = build(WORKLOADS[scenario.kind], workload or {}, source, "workload")
    scenario = dataclasses.replace(scenario, workload=wl)
    _cross_checks(scenario, source)
    return scenario


def _check_kind_given(workload: dict, source: str) -> None:
    """Without ``kind`` a scenario is a needle one; if its workload's keys say otherwise,
    the missing ``kind`` is the error to report, not the keys the needle kind lacks."""
    default = next(f.default for f in dataclasses.fields(Scenario) if f.name == "kind")
    keys = {str(k) for k in workload}
    fits = [k for k, cls in WORKLOADS.items() if keys <= {f.name for f in dataclasses.fields(cls)}]
    if default in fits:
        return
    hint = f"; its workload's keys fit kind {' or '.join(map(repr, fits))}" if fits else ""
    raise ScenarioError(f"{source}: kind: missing (without it, the scenario is a {default} one), "
                        f"expected one of {', '.join(KINDS)}{hint}")


def _cross_checks(s: Scenario, source: str) -> None:
    if s.model.head_dim % s.memory.int4_group:
        raise ScenarioError(f"{source}: memory.int4_group: got {s.memory.int4_group}, expected a "
                            f"divisor of model.head_dim ({s.model.head_dim})")
    if s.memory.block_tokens % 4:
        raise ScenarioError(f"{source}: memory.block_tokens: got {s.memory.block_tokens}, expected "
                            f"a multiple of 4 (keeps INT4 sections 16-byte aligned)")
    if s.policy.low_watermark > s.policy.high_watermark:
        raise ScenarioError(f"{source}: policy.low_watermark: got {s.policy.low_watermark}, "
                            f"expected <= policy.high_watermark ({s.policy.high_watermark})")
    if s.kind == "needle":
        w = s.workload
        if w.noise_rank > s.model.head_dim - 3:
            raise ScenarioError(f"{source}: workload.noise_rank: got {w.noise_rank}, expected at "
                                f"most model.head_dim - 3 = {s.model.head_dim - 3} (a block's "
                                f"structured key, 3 + noise_rank numbers, is stored in its keys)")
        if w.prefill_chunk_tokens % s.memory.block_tokens:
            raise ScenarioError(f"{source}: workload.prefill_chunk_tokens: got "
                                f"{w.prefill_chunk_tokens}, expected a multiple of "
                                f"memory.block_tokens ({s.memory.block_tokens})")
        if not -w.decode_steps <= w.question_step < w.decode_steps:
            raise ScenarioError(f"{source}: workload.question_step: got {w.question_step}, "
                                f"expected a decode step in [-{w.decode_steps}, "
                                f"{w.decode_steps - 1}]")
    if s.kind in ("tsunami", "tenants") and s.policy.eviction not in ("lru", "fifo"):
        raise ScenarioError(f"{source}: policy.eviction: got {s.policy.eviction!r}, expected lru "
                            f"or fifo (the {s.kind} scenario evicts whole requests, which have "
                            f"no attention scores)")
    if s.kind == "tenants":
        names = [t.name for t in s.workload.tenants]
        if len(set(names)) != len(names):
            raise ScenarioError(f"{source}: workload.tenants: tenant names must be unique, got "
                                f"{names}")
        requests = sum(t.requests for t in s.workload.tenants)
        if requests > MAX_REQUESTS:
            raise ScenarioError(f"{source}: workload.tenants: {requests} requests in all, expected "
                                f"at most {MAX_REQUESTS} (each is Python state visited every step)")
        total = sum(t.share for t in s.workload.tenants)
        if total > 1.0 + 1e-9:
            raise ScenarioError(f"{source}: workload.tenants: shares add up to {total:.2f}, "
                                f"expected at most 1")
