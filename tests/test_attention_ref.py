"""The attention decode reference (synapse/hw/attention_ref.py): the spec of the CUDA kernel."""

from __future__ import annotations

import numpy as np
import pytest

from synapse.hw.attention_ref import (
    BlockRef,
    attention_decode_ref,
    block_mass,
    dense_attention,
    logsumexp,
)
from synapse.hw.kv_layout import KVLayout

LAYOUT = KVLayout(layers=2, kv_heads=3, head_dim=64, block_tokens=8, group_size=32)


def _blocks(rng, layout, n_valid, fmts):
    """Random blocks; returns (entries, the fp16 K/V each block really holds, dequantized)."""
    entries, tensors = [], []
    for nv, fmt in zip(n_valid, fmts):
        kv = rng.standard_normal(layout.shape).astype(np.float16)
        buf = layout.pack(kv, fmt)
        entries.append((buf, fmt, nv))
        tensors.append(layout.unpack(buf, fmt)[:nv].transpose(1, 2, 3, 0, 4))  # -> [2, L, H, nv, D]
    return entries, tensors


def _concat(tensors, layout):
    if not tensors:
        return np.zeros((2, layout.layers, layout.kv_heads, 0, layout.head_dim), np.float16)
    return np.concatenate(tensors, axis=3)


@pytest.mark.parametrize("fmts", [["fp16"] * 4, ["int4"] * 4, ["fp16", "int4", "int4", "fp16"]])
def test_blocks_equal_dense_attention_over_their_valid_tokens(fmts):
    rng = np.random.default_rng(len(fmts) + fmts.count("int4"))
    q = rng.standard_normal((2, 3, 64)).astype(np.float32)
    entries, tensors = _blocks(rng, LAYOUT, [8, 3, 0, 5], fmts)
    out, lse = attention_decode_ref(q, entries, LAYOUT, softmax_scale=0.125)
    kv = _concat(tensors, LAYOUT)
    assert out.dtype == np.float32 and out.shape == (2, 3, 64)
    assert lse.dtype == np.float32 and lse.shape == (2, 3, 4)
    np.testing.assert_allclose(out, dense_attention(q, kv[0], kv[1], 0.125), rtol=1e-6, atol=1e-6)


def test_block_lse_is_the_log_sum_of_each_blocks_scores():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 3, 64)).astype(np.float32)
    entries, tensors = _blocks(rng, LAYOUT, [8, 1, 0, 4], ["fp16", "int4", "fp16", "int4"])
    _, lse = attention_decode_ref(q, entries, LAYOUT, softmax_scale=0.3)
    for b, kv in enumerate(tensors):
        scores = 0.3 * np.einsum("lhd,lhtd->lht", q.astype(np.float64), kv[0].astype(np.float64))
        expected = np.log(np.exp(scores).sum(axis=-1)) if kv.shape[3] else np.full((2, 3), -np.inf)
        np.testing.assert_allclose(lse[:, :, b], expected, rtol=1e-6)
    assert np.isneginf(lse[:, :, 2]).all()


def test_block_mass_is_each_blocks_share_of_the_softmax():
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 3, 64)).astype(np.float32)
    entries, tensors = _blocks(rng, LAYOUT, [8, 2, 0, 6], ["fp16"] * 4)
    _, lse = attention_decode_ref(q, entries, LAYOUT, softmax_scale=0.125)
    kv = _concat(tensors, LAYOUT)
    scores = 0.125 * np.einsum("lhd,lhtd->lht", q.astype(np.float64), kv[0].astype(np.float64))
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    edges = np.cumsum([0, 8, 2, 0, 6])
    expected = np.stack([p[..., a:b].sum(-1) for a, b in zip(edges[:-1], edges[1:])], axis=-1)
    mass = block_mass(lse)
    np.testing.assert_allclose(mass, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mass.sum(-1), 1.0, rtol=1e-6)


def test_block_order_does_not_matter():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 3, 64)).astype(np.float32)
    entries, _ = _blocks(rng, LAYOUT, [8, 5, 2], ["fp16", "int4", "fp16"])
    out, lse = attention_decode_ref(q, entries, LAYOUT, 0.125)
    out_r, lse_r = attention_decode_ref(q, entries[::-1], LAYOUT, 0.125)
    np.testing.assert_allclose(out_r, out, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(lse_r, lse[:, :, ::-1])


def test_no_valid_token_gives_zero_output_and_minus_inf_lse():
    rng = np.random.default_rng(10)
    q = rng.standard_normal((2, 3, 64)).astype(np.float32)
    entries, _ = _blocks(rng, LAYOUT, [0, 0], ["fp16", "int4"])
    out, lse = attention_decode_ref(q, entries, LAYOUT, 0.125)
    assert not out.any() and np.isneginf(lse).all()
    out, lse = attention_decode_ref(q, [], LAYOUT, 0.125)
    assert not out.any() and lse.shape == (2, 3, 0)


def test_a_needle_key_takes_the_attention():
    """One key aligned with the query, a large scale: the output is that token's value."""
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 3, 64)).astype(np.float32)
    kv = (0.01 * rng.standard_normal(LAYOUT.shape)).astype(np.float16)
    kv[5, 0] = q.astype(np.float16)  # token 5's K
    blocks = [BlockRef(LAYOUT.pack(kv, "fp16"), "fp16", 8)]
    out, _ = attention_decode_ref(q, blocks, LAYOUT, softmax_scale=1.0)
    np.testing.assert_allclose(out, kv[5, 1].astype(np.float32), atol=1e-6)


def test_int4_blocks_stay_close_to_fp16():
    """Sanity only: on unit Gaussians INT4 (G=32) errs by ~9% of sigma per element
    (step ~ range/15 ~ 0.3, RMSE = step/sqrt(12)), and the output error is of that order."""
    rng = np.random.default_rng(12)
    q = rng.standard_normal((2, 3, 64)).astype(np.float32)
    kv = [rng.standard_normal(LAYOUT.shape).astype(np.float16) for _ in range(3)]
    fp16 = [(LAYOUT.pack(x, "fp16"), "fp16", 8) for x in kv]
    int4 = [(LAYOUT.pack(x, "int4"), "int4", 8) for x in kv]
    out16, _ = attention_decode_ref(q, fp16, LAYOUT, 0.125)
    out4, _ = attention_decode_ref(q, int4, LAYOUT, 0.125)
    assert np.linalg.norm(out4 - out16) / np.linalg.norm(out16) < 0.2


def test_dense_attention_defaults_to_one_over_sqrt_d():
    rng = np.random.default_rng(13)
    q = rng.standard_normal((1, 2, 64)).astype(np.float32)
    k = rng.standard_normal((1, 2, 10, 64))
    v = rng.standard_normal((1, 2, 10, 64))
    np.testing.assert_array_equal(dense_attention(q, k, v), dense_attention(q, k, v, 0.125))


def test_logsumexp_handles_minus_inf_and_empty():
    x = np.array([[0.0, np.log(3.0)], [-np.inf, -np.inf]])
    np.testing.assert_allclose(logsumexp(x), [np.log(4.0), -np.inf])
    assert logsumexp(np.zeros((2, 0))).shape == (2,)


def test_bad_inputs_are_refused():
    rng = np.random.default_rng(14)
    q = rng.standard_normal((2, 3, 64)).astype(np.float32)
    entries, _ = _blocks(rng, LAYOUT, [8], ["fp16"])
    buf = entries[0][0]
    with pytest.raises(ValueError, match="n_valid"):
        attention_decode_ref(q, [(buf, "fp16", 9)], LAYOUT, 0.125)
    with pytest.raises(ValueError, match="shape"):
        attention_decode_ref(q[:1], entries, LAYOUT, 0.125)
    with pytest.raises(ValueError, match="KV format"):
        attention_decode_ref(q, [(buf, "bf16", 8)], LAYOUT, 0.125)
    with pytest.raises(ValueError, match="bytes"):
        attention_decode_ref(q, [(buf, "int4", 8)], LAYOUT, 0.125)
