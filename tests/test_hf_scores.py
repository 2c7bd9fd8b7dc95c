"""Attention masses per key for many queries at once (a prefill chunk) without holding
the logits: the two-pass fused computation equals the direct one (CPU flash attention's
log-sum-exp here; CUDA's memory-efficient kernel on the GPU)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from synapse.hf.scores import token_mass, token_mass_fused  # noqa: E402


@pytest.mark.parametrize("past,nq,groups", [(0, 24, 2), (40, 24, 2), (17, 9, 1), (33, 16, 4)])
def test_fused_masses_equal_direct_ones(past, nq, groups):
    g = torch.Generator().manual_seed(past + nq)
    hk, d = 2, 32
    q = torch.randn((1, hk * groups, nq, d), generator=g) * 2
    k = torch.randn((1, hk, past + nq, d), generator=g) * 2
    want = token_mass(q, k, d ** -0.5, past)
    got = token_mass_fused(q, k, d ** -0.5, past)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert abs(float(got.sum()) - 1.0) < 1e-4  # every query's row sums to one


def test_past_keys_in_pieces_give_the_same_masses(monkeypatch):
    import synapse.hf.scores as scores
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn((1, 4, 8, 16), generator=g), torch.randn((1, 2, 50, 16), generator=g)
    whole = token_mass_fused(q, k, 0.25, 42)
    monkeypatch.setattr(scores, "PAST_PIECE", 10)
    torch.testing.assert_close(token_mass_fused(q, k, 0.25, 42), whole, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
def test_fused_masses_on_cuda_equal_direct_ones_in_fp16():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device visible to torch")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn((1, 16, 512, 128), generator=g, device="cuda").half()
    k = torch.randn((1, 4, 2048, 128), generator=g, device="cuda").half()
    want = token_mass(q, k, 128 ** -0.5, 1536)
    got = token_mass_fused(q, k, 128 ** -0.5, 1536)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-6)
