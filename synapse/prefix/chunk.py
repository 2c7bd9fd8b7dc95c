"""What the store keeps per chunk: bytes plus a small header, and the file format of L3.

The store does not know KV layouts. A chunk's data is one array (NumPy or torch, any
shape and dtype, e.g. ``[layers, 2, heads, chunk_tokens, head_dim]`` fp16 or INT4 bytes)
and ``ChunkMeta`` records what is needed to give the same array back: shape, dtype, the
caller's format tag and which library it came from.

L3 file layout (little-endian), one file per chunk:

    0   magic  b"SYNKVC01"                         8 bytes
    8   header_len u32, reserved u32, payload_len u64
    24  header: UTF-8 JSON {key, fingerprint, shape, dtype, fmt, lib}
    ..  payload: the array's bytes, C order
    end crc32 u32 of everything before it, then b"SKVE"

A file is valid only if its size is exactly ``24 + header_len + payload_len + 8``, the
CRC matches, and the header names the key and fingerprint it was looked up by. CRC32
(zlib) rather than blake2b because it is a corruption check, not an authenticator, and
it must keep up with the disk: on the 2-core development machine zlib.crc32 ran at
3.7 GB/s and blake2b at 0.58 GB/s per core; both release the GIL, so the I/O threads
check chunks in parallel.
"""

from __future__ import annotations

import math

import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"SYNKVC01"
TRAILER_MAGIC = b"SKVE"
_PREFIX = struct.Struct("<8sIIQ")
_TRAILER = struct.Struct("<I4s")
PREFIX_BYTES = _PREFIX.size       # 24
TRAILER_BYTES = _TRAILER.size     # 8


class ChunkCorrupt(Exception):
    """A chunk file failed validation; the message says how (internal: the store turns it
    into a counted miss, never into data)."""


@dataclass(frozen=True)
class ChunkMeta:
    shape: tuple
    dtype: str       # NumPy dtype name, or the torch dtype name for torch payloads
    fmt: str = ""    # the caller's tag: "fp16", "int4-g64", ...
    lib: str = "numpy"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype, self.lib)  # np.prod: ~75 us a call


def _itemsize(dtype: str, lib: str) -> int:
    if lib == "torch":
        import torch
        return getattr(torch, dtype).itemsize
    return np.dtype(dtype).itemsize


def describe(data, fmt: str = "") -> ChunkMeta:
    """The meta of an array or tensor (no copy)."""
    if hasattr(data, "detach"):
        return ChunkMeta(tuple(data.shape), str(data.dtype).removeprefix("torch."), fmt, "torch")
    arr = np.asarray(data)
    return ChunkMeta(tuple(arr.shape), arr.dtype.name, fmt, "numpy")


def host_bytes(data) -> np.ndarray:
    """The bytes of an array or tensor as a flat uint8 NumPy array (a view where the data
    is already contiguous host memory; a device tensor is copied to the host)."""
    if hasattr(data, "detach"):
        t = data.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        import torch
        return t.reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def from_bytes(buf, meta: ChunkMeta):
    """The array ``meta`` describes over ``buf`` (a uint8 NumPy array or tensor; no copy)."""
    if meta.lib == "torch":
        import torch
        t = buf if hasattr(buf, "detach") else torch.from_numpy(buf)
        return t.view(getattr(torch, meta.dtype)).reshape(meta.shape)
    arr = buf.numpy() if hasattr(buf, "detach") else buf
    return arr.view(np.dtype(meta.dtype)).reshape(meta.shape)


def header_bytes(key: bytes, fingerprint: bytes, meta: ChunkMeta) -> bytes:
    text = json.dumps({"key": key.hex(), "fingerprint": fingerprint.hex(),
                       "shape": list(meta.shape), "dtype": meta.dtype, "fmt": meta.fmt,
                       "lib": meta.lib}, separators=(",", ":"))
    return text.encode()


def encode_prefix(header: bytes, payload_len: int) -> bytes:
    return _PREFIX.pack(MAGIC, len(header), 0, payload_len) + header


def encode_trailer(crc: int) -> bytes:
    return _TRAILER.pack(crc & 0xFFFFFFFF, TRAILER_MAGIC)


def crc_of(parts) -> int:
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return crc


def parse_prefix(raw: bytes, file_bytes: int) -> tuple[int, int]:
    """(header_len, payload_len) from the first 24 bytes; ChunkCorrupt if the file cannot
    be a whole chunk file."""
    if len(raw) < PREFIX_BYTES:
        raise ChunkCorrupt(f"truncated: {file_bytes} bytes, shorter than the fixed header")
    magic, hlen, _, plen = _PREFIX.unpack(raw[:PREFIX_BYTES])
    if magic != MAGIC:
        raise ChunkCorrupt(f"bad magic {magic!r}")
    want = PREFIX_BYTES + hlen + plen + TRAILER_BYTES
    if file_bytes != want:
        raise ChunkCorrupt(f"truncated or padded: {file_bytes} bytes, the header says {want}")
    return hlen, plen


def parse_header(raw: bytes, key: bytes, fingerprint: bytes) -> ChunkMeta:
    try:
        h = json.loads(raw)
        meta = ChunkMeta(tuple(int(x) for x in h["shape"]), str(h["dtype"]), str(h["fmt"]),
                         str(h["lib"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ChunkCorrupt(f"unreadable header ({e})") from None
    if h["key"] != key.hex():
        raise ChunkCorrupt("the header names another key")
    if h["fingerprint"] != fingerprint.hex():
        raise ChunkCorrupt("the header names another model/layout fingerprint")
    return meta


def check_trailer(raw: bytes, crc: int) -> None:
    got, magic = _TRAILER.unpack(raw)
    if magic != TRAILER_MAGIC:
        raise ChunkCorrupt("bad trailer")
    if got != crc & 0xFFFFFFFF:
        raise ChunkCorrupt(f"checksum mismatch (crc32 {got:08x} stored, {crc & 0xFFFFFFFF:08x} read)")
