"""Attention masses per key for many queries at once (a prefill chunk) without holding
the logits: the two-pass fused computation equals the direct one (CPU flash attention's
log-sum-exp here; CUDA's memory-efficient kernel on the GPU)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from synapse.hf.scores import DecodeScores, token_mass, token_mass_fused  # noqa: E402


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


def decode_inputs(layers, n, dtype, device="cpu", hk=4, groups=4, d=64, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    qs = [torch.randn((1, hk * groups, 1, d), generator=g, device=device).to(dtype)
          for _ in range(layers)]
    # token-major keys seen head-major, as TieredCache's planes are
    ks = [torch.randn((1, n, hk, d), generator=g, device=device).to(dtype).permute(0, 2, 1, 3)
          for _ in range(layers)]
    return qs, ks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("max_bytes", [1 << 30, 1])  # every layer at once; one at a time
def test_a_decode_steps_masses_batched_over_layers_are_token_masss_bits(dtype, max_bytes):
    qs, ks = decode_inputs(5, 300, dtype)
    scores = DecodeScores(5, max_bytes=max_bytes)
    for layer, (q, k) in enumerate(zip(qs, ks)):
        assert scores.add(layer, q, k, 0.125)
    got = scores.finish()
    assert len(got) == 5
    for tok, q, k in zip(got, qs, ks):
        assert torch.equal(tok, token_mass(q, k, 0.125, 299))
    assert scores.finish() == []  # the step's buffer is let go


def test_decode_scores_refuse_what_they_cannot_batch():
    """A layer out of order, or with another scaling or key count than layer 0's, is
    left to its caller (who scores it alone); what was added stays right."""
    qs, ks = decode_inputs(3, 40, torch.float32)
    scores = DecodeScores(3)
    assert not scores.add(1, qs[1], ks[1], 0.125)          # layer 0 first
    assert scores.add(0, qs[0], ks[0], 0.125)
    assert not scores.add(1, qs[1], ks[1], 0.25)           # another scaling
    assert not scores.add(1, qs[1], ks[1][:, :, :39], 0.125)  # another key count
    got = scores.finish()
    assert len(got) == 1 and torch.equal(got[0], token_mass(qs[0], ks[0], 0.125, 39))


@pytest.mark.cuda
def test_decode_scores_on_cuda_equal_token_mass_in_fp16():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device visible to torch")
    qs, ks = decode_inputs(16, 4096, torch.float16, "cuda", d=128)
    scores = DecodeScores(16, max_bytes=8 << 20)  # a few layers a piece
    for layer, (q, k) in enumerate(zip(qs, ks)):
        assert scores.add(layer, q, k, 128 ** -0.5)
    for tok, q, k in zip(scores.finish(), qs, ks):
        torch.testing.assert_close(tok, token_mass(q, k, 128 ** -0.5, 4095), rtol=1e-5, atol=1e-9)
