"""NumPy reference of Synapse's INT4 format: the spec every INT4 kernel is checked against.

Device: host (NumPy). Input dtype: float16 or float32 (any shape; flattened in C order).

Format, for ``n`` elements and a group size ``G`` in ``GROUP_SIZES`` (``n % G == 0``):

* per group of ``G`` consecutive elements, ``zero = min`` and ``scale = (max - min) / 15``
  are computed in float32 and stored **rounded to float16**; quantization uses those
  rounded values (converted back to float32), so host and device agree bit for bit:
  ``q = clip(rint((x - zero) / scale), 0, 15)``, and ``q = 0`` where the rounded scale is 0.
  ``rint`` rounds half to even (CUDA's ``__float2int_rn``). min and max are taken with
  ``+ 0.0`` added, so a ``-0.0`` minimum is stored as ``+0.0``.
* dequantization: ``x_hat = zero + q * scale`` in float32 (a product rounded, then a sum
  rounded: no fused multiply-add), then cast to the output dtype.
* packing: element ``2i`` in the low nibble and ``2i + 1`` in the high nibble of byte ``i``.
* byte layout of a quantized buffer, contiguous, in this order::

      [packed uint8, n/2 bytes][scales fp16, n/G values][zeros fp16, n/G values]

  so ``int4_nbytes(n, G) == n/2 + 4*n/G``. With ``G >= 32`` the scales section starts at a
  multiple of 16 bytes; the zeros section does too when ``(n/G) % 8 == 0``.

Values must be finite, and the per-group zero and scale must fit in float16 (always true
for float16 input); otherwise ``ValueError``.

**Per-channel rows** (the key format of KIVI, Liu et al. 2024, arXiv:2402.02750: keys
have a few channels of large magnitude, so a group along a channel shares one range
across tokens instead of mixing those channels into every token's groups). A row is a
``[T, C]`` array (``T`` tokens of ``C`` channels, C order: for a KV plane ``[BT, H, D]``,
``C = H * D``); group ``c`` is column ``c``, its ``T`` values strided by ``C``. Same
rounding as above per group (fp16 scale and zero, ``rint`` half to even, ``q = 0``
where the scale is 0, dequantization ``zero + q * scale`` without FMA), and::

      [packed uint8, T*C/2 bytes, codes in C order][scales fp16, C][zeros fp16, C]

so ``channel_nbytes(T, C) == T*C/2 + 4*C``: element ``(t, c)`` is nibble ``t*C + c``.
Alignment: with ``T % 4 == 0`` and ``C % 8 == 0`` (block_tokens a multiple of 4,
head_dim a multiple of 8) every section starts at a multiple of 16 bytes and so does the
row's end, and 8 consecutive codes of one token (one 32-bit word) have their 8 scales
and 8 zeros in one 16-byte load each.

Error bound (both layouts, per group): ``|x - x_hat| <= s/2 + 15*|s - s32|`` plus the
fp32 arithmetic and output rounding, plus ``2**-11 * |zero|`` for float32 input, where
``s`` is the stored fp16 scale and ``s32 = (max - min) / 15`` the exact step
(``element_error_bound``, ``channel_error_bound``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP_SIZES = (32, 64, 128)
LEVELS = 15  # largest code: 4 bits
# How the keys of a KV block are grouped: "channel" (one group per channel over a block's
# tokens, the values per token) or "token" (keys and values in groups along head_dim).
KEY_FORMATS = ("channel", "token")
DEFAULT_KEY_FORMAT = "channel"


@dataclass(frozen=True)
class Int4Tensor:
    """A quantized tensor: packed codes plus per-group fp16 scales and zeros."""

    packed: np.ndarray  # uint8 [n/2]
    scales: np.ndarray  # float16 [n/G]
    zeros: np.ndarray  # float16 [n/G]
    shape: tuple[int, ...]
    dtype: np.dtype
    group_size: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int4_nbytes(self.numel, self.group_size)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_group_size(group_size: int) -> int:
    """Return ``group_size`` as an int, or raise ValueError naming the valid sizes."""
    if not _is_int(group_size) or int(group_size) not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    return int(group_size)


def _check_numel(n: int, group_size: int) -> int:
    if not _is_int(n) or n <= 0:
        raise ValueError(f"element count must be a positive integer, got {n!r}")
    if n % group_size:
        raise ValueError(
            f"element count {n} is not divisible by group_size {group_size}"
        )
    return int(n)


def int4_nbytes(n: int, group_size: int) -> int:
    """Bytes of the quantized layout of ``n`` elements: ``n/2 + 4*n/G``."""
    group_size = check_group_size(group_size)
    n = _check_numel(n, group_size)
    return n // 2 + 4 * (n // group_size)


def section_offsets(n: int, group_size: int) -> tuple[int, int, int]:
    """Byte offsets of the (packed, scales, zeros) sections in the quantized layout."""
    group_size = check_group_size(group_size)
    n = _check_numel(n, group_size)
    scales_off = n // 2
    zeros_off = scales_off + 2 * (n // group_size)
    return 0, scales_off, zeros_off


def _float_input(x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype not in (np.float16, np.float32):
        raise ValueError(f"INT4 input must be float16 or float32, got dtype {arr.dtype}")
    return arr


def _group_params(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp16 (scale, zero) per row of ``groups`` (float32 [num_groups, G])."""
    if not np.isfinite(groups).all():
        raise ValueError("INT4 input contains NaN or infinity")
    # + 0.0 turns -0.0 into +0.0, so the stored bits never depend on which of two equal
    # zeros min/max happened to return (the kernel does the same)
    mn = groups.min(axis=1) + np.float32(0)
    mx = groups.max(axis=1) + np.float32(0)
    # float32 subtract and divide, each rounded once, exactly as the kernel does
    scale32 = (mx - mn) / np.float32(LEVELS)
    with np.errstate(over="ignore"):
        scales = scale32.astype(np.float16)
        zeros = mn.astype(np.float16)
    if not (np.isfinite(scales).all() and np.isfinite(zeros).all()):
        raise ValueError(
            "INT4 input out of range: a group's zero or scale does not fit in float16 "
            f"(max |x| = {float(np.abs(groups).max())})"
        )
    return scales, zeros


def _codes(groups: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """uint8 codes 0..15 for float32 groups, using the fp16-rounded scale and zero."""
    sf = scales.astype(np.float32)[:, None]
    zf = zeros.astype(np.float32)[:, None]
    flat = sf == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (groups - zf) / np.where(flat, np.float32(1), sf)
    q = np.clip(np.rint(ratio), 0, LEVELS)
    q[np.broadcast_to(flat, q.shape)] = 0
    return q.astype(np.uint8)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    return codes


def quantize(x, group_size: int) -> Int4Tensor:
    """Quantize a float16/float32 array (flattened in C order) to INT4 with per-group params."""
    group_size = check_group_size(group_size)
    arr = _float_input(x)
    n = _check_numel(arr.size, group_size)
    groups = arr.reshape(n // group_size, group_size).astype(np.float32)
    scales, zeros = _group_params(groups)
    packed = _pack_nibbles(_codes(groups, scales, zeros).reshape(-1))
    return Int4Tensor(packed, scales, zeros, tuple(arr.shape), arr.dtype, group_size)


def _dequantize_parts(
    packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, dtype
) -> np.ndarray:
    codes = _unpack_nibbles(packed).reshape(-1, group_size).astype(np.float32)
    sf = scales.astype(np.float32)[:, None]
    zf = zeros.astype(np.float32)[:, None]
    # product rounded, then sum rounded: the kernel uses __fmul_rn/__fadd_rn to match
    return (zf + codes * sf).reshape(-1).astype(dtype)


def dequantize(t: Int4Tensor) -> np.ndarray:
    """Reconstruct ``t`` in its original shape and dtype."""
    out = _dequantize_parts(t.packed, t.scales, t.zeros, t.group_size, t.dtype)
    return out.reshape(t.shape)


def _byte_buffer(buf: np.ndarray, nbytes: int, what: str) -> np.ndarray:
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        raise ValueError(f"{what} must be a 1-D uint8 numpy array")
    if not buf.flags.c_contiguous:
        raise ValueError(f"{what} must be contiguous")
    if buf.size != nbytes:
        raise ValueError(f"{what} has {buf.size} bytes, the INT4 layout needs exactly {nbytes}")
    return buf


def split_sections(
    buf: np.ndarray, n: int, group_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views (packed uint8, scales fp16, zeros fp16) into a buffer holding the layout."""
    nbytes = int4_nbytes(n, group_size)
    buf = _byte_buffer(buf, nbytes, "INT4 buffer")
    _, s_off, z_off = section_offsets(n, group_size)
    packed = buf[:s_off]
    scales = buf[s_off:z_off].view(np.float16)
    zeros = buf[z_off:].view(np.float16)
    return packed, scales, zeros


def pack_into(x, group_size: int, out_bytes: np.ndarray) -> Int4Tensor:
    """Quantize ``x`` and write the contiguous byte layout into ``out_bytes`` (uint8, exact size).

    Returns the quantized tensor (its arrays are views into ``out_bytes``).
    """
    t = quantize(x, group_size)
    packed, scales, zeros = split_sections(out_bytes, t.numel, t.group_size)
    packed[:] = t.packed
    scales[:] = t.scales
    zeros[:] = t.zeros
    return Int4Tensor(packed, scales, zeros, t.shape, t.dtype, t.group_size)


def unpack_from(buf_bytes: np.ndarray, n: int, group_size: int, dtype=np.float16) -> np.ndarray:
    """Dequantize ``n`` elements from a buffer holding the byte layout; returns a flat array."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float16, np.float32):
        raise ValueError(f"output dtype must be float16 or float32, got {dtype}")
    packed, scales, zeros = split_sections(buf_bytes, n, group_size)
    return _dequantize_parts(packed, scales, zeros, check_group_size(group_size), dtype)


def expected_rmse(scales) -> float:
    """RMSE bound of a uniform quantizer with these step sizes: ``sqrt(mean(scale**2) / 12)``."""
    s = np.asarray(scales, dtype=np.float64)
    if s.size == 0:
        raise ValueError("expected_rmse needs at least one scale")
    return float(np.sqrt(np.mean(s * s) / 12.0))


def measured_rmse(x, x_hat) -> float:
    """Root-mean-square reconstruction error, computed in float64."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(x_hat, dtype=np.float64)
    return float(np.sqrt(np.mean(d * d)))


def _group_bound(g: np.ndarray, dtype) -> np.ndarray:
    """Per-group part of the element bound for float32 groups ``g`` [groups, size]."""
    s32 = (g.max(axis=1) - g.min(axis=1)) / np.float32(LEVELS)
    s16 = s32.astype(np.float16).astype(np.float64)
    absmax = np.abs(g).max(axis=1).astype(np.float64)
    per_group = s16 / 2 + LEVELS * np.abs(s16 - s32) + 1e-6 * absmax + 2.0**-25
    if dtype != np.float16:
        per_group = per_group + 2.0**-11 * absmax
    return per_group


def _output_rounding(x_hat) -> np.ndarray:
    return 2.0**-11 * np.abs(np.asarray(x_hat, np.float64)) * 1.001


def element_error_bound(x, x_hat, group_size: int) -> np.ndarray:
    """Per-element bound on ``|x - x_hat|``: s/2 + 15|s - s_fp32| + output rounding + fp32
    arithmetic, plus, for float32 input, the rounding of the zero point to fp16.

    s is the stored fp16 scale. The second term is the format's own cost of storing the
    scale in fp16: when s < the exact step, the group's max lands past code 15 and is
    clipped (it matters where the scale is a subnormal fp16). For float16 input the zero
    (the group's min) is exactly representable; for float32 it may sit off the fp16 grid.
    """
    x = np.asarray(x)
    per_group = _group_bound(x.reshape(-1, group_size).astype(np.float32), x.dtype)
    return np.repeat(per_group, group_size) + _output_rounding(x_hat).reshape(-1)


# --------------------------------------------------------------------------- per-channel rows


@dataclass(frozen=True)
class Int4Channels:
    """A per-channel quantized row: packed codes of ``[T, C]`` in C order, fp16 scale and
    zero per channel (see the module docstring)."""

    packed: np.ndarray  # uint8 [T*C/2]
    scales: np.ndarray  # float16 [C]
    zeros: np.ndarray  # float16 [C]
    shape: tuple[int, ...]  # the input's shape: (T, ...) with C = prod of the rest
    dtype: np.dtype

    @property
    def tokens(self) -> int:
        return self.shape[0]

    @property
    def channels(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return channel_nbytes(self.tokens, self.channels)


def _check_rows(tokens, channels) -> tuple[int, int]:
    for name, v in (("tokens", tokens), ("channels", channels)):
        if not _is_int(v) or v <= 0:
            raise ValueError(f"a per-channel row needs a positive integer count of {name}, "
                             f"got {v!r}")
    if (tokens * channels) % 2:
        raise ValueError(f"a per-channel row of {tokens} x {channels} elements has an odd "
                         f"count; codes are packed two per byte")
    return int(tokens), int(channels)


def channel_nbytes(tokens: int, channels: int) -> int:
    """Bytes of a per-channel row of ``tokens x channels`` elements: ``T*C/2 + 4*C``."""
    tokens, channels = _check_rows(tokens, channels)
    return tokens * channels // 2 + 4 * channels


def channel_section_offsets(tokens: int, channels: int) -> tuple[int, int, int]:
    """Byte offsets of the (packed, scales, zeros) sections of a per-channel row."""
    tokens, channels = _check_rows(tokens, channels)
    scales_off = tokens * channels // 2
    return 0, scales_off, scales_off + 2 * channels


def _as_rows(x) -> np.ndarray:
    arr = _float_input(x)
    if arr.ndim < 2:
        raise ValueError(f"a per-channel row is [tokens, channels...], got shape {arr.shape}")
    _check_rows(arr.shape[0], int(np.prod(arr.shape[1:], dtype=np.int64)))
    return arr


def quantize_channels(x) -> Int4Channels:
    """Quantize ``x`` [T, ...] (float16/float32) with one group per channel (column of
    ``x.reshape(T, -1)``) over its T tokens."""
    arr = _as_rows(x)
    cols = arr.reshape(arr.shape[0], -1).astype(np.float32).T  # [C, T]: a group per row
    scales, zeros = _group_params(cols)
    codes = _codes(cols, scales, zeros).T  # back to [T, C]: C order
    packed = _pack_nibbles(np.ascontiguousarray(codes).reshape(-1))
    return Int4Channels(packed, scales, zeros, tuple(arr.shape), arr.dtype)


def _dequantize_channel_parts(packed, scales, zeros, tokens: int, dtype) -> np.ndarray:
    codes = _unpack_nibbles(packed).reshape(tokens, -1).astype(np.float32)
    sf = scales.astype(np.float32)[None, :]
    zf = zeros.astype(np.float32)[None, :]
    return (zf + codes * sf).astype(dtype)  # product rounded, then sum: no FMA


def dequantize_channels(t: Int4Channels) -> np.ndarray:
    """Reconstruct ``t`` in its original shape and dtype."""
    out = _dequantize_channel_parts(t.packed, t.scales, t.zeros, t.tokens, t.dtype)
    return out.reshape(t.shape)


def split_channel_sections(buf: np.ndarray, tokens: int, channels: int):
    """Views (packed uint8, scales fp16, zeros fp16) into a buffer holding a per-channel row."""
    buf = _byte_buffer(buf, channel_nbytes(tokens, channels), "per-channel INT4 row")
    _, s_off, z_off = channel_section_offsets(tokens, channels)
    return buf[:s_off], buf[s_off:z_off].view(np.float16), buf[z_off:].view(np.float16)


def pack_channels_into(x, out_bytes: np.ndarray) -> Int4Channels:
    """Quantize ``x`` [T, ...] per channel and write the row's bytes into ``out_bytes``."""
    t = quantize_channels(x)
    packed, scales, zeros = split_channel_sections(out_bytes, t.tokens, t.channels)
    packed[:], scales[:], zeros[:] = t.packed, t.scales, t.zeros
    return Int4Channels(packed, scales, zeros, t.shape, t.dtype)


def unpack_channels_from(buf: np.ndarray, tokens: int, channels: int,
                         dtype=np.float16) -> np.ndarray:
    """Dequantize a per-channel row from its bytes; returns ``[tokens, channels]``."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float16, np.float32):
        raise ValueError(f"output dtype must be float16 or float32, got {dtype}")
    packed, scales, zeros = split_channel_sections(buf, tokens, channels)
    return _dequantize_channel_parts(packed, scales, zeros, tokens, dtype)


def channel_error_bound(x, x_hat) -> np.ndarray:
    """``element_error_bound`` for a per-channel row: the same terms, per column of
    ``x.reshape(T, -1)``; returned in that [T, C] shape."""
    x = np.asarray(x)
    rows = x.reshape(x.shape[0], -1)
    per_channel = _group_bound(rows.astype(np.float32).T, x.dtype)
    return per_channel[None, :] + _output_rounding(x_hat).reshape(rows.shape)


def edge_case_input(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    """fp16 test data that exercises the format's corners, for checking kernels (tests,
    benchmarks/int4_kernels.py): per-group magnitudes 1e-3..1e3, and groups that break
    shortcuts: constant, exact .5 ties, subnormal scales, on-grid values, signed zeros,
    values one fp16 step either side of a tie, the fp16 extremes, a range so small that
    the fp16 scale is 0. ``n % group_size == 0`` and ``n >= 10 * group_size`` for every
    kind of group to appear."""
    group_size = check_group_size(group_size)
    groups = _check_numel(n, group_size) // group_size
    x = rng.standard_normal((groups, group_size)) * 10.0 ** rng.uniform(-3, 3, (groups, 1))
    tie = np.array([0.0, 15.0] + [(k % 14) + 0.5 for k in range(group_size - 2)], np.float16)
    specials = [
        np.full(group_size, rng.standard_normal() * 10),
        np.array([0.0, 15.0] + [(k % 15) + 0.5 for k in range(group_size - 2)]),
        rng.standard_normal(group_size) * 1e-6,
        rng.integers(0, 16, group_size) * 0.25 - 1.0,
        np.where(rng.random(group_size) < 0.5, -0.0, rng.random(group_size)),
        np.where(rng.random(group_size) < 0.5, -0.0, 0.0),
        np.nextafter(tie, np.float16(np.inf)).astype(np.float64),
        np.nextafter(tie, np.float16(-np.inf)).astype(np.float64),
        np.array([-65504.0, 65504.0] + list(rng.uniform(-65504, 65504, group_size - 2))),
        np.where(rng.random(group_size) < 0.5, 2.0**-24, 0.0),  # not constant, scale 0
    ]
    for i, row in zip(rng.permutation(groups)[: len(specials)], specials):
        x[i] = row
    return x.astype(np.float16).reshape(-1)


def edge_case_buffer(rng: np.random.Generator, n: int, group_size: int) -> np.ndarray:
    """A valid quantized buffer of ``n`` elements for checking dequantize kernels: random
    codes, and scales that are ordinary, zero (5%) or subnormal in fp16 (5%)."""
    group_size = check_group_size(group_size)
    groups = _check_numel(n, group_size) // group_size
    scales = np.abs(rng.standard_normal(groups)) * 10.0 ** rng.uniform(-3, 1, groups)
    scales[rng.random(groups) < 0.05] = 0.0
    scales[rng.random(groups) < 0.05] = 3e-6
    zeros = rng.standard_normal(groups) * 10
    return np.concatenate([rng.integers(0, 256, n // 2, dtype=np.uint8),
                           scales.astype(np.float16).view(np.uint8),
                           zeros.astype(np.float16).view(np.uint8)])
