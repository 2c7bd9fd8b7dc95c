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

Error bound: every element is within ``scale / 2`` of its reconstruction (before the
final cast), i.e. within ``(max - min) / 30`` of its group's range; see docs/hf.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LEVELS = 15


@dataclass
class QTensor:
    """Packed codes [..., n/2] uint8 plus per-group float16 scales and zeros [..., n/G]."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))

    def to(self, device, non_blocking: bool = False, pin: bool = False) -> "QTensor":
        parts = []
        for t in (self.packed, self.scales, self.zeros):
            if pin:
                dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                dst.copy_(t, non_blocking=non_blocking)
                parts.append(dst)
            else:
                parts.append(t.to(device, non_blocking=non_blocking))
        return QTensor(*parts, self.shape, self.dtype, self.group_size)

    def record_stream(self, stream) -> None:
        for t in (self.packed, self.scales, self.zeros):
            t.record_stream(stream)


def quantize(x: torch.Tensor, group_size: int) -> QTensor:
    if x.shape[-1] % group_size:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of group_size {group_size}")
    g = x.reshape(-1, group_size).to(torch.float32)
    mn = g.amin(dim=1) + 0.0
    mx = g.amax(dim=1) + 0.0
    scales = ((mx - mn) / LEVELS).to(torch.float16)
    zeros = mn.to(torch.float16)
    sf = scales.to(torch.float32)[:, None]
    zf = zeros.to(torch.float32)[:, None]
    flat = sf == 0
    ratio = (g - zf) / torch.where(flat, torch.ones_like(sf), sf)
    q = torch.clamp(torch.round(ratio), 0, LEVELS)
    q = torch.where(flat, torch.zeros_like(q), q).to(torch.uint8).reshape(-1, 2)
    packed = q[:, 0] | (q[:, 1] << 4)
    lead = tuple(x.shape[:-1])
    return QTensor(packed.reshape(*lead, -1), scales.reshape(*lead, -1), zeros.reshape(*lead, -1),
                   tuple(x.shape), x.dtype, group_size)


def dequantize(t: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    p = t.packed.reshape(-1)
    codes = torch.stack((p & 0x0F, p >> 4), dim=1).reshape(-1, t.group_size).to(torch.float32)
    sf = t.scales.reshape(-1, 1).to(torch.float32)
    zf = t.zeros.reshape(-1, 1).to(torch.float32)
    out = zf + codes * sf
    return out.reshape(t.shape).to(dtype or t.dtype)
