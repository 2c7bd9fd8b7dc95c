"""Where the memory tiers keep chunk bytes.

``ChunkMedium`` is the whole contract a tier's storage has to meet, so the KV engine can
later back L1 with pages of its own device arena (``put`` copies into a free page,
``get`` returns a view of it, ``free`` returns the page) without the store changing.

The two built in:

- ``DeviceMedium`` (L1): each chunk as its own array on a device. Torch tensors are
  copied to ``device`` (default: where they already are); NumPy arrays stay NumPy (the
  device of the CPU tests).
- ``HostMedium`` (L2): each chunk as a flat uint8 host buffer plus its ``ChunkMeta``,
  page-locked (torch ``pin_memory``) where CUDA is available so copies to the device run
  at DMA speed, plain memory otherwise. ``get`` rebuilds the caller's array type over the
  buffer without a copy.
"""

from __future__ import annotations

import functools
from typing import Protocol

import numpy as np

from .chunk import ChunkMeta, from_bytes, host_bytes


class ChunkMedium(Protocol):
    name: str

    def put(self, key: bytes, data, meta: ChunkMeta) -> None:
        """Keep a copy of ``data`` (an array or tensor that ``meta`` describes)."""

    def get(self, key: bytes):
        """The kept array (treat as read-only)."""

    def free(self, key: bytes) -> None:
        """Forget the copy (no error if absent)."""


@functools.lru_cache(maxsize=1)
def _pinning_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def host_buffer(nbytes: int, pinned: bool) -> np.ndarray:
    """A uint8 host buffer, page-locked when asked and CUDA exists."""
    if pinned and _pinning_available():
        import torch
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    return np.empty(nbytes, np.uint8)


class DeviceMedium:
    def __init__(self, name: str = "l1", device=None):
        self.name, self.device = name, device
        self._data: dict[bytes, object] = {}

    def put(self, key: bytes, data, meta: ChunkMeta) -> None:
        if hasattr(data, "detach"):
            dev = self.device if self.device is not None else data.device
            self._data[key] = data.detach().to(dev, copy=True)
        else:
            self._data[key] = np.array(data, copy=True)

    def get(self, key: bytes):
        return self._data[key]

    def free(self, key: bytes) -> None:
        self._data.pop(key, None)


class HostMedium:
    def __init__(self, name: str = "l2", pinned: bool = True):
        self.name = name
        self.pinned = pinned and _pinning_available()
        self._data: dict[bytes, tuple[np.ndarray, ChunkMeta]] = {}

    def put(self, key: bytes, data, meta: ChunkMeta) -> None:
        buf = host_buffer(meta.nbytes, self.pinned)
        if hasattr(data, "detach"):  # one copy, straight into the (pinned) buffer
            import torch
            flat = data.detach().contiguous().reshape(-1).view(torch.uint8)
            torch.from_numpy(buf).copy_(flat)
        else:
            buf[:] = host_bytes(data)
        self._data[key] = (buf, meta)

    def adopt(self, key: bytes, buf: np.ndarray, meta: ChunkMeta) -> None:
        """Keep ``buf`` itself (a buffer an L3 read just filled), no copy."""
        self._data[key] = (buf, meta)

    def get(self, key: bytes):
        buf, meta = self._data[key]
        return from_bytes(buf, meta)

    def raw(self, key: bytes) -> np.ndarray:
        return self._data[key][0]

    def free(self, key: bytes) -> None:
        self._data.pop(key, None)
