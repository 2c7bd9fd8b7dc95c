"""Byte layout of one KV block, shared by the cpu backend, the kernel wrappers and the
simulator's byte accounting.

A KV block holds ``block_tokens`` tokens of K and V for every layer and KV head:

* logical tensor: shape ``[block_tokens, 2, layers, kv_heads, head_dim]`` (token-major;
  index 0 of the second axis = K, 1 = V), float16, C-contiguous, so one token's K and V
  for every layer and head are contiguous and a decode step appends a token with one
  copy. ``fp16`` format = exactly those bytes:
  ``fp16_bytes = 2 * L * H * BT * D * 2``.
* ``int4`` format, in one of two key formats (``int4_keys``; ``synapse.hw.int4`` holds
  both row formats and their error bound):

  - ``"token"``: the tensor flattened (``n = 2*L*H*BT*D`` elements) and quantized in
    groups of ``group_size`` consecutive elements, so groups run along ``head_dim`` and
    never straddle two tokens (``head_dim % group_size == 0``):
    ``[packed n/2][scales fp16 n/G][zeros fp16 n/G]``, ``int4_bytes = n/2 + 4*n/G``.
  - ``"channel"`` (KIVI): with ``C = L*H*D`` channels per token, the keys ``[BT, C]``
    (``tensor[:, 0]``) as one per-channel row, a group per (layer, head, dim) over the
    block's tokens, then the values ``[BT, C]`` (``tensor[:, 1]``) as a per-token row
    in groups of ``G``::

        [K: packed BT*C/2][K scales fp16 C][K zeros fp16 C][V: packed BT*C/2][V scales BT*C/G][V zeros BT*C/G]

    ``int4_bytes = BT*C + 4*C + 4*BT*C/G``: the same as ``synapse.kv.shape``'s planes
    (``L`` times a plane's key row plus its value row), so the simulator's accounting
    is one figure for both layouts.

Alignment: kernels read with 16-byte vector loads, so every section must start at a
multiple of 16 bytes from the block base (which itself must be 16-byte aligned). The packed
section is ``L*H*BT*D`` bytes, a multiple of 32 since ``head_dim % 32 == 0``. The scales
section is ``4*L*H*BT*(D/G)`` bytes; for it to be a multiple of 16 for every model shape
(``L*H*(D/G)`` may be odd) we require ``block_tokens % 4 == 0``. In the channel format
the key sections and the value row start at multiples of 16 (``C % 32 == 0``); the value
row's zeros do when ``BT*C/G`` is a multiple of 8, and are read 2 bytes at a time.

The attention kernel (``cuda/attention_decode.cu``) reads INT4 blocks in the token format
only; L1 holds full precision (blocks are dequantized on their way in), so a scenario
never hands it an INT4 block.

Format codes, as stored in the kernels' block table: ``fp16`` = 0, ``int4`` = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synapse.hw import int4
from synapse.hw.int4 import DEFAULT_KEY_FORMAT, KEY_FORMATS

FORMATS = ("fp16", "int4")
FMT_FP16 = 0
FMT_INT4 = 1
_CODES = {"fp16": FMT_FP16, "int4": FMT_INT4}

SECTION_ALIGN_BYTES = 16
BLOCK_TOKENS_MULTIPLE = 4  # makes every int4 section a multiple of 16 bytes (see above)


def format_code(fmt) -> int:
    """The table code (0 or 1) of a format given by name or code."""
    if isinstance(fmt, str):
        if fmt in _CODES:
            return _CODES[fmt]
    elif isinstance(fmt, (int, np.integer)) and not isinstance(fmt, bool) and int(fmt) in (0, 1):
        return int(fmt)
    raise ValueError(f"KV format must be one of {FORMATS} (or code 0/1), got {fmt!r}")


def format_name(fmt) -> str:
    """The name ('fp16' or 'int4') of a format given by name or code."""
    return FORMATS[format_code(fmt)]


def check_key_format(keys) -> str:
    """``keys`` if it names an INT4 key format, else ValueError listing them."""
    if keys not in KEY_FORMATS:
        raise ValueError(f"INT4 key format must be one of {', '.join(KEY_FORMATS)}, got {keys!r}")
    return keys


def int4_block_nbytes(numel: int, block_tokens: int, group_size: int, keys: str) -> int:
    """Bytes of a block of ``numel`` elements (K and V) in the INT4 format ``keys``."""
    if check_key_format(keys) == "token":
        return int4.int4_nbytes(numel, group_size)
    c = numel // (2 * block_tokens)
    return int4.channel_nbytes(block_tokens, c) + int4.int4_nbytes(block_tokens * c, group_size)


def pack_int4_block(x, block_tokens: int, group_size: int, keys: str, out: np.ndarray) -> None:
    """Quantize a block's float16 values (``[BT, 2, ...]`` in any shape of that order) into
    ``out`` (uint8, exactly ``int4_block_nbytes``) in the INT4 format ``keys``."""
    arr = np.asarray(x)
    if check_key_format(keys) == "token":
        int4.pack_into(arr, group_size, out)
        return
    kv = arr.reshape(block_tokens, 2, -1)
    kb = int4.channel_nbytes(block_tokens, kv.shape[2])
    if out.size != int4_block_nbytes(arr.size, block_tokens, group_size, keys):
        raise ValueError(f"an INT4 block buffer of {out.size} bytes; the channel format of "
                         f"{arr.size} elements needs {int4_block_nbytes(arr.size, block_tokens, group_size, keys)}")
    int4.pack_channels_into(kv[:, 0], out[:kb])
    int4.pack_into(np.ascontiguousarray(kv[:, 1]), group_size, out[kb:])


def unpack_int4_block(buf: np.ndarray, numel: int, block_tokens: int, group_size: int,
                      keys: str, dtype=np.float16) -> np.ndarray:
    """``pack_int4_block``'s inverse: the block's ``numel`` values, flat, in ``dtype``."""
    if check_key_format(keys) == "token":
        return int4.unpack_from(buf, numel, group_size, dtype)
    c = numel // (2 * block_tokens)
    kb = int4.channel_nbytes(block_tokens, c)
    if buf.size != int4_block_nbytes(numel, block_tokens, group_size, keys):
        raise ValueError(f"an INT4 block buffer of {buf.size} bytes; the channel format of "
                         f"{numel} elements needs {int4_block_nbytes(numel, block_tokens, group_size, keys)}")
    out = np.empty((block_tokens, 2, c), dtype=dtype)
    out[:, 0] = int4.unpack_channels_from(buf[:kb], block_tokens, c, dtype)
    out[:, 1] = int4.unpack_from(buf[kb:], block_tokens * c, group_size, dtype).reshape(block_tokens, c)
    return out.reshape(-1)


@dataclass(frozen=True)
class KVLayout:
    """Shape and byte layout of a KV block (see the module docstring for the contract)."""

    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    group_size: int = 64
    int4_keys: str = DEFAULT_KEY_FORMAT

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim", "block_tokens"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive integer, got {v!r}")
        int4.check_group_size(self.group_size)
        if self.head_dim % self.group_size:
            raise ValueError(
                f"KVLayout.head_dim ({self.head_dim}) must be a multiple of group_size "
                f"({self.group_size}) so INT4 groups never straddle two tokens"
            )
        if self.block_tokens % BLOCK_TOKENS_MULTIPLE:
            raise ValueError(
                f"KVLayout.block_tokens ({self.block_tokens}) must be a multiple of "
                f"{BLOCK_TOKENS_MULTIPLE} so every INT4 section stays "
                f"{SECTION_ALIGN_BYTES}-byte aligned"
            )
        check_key_format(self.int4_keys)
        # internal invariant that the block_tokens rule guarantees
        assert all(off % SECTION_ALIGN_BYTES == 0 for off in self.int4_offsets + (self.int4_bytes,))

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.block_tokens, 2, self.layers, self.kv_heads, self.head_dim)

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K and V (fp16) for every layer and head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    @property
    def numel(self) -> int:
        return 2 * self.layers * self.kv_heads * self.block_tokens * self.head_dim

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.numel

    @property
    def channels(self) -> int:
        """Elements of one token's keys (or values): ``L * H * D``."""
        return self.layers * self.kv_heads * self.head_dim

    @property
    def int4_bytes(self) -> int:
        return int4_block_nbytes(self.numel, self.block_tokens, self.group_size, self.int4_keys)

    @property
    def int4_offsets(self) -> tuple[int, ...]:
        """Byte offsets of the sections of the int4 form: (packed, scales, zeros) in the
        token format; (K packed, K scales, K zeros, V packed, V scales) in the channel
        format (the V zeros are not always 16-byte aligned: see the module docstring)."""
        if self.int4_keys == "token":
            return int4.section_offsets(self.numel, self.group_size)
        k = int4.channel_section_offsets(self.block_tokens, self.channels)
        v0 = int4.channel_nbytes(self.block_tokens, self.channels)
        _, vs, _ = int4.section_offsets(self.block_tokens * self.channels, self.group_size)
        return k + (v0, v0 + vs)

    def nbytes(self, fmt) -> int:
        """Bytes of one block in ``fmt`` ('fp16'/'int4' or code 0/1)."""
        return self.fp16_bytes if format_code(fmt) == FMT_FP16 else self.int4_bytes

    def empty(self, fmt) -> np.ndarray:
        """A zeroed uint8 buffer the size of one block in ``fmt``."""
        return np.zeros(self.nbytes(fmt), dtype=np.uint8)

    def _check_buffer(self, buf: np.ndarray, fmt) -> np.ndarray:
        need = self.nbytes(fmt)
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
            raise ValueError("a KV block buffer must be a 1-D uint8 numpy array")
        if not buf.flags.c_contiguous:
            raise ValueError("a KV block buffer must be contiguous")
        if buf.size != need:
            raise ValueError(
                f"{format_name(fmt)} KV block buffer has {buf.size} bytes, layout {self} needs {need}"
            )
        return buf

    def view_fp16(self, buf: np.ndarray) -> np.ndarray:
        """View an fp16-format block buffer as the float16 tensor [BT, 2, L, H, D] (no copy)."""
        return self._check_buffer(buf, FMT_FP16).view(np.float16).reshape(self.shape)

    def _check_tensor(self, kv) -> np.ndarray:
        arr = np.asarray(kv)
        if arr.shape != self.shape:
            raise ValueError(f"KV tensor has shape {arr.shape}, layout needs {self.shape}")
        if arr.dtype != np.float16:
            raise ValueError(f"KV tensor must be float16, got {arr.dtype}")
        return arr

    def pack(self, kv, fmt, out: np.ndarray | None = None) -> np.ndarray:
        """Write a float16 tensor [BT, 2, L, H, D] into a block buffer of format ``fmt``."""
        arr = self._check_tensor(kv)
        buf = self.empty(fmt) if out is None else self._check_buffer(out, fmt)
        if format_code(fmt) == FMT_FP16:
            buf.view(np.float16)[:] = arr.reshape(-1)
        else:
            pack_int4_block(arr, self.block_tokens, self.group_size, self.int4_keys, buf)
        return buf

    def unpack(self, buf: np.ndarray, fmt) -> np.ndarray:
        """The float16 tensor [BT, 2, L, H, D] a block buffer holds (dequantized if int4).

        For fp16 this is a view of ``buf``; for int4 a new array.
        """
        if format_code(fmt) == FMT_FP16:
            return self.view_fp16(buf)
        self._check_buffer(buf, FMT_INT4)
        flat = unpack_int4_block(buf, self.numel, self.block_tokens, self.group_size,
                                 self.int4_keys, np.float16)
        return flat.reshape(self.shape)
