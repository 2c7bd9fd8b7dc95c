"""NumPy reference of the attention decode step over a list of KV blocks.

Device: host (NumPy); accumulation in float64. Same semantics as the CUDA kernel
(``cuda/attention_decode.cu``), which is checked against this module.

Inputs:

* ``q``: float32 ``[L, H, D]``, one query vector per layer and KV head (no grouped-query
  fan-out: a caller with more query heads than KV heads calls once per query group);
* ``blocks``: a sequence of ``(buf, fmt, n_valid)`` (or ``BlockRef``): ``buf`` a uint8
  block buffer in the ``KVLayout`` byte layout, ``fmt`` 'fp16'/'int4' (or code 0/1),
  ``n_valid`` the number of leading tokens of the block that count (0..block_tokens);
* ``softmax_scale``: multiplies every dot product (usually ``1/sqrt(D)``).

For every layer ``l`` and head ``h`` independently, over every valid token ``i`` of every
block (K = ``[i, 0, l, h, :]``, V = ``[i, 1, l, h, :]``; an int4 block is first dequantized
to float16 exactly as ``int4.unpack_from`` does):

* ``s_i = softmax_scale * (q[l, h] . k_i)``, ``p = softmax(s)`` over all those tokens,
* ``out[l, h, :] = sum_i p_i v_i`` (float32 result),
* ``block_lse[l, h, b] = log(sum_{i in block b} exp(s_i))`` (float32; ``-inf`` for a block
  with no valid token), so ``exp(block_lse[..., b] - logsumexp(block_lse))`` is block b's
  exact share of the attention mass.

With no valid token at all, ``out`` is 0 and every ``block_lse`` is ``-inf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from synapse.hw.kv_layout import KVLayout, format_code


@dataclass(frozen=True)
class BlockRef:
    """One entry of the block table: a block buffer, its format and its valid token count."""

    buf: np.ndarray
    fmt: int | str
    n_valid: int


def _as_block(entry, layout: KVLayout) -> BlockRef:
    block = entry if isinstance(entry, BlockRef) else BlockRef(*entry)
    n_valid = block.n_valid
    if not isinstance(n_valid, (int, np.integer)) or not 0 <= n_valid <= layout.block_tokens:
        raise ValueError(
            f"n_valid must be an integer in [0, {layout.block_tokens}], got {n_valid!r}"
        )
    return BlockRef(block.buf, format_code(block.fmt), int(n_valid))


def _check_q(q, layers: int, heads: int, head_dim: int) -> np.ndarray:
    arr = np.asarray(q)
    if arr.shape != (layers, heads, head_dim):
        raise ValueError(f"q has shape {arr.shape}, expected {(layers, heads, head_dim)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"q must be a float array, got {arr.dtype}")
    # the kernel reads q as float32: round to it first so both see the same query
    return arr.astype(np.float32).astype(np.float64)


def _attend(q64: np.ndarray, k64: np.ndarray, v64: np.ndarray, softmax_scale: float):
    """float64 scores [L,H,T] and output [L,H,D] for q [L,H,D], K/V [L,H,T,D]."""
    scores = softmax_scale * np.einsum("lhd,lhtd->lht", q64, k64)
    if scores.shape[-1] == 0:
        return scores, np.zeros(q64.shape, dtype=np.float64)
    m = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - m)
    out = np.einsum("lht,lhtd->lhd", p, v64) / p.sum(axis=-1)[..., None]
    return scores, out


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(x))) along ``axis``; ``-inf`` where every entry is ``-inf`` (or none)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[axis] == 0:
        return np.full(np.delete(x.shape, axis % x.ndim), -np.inf)
    m = np.max(x, axis=axis, keepdims=True)
    safe_m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        s = np.log(np.sum(np.exp(x - safe_m), axis=axis, keepdims=True)) + safe_m
    return np.squeeze(s, axis=axis)


def attention_decode_ref(
    q, blocks: Sequence, layout: KVLayout, softmax_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Decode-step attention over KV blocks: returns (out float32 [L,H,D], block_lse float32 [L,H,nb])."""
    L, H, D = layout.layers, layout.kv_heads, layout.head_dim
    q64 = _check_q(q, L, H, D)
    refs = [_as_block(b, layout) for b in blocks]
    keys, values, lse = [], [], np.full((L, H, len(refs)), -np.inf)
    for b, ref in enumerate(refs):
        # token-major [BT, 2, L, H, D] -> [2, L, H, tokens, D]
        kv = layout.unpack(ref.buf, ref.fmt)[: ref.n_valid].transpose(1, 2, 3, 0, 4).astype(np.float64)
        keys.append(kv[0])
        values.append(kv[1])
        if ref.n_valid:
            s_b = softmax_scale * np.einsum("lhd,lhtd->lht", q64, kv[0])
            lse[:, :, b] = logsumexp(s_b, axis=-1)
    empty = np.zeros((L, H, 0, D))
    k64 = np.concatenate(keys, axis=2) if keys else empty
    v64 = np.concatenate(values, axis=2) if values else empty
    _, out = _attend(q64, k64, v64, float(softmax_scale))
    return out.astype(np.float32), lse.astype(np.float32)


def dense_attention(q, K, V, softmax_scale: float | None = None) -> np.ndarray:
    """Full-cache reference: q [L,H,D], K and V [L,H,T,D] (any float dtype) -> out float32 [L,H,D].

    ``softmax_scale`` defaults to ``1/sqrt(D)``. With ``T == 0`` the output is 0.
    """
    k = np.asarray(K)
    v = np.asarray(V)
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"K and V must both be [L,H,T,D], got {k.shape} and {v.shape}")
    L, H, _, D = k.shape
    q64 = _check_q(q, L, H, D)
    scale = 1.0 / np.sqrt(D) if softmax_scale is None else float(softmax_scale)
    _, out = _attend(q64, k.astype(np.float64), v.astype(np.float64), scale)
    return out.astype(np.float32)


def block_mass(block_lse) -> np.ndarray:
    """Each block's share of the attention mass [L,H,nb] (rows sum to 1; 0 where no token)."""
    lse = np.asarray(block_lse, dtype=np.float64)
    total = logsumexp(lse, axis=-1)[..., None]
    safe_total = np.where(np.isfinite(total), total, 0.0)
    return np.where(np.isfinite(total), np.exp(lse - safe_total), 0.0)
