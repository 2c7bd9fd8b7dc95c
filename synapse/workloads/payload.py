"""Deterministic, cheap payload bytes for the hardware backends.

Generating fresh normal variates for every KV block or weight matrix would make host-side
random number generation the dominant cost of a hardware run (gigabytes of it), time the
simulator does not model. Instead one pool of standard-normal fp16 values is drawn per
seed and each payload is a window of it at an offset derived from its key, so a payload
costs a copy, is the same on every run and backend, and differs between blocks.
"""

from __future__ import annotations

import hashlib

import numpy as np

POOL_NUMEL = 1 << 24  # 32 MiB of fp16


class PayloadPool:
    def __init__(self, seed: int, numel: int = POOL_NUMEL):
        rng = np.random.default_rng([seed, 0x706F6F6C])
        self.values = rng.standard_normal(numel, dtype=np.float32).astype(np.float16)
        self._memory = None

    @classmethod
    def for_backend(cls, seed: int, backend) -> "PayloadPool":
        """The pool, in page-locked memory of ``backend`` where it DMAs ingest from there."""
        pool = cls(seed)
        if getattr(backend, "dma_ingest", False):
            pool.pin(backend.memory("payload_pool", pool.values.nbytes, "pinned_host"))
        return pool

    @property
    def pinned(self) -> bool:
        return self._memory is not None

    def pin(self, memory) -> None:
        """Move the pool into ``memory`` (page-locked, from ``Backend.memory``), so that
        ingest copies DMA from it (``address``) with no host copy."""
        arr = memory.view(0, self.values.nbytes).view(np.float16)
        arr[:] = self.values
        self.values, self._memory = arr, memory

    def address(self, element: int) -> int:
        """Host address of pool element ``element`` (a pinned pool only)."""
        return self._memory.address(2 * int(element))

    def window_start(self, key, numel: int) -> int | None:
        """Where ``take(key, numel)``'s window starts in the pool (None: it wraps)."""
        n = len(self.values)
        return None if numel > n else _offset(key, n - numel + 1)

    def take(self, key, numel: int, copy: bool = True) -> np.ndarray:
        """``numel`` fp16 values for ``key`` (a tuple of ints): a fresh array, or with
        ``copy=False`` a read-only view of the pool where the window fits in it."""
        n = len(self.values)
        if numel > n:  # wrap around the pool, one copy per pass (no tiled temporaries)
            out = np.empty(numel, np.float16)
            pos = _offset(key, n)
            done = 0
            while done < numel:
                k = min(numel - done, n - pos)
                out[done:done + k] = self.values[pos:pos + k]
                done += k
                pos = 0
            return out
        start = self.window_start(key, numel)
        window = self.values[start:start + numel]
        if copy:
            return window.copy()
        window = window.view()
        window.flags.writeable = False
        return window


def _offset(key, span: int) -> int:
    """Where ``key``'s window starts, in ``[0, span)``. A keyed hash: seeding a NumPy
    generator per payload cost 40-70 us each, most of the host time of a tenants run on
    the H200 (14,080 payloads)."""
    raw = b"".join(int(k).to_bytes(8, "little", signed=True) for k in key)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") % span
