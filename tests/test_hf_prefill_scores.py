"""A TieredCache scores a prefill chunk's layer after that layer's attention: the policy
sees the same masses in the same order as when ``update`` scored it, and on the fused
path pass 1 comes from the chunk attention's own log-sum-exp (synapse.hf.chunk_attention)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import VOCAB, one_thread, tiny_model  # noqa: E402,F401 (fixture)

import synapse.hf.scores as scores  # noqa: E402
from synapse.hf import TieredCache  # noqa: E402


def prefill(model, demote="int4", chunk=16, tokens=80, seed=0, new=4):
    ids = torch.randint(3, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(seed))
    cache = TieredCache(model.config, policy="h2o", l1_budget_tokens=32, demote=demote,
                        block_tokens=8, model=model, record_masses=True)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, do_sample=False, past_key_values=cache,
                             prefill_chunk_size=chunk)
    return out, cache


@pytest.mark.parametrize("family,demote", [("llama", "int4"), ("qwen2", "l2"), ("llama", "drop")])
def test_scoring_after_the_attention_decides_as_scoring_in_update(family, demote, monkeypatch):
    model = tiny_model(family)
    after, ca = prefill(model, demote)
    monkeypatch.setattr(TieredCache, "_scores_after_attention", False)  # the former order
    before, cb = prefill(model, demote)
    assert ca.telemetry()["evictions"] > 0  # the policy chose, from these masses
    assert ca.decisions() == cb.decisions()
    assert torch.equal(after, before)
    assert len(ca.layer_masses) == len(cb.layer_masses) > 5
    for a, b in zip(ca.layer_masses, cb.layer_masses):
        assert np.array_equal(a, b)


def test_fused_scores_take_pass_one_from_the_chunk_attention(monkeypatch):
    """The fused path on the CPU (the arithmetic the GPU runs): every chunk after the first
    hands its rows' log-sum-exp to the cache, and the masses are token_mass's."""
    model = tiny_model("qwen2")
    _, direct = prefill(model)
    monkeypatch.setattr(scores, "FUSED_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(scores, "FUSED_FROM_QUERIES", 2)
    given = []
    take = TieredCache.attention_lse
    monkeypatch.setattr(TieredCache, "attention_lse",
                        lambda self, layer, lse: (given.append(layer), take(self, layer, lse)))
    scores.used.clear()
    _, fused = prefill(model)
    layers = model.config.num_hidden_layers
    assert given == list(range(layers)) * (80 // 16 - 1)  # chunks 2..5, every layer
    assert {"row lse given", "bias"} <= scores.used
    prefill_steps = 80 // 16
    for a, b in zip(fused.layer_masses[:prefill_steps], direct.layer_masses[:prefill_steps]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
