"""Synapse's INT4 format in torch, on any device: the same bits as ``synapse.hw.int4``.

Device: the input's (CPU or CUDA). Input: float16, bfloat16 or float32, last dimension a
multiple of the group size ``G``; groups are ``G`` consecutive elements in C order, so
for KV ``[batch, heads, tokens, head_dim]`` they run along ``head_dim``.

Per group, in float32: ``zero = min``, ``scale = (max - min) / 15``, both stored rounded
to float16 and used rounded; ``q = clip(round_half_even((x - zero) / scale), 0, 15)``
(``q = 0`` where the scale is 0); element ``2i`` in the low nibble of byte ``i``.
Dequantization: ``zero + q * scale`` in float32 (product rounded, then sum), cast to the
output dtype. ``tests/test_hf_cache.py`` checks packed bytes, scales and zeros bit for bit
against the NumPy reference. bfloat16 input is widened to float32 first (exact), so its
codes are those the reference gives for the same float32 values.

Per-channel rows (``quantize_channel_rows``, the key format ``"channel"``): a row is
``[T, C]`` (a KV plane ``[BT, H, D]`` with ``C = H * D``), one group per column over its
``T`` tokens, the same rounding, bytes ``[codes T*C/2 in C order][scales C][zeros C]``
(``synapse.hw.int4``'s per-channel layout, bit for bit). A *layer row* is one layer's
keys row then its values row (``quantize_layer_rows``): the INT4 unit of
``synapse.kv.torch_backend`` and the read-through of ``synapse.hf.TieredCache``.

Error bound: every element is within ``scale / 2`` of its reconstruction (before the
final cast), i.e. within ``(max - min) / 30`` of its group's range; see docs/hf.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LEVELS = 15


@dataclass
class QTensor:
    """Packed codes [..., n/2] uint8 plus per-group float16 scales and zeros [..., n/G],
    all three views of one contiguous uint8 buffer ``buf`` (codes, then scales, then
    zeros), so a move between tiers is one copy, not three."""

    buf: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    group_size: int

    @property
    def _sizes(self) -> tuple[int, int]:
        n = math.prod(self.shape)
        return n // 2, n // self.group_size

    @property
    def packed(self) -> torch.Tensor:
        a, _ = self._sizes
        return self.buf[:a].view(*self.shape[:-1], -1)

    @property
    def scales(self) -> torch.Tensor:
        a, g = self._sizes
        return self.buf[a:a + 2 * g].view(torch.float16).view(*self.shape[:-1], -1)

    @property
    def zeros(self) -> torch.Tensor:
        a, g = self._sizes
        return self.buf[a + 2 * g:].view(torch.float16).view(*self.shape[:-1], -1)

    @property
    def nbytes(self) -> int:
        return self.buf.numel()


def quantize(x: torch.Tensor, group_size: int) -> QTensor:
    if x.shape[-1] % group_size:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of group_size {group_size}")
    buf = quantize_rows(x.reshape(1, -1), group_size).reshape(-1)
    return QTensor(buf, tuple(x.shape), x.dtype, group_size)


def _quantize_groups(g: torch.Tensor):
    """float32 ``g`` with its groups along dim 1 -> (uint8 codes like ``g``, fp16 scales,
    fp16 zeros, the latter without dim 1): the rounding rules of the module docstring."""
    mn = g.amin(dim=1, keepdim=True) + 0.0
    mx = g.amax(dim=1, keepdim=True) + 0.0
    # A CUDA tensor divided by a Python scalar is multiplied by the scalar's reciprocal
    # (torch's div_true_kernel_cuda), which rounds differently from the division now and
    # then: on the H200 one per-channel key scale in ~100 (2026-12-02, eighth session).
    # A divisor on the input's device takes the IEEE division, the definition above.
    scales = ((mx - mn) / torch.full((), LEVELS, dtype=torch.float32, device=g.device)).to(torch.float16)
    zeros = mn.to(torch.float16)
    sf = scales.to(torch.float32)
    zf = zeros.to(torch.float32)
    flat = sf == 0
    ratio = (g - zf) / torch.where(flat, torch.ones_like(sf), sf)
    q = torch.clamp(torch.round(ratio), 0, LEVELS)
    q = torch.where(flat, torch.zeros_like(q), q).to(torch.uint8)
    return q, scales.squeeze(1), zeros.squeeze(1)


def _pack(q: torch.Tensor, rows: int) -> torch.Tensor:
    pairs = q.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).reshape(rows, -1)


def quantize_rows(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rows of ``x`` [rows, n] -> uint8 [rows, n/2 + 4n/G]: each row one INT4 buffer
    (packed codes, then scales, then zeros), all rows in one pass."""
    rows, n = x.shape
    if n % group_size:
        raise ValueError(f"row length {n} is not a multiple of group_size {group_size}")
    q, scales, zeros = _quantize_groups(x.reshape(-1, group_size).to(torch.float32))
    return torch.cat((_pack(q, rows), scales.reshape(rows, -1).view(torch.uint8),
                      zeros.reshape(rows, -1).view(torch.uint8)), dim=1)


def quantize_channel_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [rows, T, C] -> uint8 [rows, T*C/2 + 4C]: each row quantized with one
    group per channel (column) over its T tokens, all rows in one pass."""
    rows, tokens, channels = x.shape
    if (tokens * channels) % 2:
        raise ValueError(f"a per-channel row of {tokens} x {channels} has an odd element count")
    q, scales, zeros = _quantize_groups(x.to(torch.float32))
    return torch.cat((_pack(q, rows), scales.view(torch.uint8), zeros.view(torch.uint8)), dim=1)


def key_row_bytes(tokens: int, channels: int, keys: str, group_size: int) -> int:
    """Bytes of one key row of ``tokens x channels`` in the key format ``keys``."""
    n = tokens * channels
    return n // 2 + (4 * channels if keys == "channel" else 4 * n // group_size)


def quantize_layer_rows(k: torch.Tensor, v: torch.Tensor, keys: str, group_size: int) -> torch.Tensor:
    """Keys and values [rows, T, C] -> uint8 layer rows [rows, key row + value row]: keys
    per channel (``keys="channel"``) or per token, values per token."""
    rows = k.shape[0]
    kq = quantize_channel_rows(k) if keys == "channel" else quantize_rows(k.reshape(rows, -1), group_size)
    return torch.cat((kq, quantize_rows(v.reshape(rows, -1), group_size)), dim=1)


def _decode(buf: torch.Tensor, n: int, group_size: int) -> torch.Tensor:
    """Rows of ``buf`` (each one QTensor's bytes for ``n`` elements) -> float32 [rows, n]."""
    a, g = n // 2, n // group_size
    rows = buf.shape[0]
    p = buf[:, :a]
    codes = torch.stack((p & 0x0F, p >> 4), dim=-1).reshape(rows, g, group_size).to(torch.float32)
    sf = buf[:, a:a + 2 * g].contiguous().view(torch.float16).to(torch.float32)[..., None]
    zf = buf[:, a + 2 * g:].contiguous().view(torch.float16).to(torch.float32)[..., None]
    return (zf + codes * sf).reshape(rows, n)


def _decode_channels(buf: torch.Tensor, tokens: int, channels: int) -> torch.Tensor:
    """Rows of per-channel INT4 bytes -> float32 [rows, tokens * channels]."""
    a, c = tokens * channels // 2, channels
    rows = buf.shape[0]
    p = buf[:, :a]
    codes = torch.stack((p & 0x0F, p >> 4), dim=-1).reshape(rows, tokens, c).to(torch.float32)
    sf = buf[:, a:a + 2 * c].contiguous().view(torch.float16).to(torch.float32)[:, None, :]
    zf = buf[:, a + 2 * c:a + 4 * c].contiguous().view(torch.float16).to(torch.float32)[:, None, :]
    return (zf + codes * sf).reshape(rows, -1)


def dequantize_channel_rows(buf: torch.Tensor, tokens: int, channels: int,
                            dtype: torch.dtype) -> torch.Tensor:
    """``quantize_channel_rows``' inverse: uint8 [rows, bytes] -> ``dtype`` [rows, T*C]."""
    return _decode_channels(buf, tokens, channels).to(dtype)


def dequantize_layer_rows(buf: torch.Tensor, tokens: int, channels: int, keys: str,
                          group_size: int, dtype: torch.dtype):
    """``quantize_layer_rows``' inverse: uint8 [rows, bytes] -> (keys, values), each
    ``dtype`` [rows, T*C]."""
    kb = key_row_bytes(tokens, channels, keys, group_size)
    n = tokens * channels
    k = _decode_channels(buf[:, :kb], tokens, channels) if keys == "channel" \
        else _decode(buf[:, :kb], n, group_size)
    return k.to(dtype), _decode(buf[:, kb:], n, group_size).to(dtype)


def layer_row_sections(buf: torch.Tensor, tokens: int, channels: int, keys: str,
                       group_size: int) -> dict:
    """The fp16 scales and zeros of layer rows [rows, bytes], flattened over the rows:
    ``key_scales``, ``key_zeros``, ``value_scales``, ``value_zeros`` (for audits and the
    error bound's test)."""
    n = tokens * channels
    kb = key_row_bytes(tokens, channels, keys, group_size)
    kg = channels if keys == "channel" else n // group_size
    vg = n // group_size

    def half(lo, count):
        return buf[:, lo:lo + 2 * count].contiguous().view(torch.float16).reshape(-1)
    return {"key_scales": half(n // 2, kg), "key_zeros": half(n // 2 + 2 * kg, kg),
            "value_scales": half(kb + n // 2, vg), "value_zeros": half(kb + n // 2 + 2 * vg, vg)}


def dequantize_rows(buf: torch.Tensor, n: int, group_size: int, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``quantize_rows``' inverse: uint8 [rows, bytes] -> ``dtype`` [rows, n] (into ``out``
    when given, which saves a copy)."""
    x = _decode(buf, n, group_size)
    if out is None:
        return x.to(dtype)
    out.copy_(x.view(out.shape))
    return out


def dequantize(t: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    n = math.prod(t.shape)
    return _decode(t.buf.reshape(1, -1), n, t.group_size).reshape(t.shape).to(dtype or t.dtype)
