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


@pytest.mark.cuda
def test_on_cuda_a_chunked_h2o_prefill_scores_with_the_attentions_lse(monkeypatch):
    """fp16 on CUDA, chunks of 64: pass 1 from the chunk attention, pass 2 on the bias;
    the per-layer masses within fp16 rounding of token_mass's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: the fused score kernels run there")
    model = tiny_model("qwen2").to("cuda", torch.float16)

    def go():
        ids = torch.randint(3, VOCAB, (1, 256), generator=torch.Generator().manual_seed(0))
        cache = TieredCache(model.config, policy="h2o", l1_budget_tokens=128, demote="int4",
                            block_tokens=16, model=model, backend="cuda", record_masses=True)
        with torch.no_grad():
            model.generate(ids.cuda(), max_new_tokens=2, do_sample=False,
                           past_key_values=cache, prefill_chunk_size=64)
        return cache
    scores.used.clear()
    fused = go()
    assert {"row lse given", "bias"} <= scores.used, scores.used
    monkeypatch.setattr(scores, "FUSED_DEVICES", set())  # the direct q.K^T
    direct = go()
    # the first two chunks (the second scored with the attention's lse): later chunks'
    # keys depend on what the policy demoted to INT4, which a near-tie may change
    for a, b in zip(fused.layer_masses[:2], direct.layer_masses[:2]):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-5)
