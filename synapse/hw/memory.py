"""Memory providers: the one interface the hardware bookkeeping needs from real memory.

The slab allocator, the pinned pool and the weight ring only do arithmetic on byte
offsets. Whatever holds the bytes sits behind :class:`Memory`, which is deliberately tiny
so the cuda backend can implement it over a ``cuMemAlloc`` arena (``zero`` becomes an
async memset on a stream) or over ``pagelocked_empty`` host memory.

Operations (all O(1) except ``zero``, which is O(nbytes) memory traffic):

- ``nbytes``, ``kind``                      size and where the bytes live
- ``address(offset) -> int``                a pointer-like integer for DMA and audits
- ``zero(offset, nbytes)``                  clear a range (zero-on-free)
- ``HostMemory.view(offset, nbytes)``       a ``uint8`` NumPy view, no copy
- ``check_range(capacity, offset, nbytes)`` the bounds check every provider shares
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from synapse.errors import CapacityError, ScenarioError

MEMORY_KINDS = ("device", "pinned_host", "host")


@runtime_checkable
class Memory(Protocol):
    """A contiguous range of bytes addressed by offset."""

    @property
    def nbytes(self) -> int: ...

    @property
    def kind(self) -> str: ...

    def zero(self, offset: int, nbytes: int) -> None: ...

    def address(self, offset: int) -> int: ...


def check_range(capacity_bytes: int, offset: int, nbytes: int) -> None:
    """Raise CapacityError unless ``[offset, offset + nbytes)`` lies inside the memory."""
    if offset < 0 or nbytes < 0 or offset + nbytes > capacity_bytes:
        raise CapacityError(
            f"range [{offset}, {offset + nbytes}) of {nbytes} bytes is outside "
            f"a memory of {capacity_bytes} bytes"
        )


class HostMemory:
    """Host bytes in one NumPy ``uint8`` array: the cpu backend and the tests.

    ``kind`` is ``"host"`` or ``"pinned_host"``; the latter only when the array really is
    page-locked (see :meth:`wrap`). ``"device"`` is refused: a residency audit must be
    able to trust that a ``device`` memory is device memory.
    """

    def __init__(self, nbytes: int, kind: str = "host") -> None:
        if nbytes <= 0:
            raise CapacityError(f"host memory must have a positive size, got {nbytes} bytes")
        # np.empty does not touch the pages; allocators clear what they hand out.
        self._init(np.empty(nbytes, dtype=np.uint8), kind)

    @classmethod
    def wrap(cls, array: np.ndarray, kind: str = "host") -> HostMemory:
        """Adopt an existing contiguous ``uint8`` array, e.g. from ``pagelocked_empty``."""
        if array.dtype != np.uint8 or array.ndim != 1 or not array.flags.c_contiguous:
            raise ScenarioError(
                f"host memory must be a contiguous 1-D uint8 array, got dtype {array.dtype}, "
                f"shape {array.shape}"
            )
        if array.size == 0:
            raise CapacityError("host memory must have a positive size, got 0 bytes")
        memory = cls.__new__(cls)
        memory._init(array, kind)
        return memory

    def _init(self, array: np.ndarray, kind: str) -> None:
        if kind not in ("host", "pinned_host"):
            raise ScenarioError(
                f"HostMemory kind must be 'host' or 'pinned_host', got {kind!r} "
                f"(valid memory kinds: {', '.join(MEMORY_KINDS)}; NumPy memory is never 'device')"
            )
        self._array = array
        self._kind = kind

    @property
    def nbytes(self) -> int:
        return int(self._array.size)

    @property
    def kind(self) -> str:
        return self._kind

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        check_range(self.nbytes, offset, nbytes)
        return self._array[offset : offset + nbytes]

    def zero(self, offset: int, nbytes: int) -> None:
        self.view(offset, nbytes).fill(0)

    def address(self, offset: int) -> int:
        check_range(self.nbytes, offset, 0)
        return int(self._array.ctypes.data) + offset

    def __repr__(self) -> str:
        return f"HostMemory(nbytes={self.nbytes}, kind={self._kind!r})"
