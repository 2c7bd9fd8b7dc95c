"""Attention masses per key for many queries at once (a prefill chunk) without holding
the logits: the two-pass fused computation equals the direct one (CPU flash attention's
log-sum-exp here; CUDA's memory-efficient kernel on the GPU)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import synapse.hf.scores as scores  # noqa: E402
from synapse.hf.prefix_attention import split_attention  # noqa: E402
from synapse.hf.scores import DecodeScores, row_lse, token_mass, token_mass_fused  # noqa: E402


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


@pytest.mark.parametrize("past,nq,groups", [(0, 21, 2), (40, 13, 4), (64, 8, 1)])
def test_pass_two_pads_the_queries_to_the_bias_alignment(past, nq, groups):
    """Chunks of any length: the reversed queries are padded to a multiple of 8 with a
    bias of -inf, which no key sees."""
    g = torch.Generator().manual_seed(7 + nq)
    q = torch.randn((1, 2 * groups, nq, 16), generator=g)
    k = torch.randn((1, 2, past + nq, 16), generator=g)
    torch.testing.assert_close(token_mass_fused(q, k, 0.3, past), token_mass(q, k, 0.3, past),
                               rtol=1e-4, atol=1e-6)


def test_the_attentions_row_normalisers_are_pass_ones():
    """split_attention's log-sum-exp (the model's chunk attention) is row_lse over the
    same keys, and handed in it gives the masses token_mass gives."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn((1, 8, 24, 32), generator=g)
    k, v = torch.randn((1, 2, 64, 32), generator=g), torch.randn((1, 2, 64, 32), generator=g)
    _, lse = split_attention(q, k, v, 40, 32 ** -0.5, with_lse=True)
    torch.testing.assert_close(lse, row_lse(q, k, 32 ** -0.5, 40), rtol=1e-5, atol=1e-5)
    got = token_mass_fused(q, k, 32 ** -0.5, 40, rows=lse)
    torch.testing.assert_close(got, token_mass(q, k, 32 ** -0.5, 40), rtol=1e-4, atol=1e-6)


def test_the_bias_rounding_is_carried_by_the_values():
    """In a half dtype the bias -lse_i is rounded (an error of up to 2^-11 |lse_i| on
    every row); the values carry exp of what was dropped, so the masses keep float32
    precision. bf16 keeps 8 bits: the bias alone misses these by up to 10%."""
    g = torch.Generator().manual_seed(5)
    q = (torch.randn((1, 4, 32, 64), generator=g) * 3).bfloat16()
    k = (torch.randn((1, 2, 96, 64), generator=g) * 3).bfloat16()
    want = token_mass(q.float(), k.float(), 0.125, 64)
    torch.testing.assert_close(token_mass_fused(q, k, 0.125, 64), want, rtol=1e-3, atol=1e-7)


def test_the_widened_fallback_gives_the_same_masses(monkeypatch):
    """Where the kernel refuses the bias, the vectors are widened (the former pass 2)."""
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn((1, 4, 16, 32), generator=g), torch.randn((1, 2, 48, 32), generator=g)
    want = token_mass(q, k, 0.2, 32)
    monkeypatch.setattr(scores, "_BIAS_REFUSED", {k.device})
    scores.used.clear()
    torch.testing.assert_close(token_mass_fused(q, k, 0.2, 32), want, rtol=1e-4, atol=1e-6)
    assert scores.used == {"widened"}


def _cuda_inputs(past, nq, hk=4, groups=4, d=128, seed=0):
    """Realistic prefill-chunk inputs, as the cache has them: queries [1, Hq, Q, D] as the
    rotary embedding returns them (a transposed view), keys a view of token-major planes."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn((1, nq, hk * groups, d), generator=g, device="cuda").half().transpose(1, 2)
    k = torch.randn((1, past + nq, hk, d), generator=g, device="cuda").half().transpose(1, 2)
    return q, k


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


@pytest.mark.cuda
@pytest.mark.parametrize("past,nq", [(4096, 2048), (8192, 4096), (6000, 3001)])
def test_bias_pass_on_cuda_equals_token_mass_at_prefill_shapes(past, nq):
    """4 KV heads x 4 query heads per group, head_dim 128, fp16: the bias pass (and with
    the attention's row normalisers handed in) equals token_mass; the fallback agrees."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device visible to torch")
    q, k = _cuda_inputs(past, nq)
    s = 128 ** -0.5
    want = token_mass(q, k, s, past)
    scores.used.clear()
    got = token_mass_fused(q, k, s, past)
    assert "bias" in scores.used, f"the kernel refused the bias: {scores.used}"
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-6)
    v = torch.zeros_like(k)
    _, lse = split_attention(q, k, v, past, s, with_lse=True)
    torch.testing.assert_close(lse, row_lse(q, k, s, past), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(token_mass_fused(q, k, s, past, rows=lse), want,
                               rtol=2e-2, atol=2e-6)
    old = scores._token_mass_widened(q, k, s, past, row_lse(q, k, s, past))
    torch.testing.assert_close(got, old, rtol=2e-2, atol=2e-6)


@pytest.mark.cuda
def test_bias_pass_on_cuda_timing_against_the_widened_vectors(monkeypatch):
    """Not asserted: prints ms per call of the former path (pass 1 + widened pass 2) and
    the new (pass 2 on the bias, on each kernel that took it; and with pass 1 handed in,
    as a chunk after the first gets it), at the Qwen2 shape of a 32k prefill's third
    chunk: 8176 queries, 16352 past keys."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device visible to torch")
    q, k = _cuda_inputs(16352, 8176)
    s, past = 128 ** -0.5, 16352
    rows = row_lse(q, k, s, past)

    def ms(fn, n=5):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n
    scores.used.clear()
    token_mass_fused(q, k, s, past)  # the first call picks pass 2's kernels
    chosen = dict(scores._PASS2)
    old = ms(lambda: scores._token_mass_widened(q, k, s, past, row_lse(q, k, s, past)))
    p1 = ms(lambda: row_lse(q, k, s, past))
    line = [f"former {old:.2f} ms (pass 1 alone {p1:.2f} ms)"]
    for kernel in ("efficient", "cudnn"):
        if kernel == "cudnn" and "cudnn" not in chosen.values():
            line.append(f"cudnn not taken ({sorted(x for x in scores.used if 'cudnn' in x)})")
            continue
        monkeypatch.setattr(scores, "_PASS2", {key: kernel for key in chosen})
        new = ms(lambda: token_mass_fused(q, k, s, past))
        given = ms(lambda: token_mass_fused(q, k, s, past, rows=rows))
        line.append(f"bias on {kernel} {new:.2f} ms, with pass 1 handed in {given:.2f} ms")
    print(f"\nper layer call, 8176 queries over {past} past keys: " + "; ".join(line)
          + f"; chosen {chosen}")


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


@pytest.mark.parametrize("cudnn_right", [True, False])
def test_pass_two_takes_cudnn_only_where_it_agreed(cudnn_right, monkeypatch):
    """The kernel choice (CUDA's, played by CPU flash here): cuDNN serves pass 2 from the
    call after the one where its masses agreed with the memory-efficient kernel's."""
    calls = []

    def cudnn(*a):
        calls.append("cudnn")
        lse, out = scores._columns_cpu(*a)
        return (lse, out) if cudnn_right else (lse + 1, out)
    monkeypatch.setattr(scores, "_columns_cuda", scores._columns_cpu)
    monkeypatch.setattr(scores, "_columns_cudnn", cudnn)
    monkeypatch.setattr(scores, "_PASS2", {})
    g = torch.Generator().manual_seed(2)
    kq, qk = torch.randn((1, 2, 16, 8), generator=g), torch.randn((1, 2, 24, 8), generator=g)
    v, bias = torch.zeros((1, 2, 24, 8)), -torch.rand((1, 2, 24), generator=g)
    want = scores._columns_cpu(kq, qk, v, bias, False, 0.3)
    for _ in range(2):
        got = scores._columns_chosen(kq, qk, v, bias, False, 0.3)
        torch.testing.assert_close(got, want)
    assert scores._PASS2 == {(None, False): "cudnn" if cudnn_right else "efficient"}
    assert calls == (["cudnn"] * 2 if cudnn_right else ["cudnn"])


def test_a_padded_causal_pass_never_goes_to_cudnn(monkeypatch):
    """Causal and not square (a chunk padded to the bias alignment): the memory-efficient
    kernel, whatever was chosen for square ones."""
    monkeypatch.setattr(scores, "_columns_cuda", scores._columns_cpu)
    monkeypatch.setattr(scores, "_columns_cudnn",
                        lambda *a: (_ for _ in ()).throw(AssertionError("cuDNN called")))
    monkeypatch.setattr(scores, "_PASS2", {(None, True): "cudnn"})
    g = torch.Generator().manual_seed(4)
    kq, qk = torch.randn((1, 2, 13, 8), generator=g), torch.randn((1, 2, 16, 8), generator=g)
    v, bias = torch.zeros((1, 2, 16, 8)), -torch.rand((1, 2, 16), generator=g)
    got = scores._columns_chosen(kq, qk, v, bias, True, 0.3)
    torch.testing.assert_close(got, scores._columns_cpu(kq, qk, v, bias, True, 0.3))
