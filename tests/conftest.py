"""Shared fixtures: small scenarios that run in a fraction of a second."""

from __future__ import annotations

import pytest

# A needle scenario small enough for unit tests: 8k tokens, a small model shape.
SMALL_NEEDLE = [
    "workload.context_tokens=8192",
    "workload.decode_steps=64",
    "workload.prefill_chunk_tokens=512",
    "model.layers=4",
    "model.kv_heads=2",
    "model.head_dim=64",
]


@pytest.fixture
def small_needle():
    return list(SMALL_NEEDLE)


def run(name, overrides, backend="sim"):
    from synapse.runner import run_scenario
    from synapse.scenarios.loader import load_scenario
    return run_scenario(load_scenario(name, overrides), backend)
