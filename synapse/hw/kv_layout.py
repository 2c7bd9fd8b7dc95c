"""Byte layout of one KV block, shared by the cpu backend, the kernel wrappers and the
simulator's byte accounting.

A KV block holds ``block_tokens`` tokens of K and V for every layer and KV head:

* logical tensor: shape ``[block_tokens, 2, layers, kv_heads, head_dim]`` (token-major;
  index 0 of the second axis = K, 1 = V), float16, C-contiguous, so one token's K and V
  for every layer and head are contiguous and a decode step appends a token with one
  copy. ``fp16`` format = exactly those bytes:
  ``fp16_bytes = 2 * L * H * BT * D * 2``.
* ``int4`` format: that tensor flattened (``n = 2*L*H*BT*D`` elements) and quantized with
  ``synapse.hw.int4`` (groups of ``group_size`` consecutive elements, so groups run along
  ``head_dim`` and never straddle two tokens; requires ``head_dim % group_size == 0``):
  ``[packed n/2][scales fp16 n/G][zeros fp16 n/G]``, ``int4_bytes = n/2 + 4*n/G``.

Alignment: kernels read with 16-byte vector loads, so every section must start at a
multiple of 16 bytes from the block base (which itself must be 16-byte aligned). The packed
section is ``L*H*BT*D`` bytes, a multiple of 32 since ``head_dim % 32 == 0``. The scales
section is ``4*L*H*BT*(D/G)`` bytes; for it to be a multiple of 16 for every model shape
(``L*H*(D/G)`` may be odd) we require ``block_tokens % 4 == 0``.

Format codes, as stored in the kernels' block table: ``fp16`` = 0, ``int4`` = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synapse.hw import int4

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


@dataclass(frozen=True)
class KVLayout:
    """Shape and byte layout of a KV block (see the module docstring for the contract)."""

    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    group_size: int = 64

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
    def int4_bytes(self) -> int:
        return int4.int4_nbytes(self.numel, self.group_size)

    @property
    def int4_offsets(self) -> tuple[int, int, int]:
        """Byte offsets of the (packed, scales, zeros) sections of the int4 form."""
        return int4.section_offsets(self.numel, self.group_size)

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
            int4.pack_into(arr, self.group_size, buf)
        return buf

    def unpack(self, buf: np.ndarray, fmt) -> np.ndarray:
        """The float16 tensor [BT, 2, L, H, D] a block buffer holds (dequantized if int4).

        For fp16 this is a view of ``buf``; for int4 a new array.
        """
        if format_code(fmt) == FMT_FP16:
            return self.view_fp16(buf)
        self._check_buffer(buf, FMT_INT4)
        flat = int4.unpack_from(buf, self.numel, self.group_size, np.float16)
        return flat.reshape(self.shape)
