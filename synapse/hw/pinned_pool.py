"""The L2 pool: fixed-size chunks of page-locked host memory, pinned once and reused.

Pinning is slow and takes pages away from the OS, so it happens exactly once, when the
pool is built; transfers then reuse chunks and never pin anything. The pool is a
:class:`~synapse.hw.slab.SlabAllocator` over that one host memory, with the same tenant
tags, ``check_access`` and zero-on-free.

Operations:

- ``memlock_limit_bytes()``           O(1): RLIMIT_MEMLOCK soft limit, None when unlimited
- ``host_available_bytes()``          O(1): MemAvailable from /proc/meminfo, None if unknown
- ``check_pinnable(nbytes)``          O(1): CapacityError before a pin that cannot fit
- ``PinnedPool.create(l2_bytes, size_classes, pin=...)``  checks, pins once, builds the pool
- everything of ``SlabAllocator``     same costs (allocate/free O(1))
"""

from __future__ import annotations

import resource
from collections.abc import Callable

from synapse.errors import CapacityError, ScenarioError
from synapse.hw.memory import HostMemory, Memory
from synapse.hw.slab import SlabAllocator

GIB = 1 << 30


def memlock_limit_bytes() -> int | None:
    """The soft RLIMIT_MEMLOCK of this process in bytes (``ulimit -l``); None = unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def host_available_bytes() -> int | None:
    """Memory the kernel could give without swapping (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB ({nbytes} bytes)"


def check_pinnable(nbytes: int, *, enforce_memlock: bool = True) -> None:
    """Refuse, with both numbers, a pin that the memlock limit or free RAM cannot hold.

    Called before pinning so an impossible pool fails with a message instead of hanging
    or waking the OOM killer. ``enforce_memlock=False`` skips the ``ulimit -l`` test for
    allocators that pin outside RLIMIT_MEMLOCK accounting.
    """
    if nbytes <= 0:
        raise CapacityError(f"pinned pool must have a positive size, got {nbytes} bytes")
    limit = memlock_limit_bytes()
    if enforce_memlock and limit is not None and nbytes > limit:
        raise CapacityError(
            f"pinned pool of {_gib(nbytes)} exceeds the memlock limit of {_gib(limit)} "
            f"(ulimit -l); raise it or lower l2_bytes")
    available = host_available_bytes()
    if available is not None and nbytes > available:
        raise CapacityError(
            f"pinned pool of {_gib(nbytes)} exceeds the available host memory of "
            f"{_gib(available)} (MemAvailable); lower l2_bytes")


class PinnedPool(SlabAllocator):
    """A slab allocator whose arena is host memory pinned once, up front."""

    def __init__(self, memory: Memory, size_classes: tuple[int, ...], page_bytes: int | None = None,
                 *, alignment_bytes: int = 256, zero_on_init: bool = True) -> None:
        if memory.kind not in ("pinned_host", "host"):
            raise ScenarioError(f"a pinned pool needs host memory, got kind {memory.kind!r} "
                                f"(valid: 'pinned_host', or 'host' for tests and the cpu backend)")
        super().__init__(memory, size_classes, page_bytes,
                         alignment_bytes=alignment_bytes, zero_on_init=zero_on_init)

    @property
    def is_pinned(self) -> bool:
        return self.memory.kind == "pinned_host"

    @classmethod
    def create(cls, l2_bytes: int, size_classes: tuple[int, ...], *,
               pin: Callable[[int], Memory] | None = None, page_bytes: int | None = None,
               alignment_bytes: int = 256, enforce_memlock: bool = True) -> PinnedPool:
        """Allocate the pool's memory once and build the pool over it.

        ``pin(nbytes)`` must return page-locked memory of kind ``"pinned_host"`` (the cuda
        backend passes its allocator); ``check_pinnable`` runs before it. Without ``pin``
        the pool uses plain NumPy host memory (kind ``"host"``) and nothing is pinned.
        """
        if pin is None:
            memory: Memory = HostMemory(l2_bytes, kind="host")
        else:
            check_pinnable(l2_bytes, enforce_memlock=enforce_memlock)
            memory = pin(l2_bytes)
            if memory.kind != "pinned_host":
                raise ScenarioError(f"pin({l2_bytes}) returned memory of kind {memory.kind!r}, "
                                    f"expected 'pinned_host'")
        return cls(memory, size_classes, page_bytes, alignment_bytes=alignment_bytes)
