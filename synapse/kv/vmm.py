"""The L1 arena on CUDA virtual memory (the vAttention design, through NVIDIA's
cuda-bindings: PyCUDA has no virtual memory management).

An arena of ``planes`` planes reserves one virtual range per plane, as large as the
budget; physical pages (the allocation granularity, 2 MiB on Hopper) are mapped as the
live prefix of each plane grows and unmapped when it shrinks, so the device memory the
arena holds is ``pages_mapped * page_bytes`` with ``pages_mapped = ceil(live bytes of
each plane / page_bytes)`` summed over planes, and the budget is enforced by the
hardware: a byte past the mapped pages faults. Pages come from a ``PagePool`` of
physical handles created ahead of need (``cuMemCreate`` is 15 us a page on an H200 and
0.2 ms on an A100 per kvcached's published measurements: not on the decode path) and go
back to it when unmapped; a page that last held another tenant's bytes is zeroed before
it is mapped for a new one. Unmapping waits for a safe point (``trim``), when no queued
op can still read the pages (the relocation copies of compaction read past the new end).

``VmmUnavailable`` says why an arena cannot be built (no cuda-bindings, no driver, no
VMM support); callers fall back to one ordinary allocation and record the reason.
The driver calls are behind ``CudaVmm`` so the page bookkeeping runs in CPU tests with a
fake driver.
"""

from __future__ import annotations

import time

from ..errors import SynapseError


class VmmUnavailable(SynapseError):
    """CUDA virtual memory cannot be used here (the message says why)."""


def _track(va: int, nbytes: int):
    from ..monitor.tracker import track
    return track(va, nbytes, "device", "l1_arena", owner="vmm_arena")


def _untrack(handle) -> None:
    from ..monitor.tracker import release
    release(handle)


class CudaVmm:
    """The cuda-bindings calls the arena makes, on the current context's device."""

    def __init__(self, device: int = 0):
        try:
            from cuda.bindings import driver as cu
        except ImportError as e:
            raise VmmUnavailable(f"cuda-bindings is not installed ({e})") from None
        self.cu, self.device = cu, device
        try:
            ok = self._check("cuDeviceGetAttribute", cu.cuDeviceGetAttribute(
                cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
                device))
        except Exception as e:  # no driver, or no context yet
            raise VmmUnavailable(f"the CUDA driver does not answer ({e})") from None
        if not ok:
            raise VmmUnavailable(f"device {device} does not support virtual memory management")
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        self.prop = prop
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.access = access
        self.page_bytes = int(self._check("cuMemGetAllocationGranularity",
                                          cu.cuMemGetAllocationGranularity(
                                              prop, cu.CUmemAllocationGranularity_flags
                                              .CU_MEM_ALLOC_GRANULARITY_MINIMUM)))

    def _check(self, what, ret):
        err, *rest = ret if isinstance(ret, tuple) else (ret,)
        if int(err) != 0:
            raise VmmUnavailable(f"{what} failed: {getattr(err, 'name', err)}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def reserve(self, nbytes: int) -> int:
        return int(self._check("cuMemAddressReserve",
                               self.cu.cuMemAddressReserve(nbytes, self.page_bytes, 0, 0)))

    def free(self, va: int, nbytes: int) -> None:
        self._check("cuMemAddressFree", self.cu.cuMemAddressFree(va, nbytes))

    def create(self):
        return self._check("cuMemCreate", self.cu.cuMemCreate(self.page_bytes, self.prop, 0))

    def release(self, handle) -> None:
        self._check("cuMemRelease", self.cu.cuMemRelease(handle))

    def map(self, va: int, handle) -> None:
        self._check("cuMemMap", self.cu.cuMemMap(va, self.page_bytes, 0, handle, 0))

    def set_access(self, va: int, nbytes: int) -> None:
        self._check("cuMemSetAccess", self.cu.cuMemSetAccess(va, nbytes, [self.access], 1))

    def unmap(self, va: int, nbytes: int) -> None:
        self._check("cuMemUnmap", self.cu.cuMemUnmap(va, nbytes))

    def zero(self, ranges, stream: int | None = None) -> None:
        """Zero ``(va, nbytes)`` ranges. Without ``stream``: then wait (the null stream
        does not order against non-blocking streams; pages are zeroed when mapped for a
        new owner, not per step). With one: queued on it, for pages only that stream
        touches next (no wait)."""
        if stream is not None:
            for va, nbytes in ranges:
                self._check("cuMemsetD8Async", self.cu.cuMemsetD8Async(va, 0, nbytes, stream))
            return
        for va, nbytes in ranges:
            self._check("cuMemsetD8", self.cu.cuMemsetD8(va, 0, nbytes))
        self._check("cuCtxSynchronize", self.cu.cuCtxSynchronize())


class PagePool:
    """Physical pages created ahead of need and reused; a page remembers the tenant whose
    bytes it last held, and is zeroed before it serves another (a new page too: the
    driver does not promise its contents)."""

    def __init__(self, driver, spare_pages: int = 16):
        self.driver = driver
        self.free_pages: list[list] = []   # [handle, last tenant]
        self.spare_pages = spare_pages
        self.created = self.released = self.zeroed = 0
        self.create_s = 0.0

    def fill(self, n: int) -> None:
        """Create pages until ``n`` are free (set-up time, off the decode path)."""
        t0 = time.perf_counter()
        while len(self.free_pages) < n:
            self.free_pages.append([self.driver.create(), None])
            self.created += 1
        self.create_s += time.perf_counter() - t0

    def take(self, tenant: str):
        """A page for ``tenant``: (handle, whether it must be zeroed once mapped)."""
        if not self.free_pages:
            self.fill(1)
        handle, last = self.free_pages.pop()
        # a new page's contents are not promised to be zero: treat them as a stranger's
        return handle, last != tenant

    def give(self, handle, tenant: str) -> None:
        if len(self.free_pages) >= self.spare_pages:
            self.driver.release(handle)
            self.released += 1
        else:
            self.free_pages.append([handle, tenant])

    def close(self) -> None:
        for handle, _ in self.free_pages:
            self.driver.release(handle)
            self.released += 1
        self.free_pages = []


class VmmArena:
    """``planes`` reserved ranges of ``nbytes / planes`` each, pages mapped on demand."""

    def __init__(self, nbytes: int, planes: int, device: int = 0, *, driver=None,
                 pool: PagePool | None = None, tenant: str = "default", prefill_pages: int = 0,
                 spare_pages: int = 16):
        self.driver = driver if driver is not None else CudaVmm(device)
        self.page_bytes = self.driver.page_bytes
        self.planes = planes
        self.plane_bytes = nbytes // planes
        pages_per_plane = -(-self.plane_bytes // self.page_bytes)
        self.plane_stride = pages_per_plane * self.page_bytes  # virtual bytes per plane
        self.nbytes = nbytes
        self.base = self.driver.reserve(planes * self.plane_stride)
        self.pool = pool if pool is not None else PagePool(self.driver, spare_pages)
        self.own_pool = pool is None
        self.tenant = tenant
        self.mapped: list[list] = [[] for _ in range(planes)]  # handles, in page order
        self._tracked: list[list] = [[] for _ in range(planes)]  # allocation-tracker records
        self._target = 0  # pages per plane that the live prefix needs
        # lazy (set by the user of the arena for the length of a step): growth is mapped
        # plane by plane as ``ensure`` asks, zeroed on ``lazy_stream``; see ``extent``
        self.lazy = False
        self.lazy_stream: int | None = None
        self.map_s = self.unmap_s = 0.0
        self.num_maps = self.num_unmaps = 0
        if prefill_pages:
            self.pool.fill(prefill_pages)

    # -- what the allocator tells us --------------------------------------------------
    def extent(self, live_bytes: int) -> None:
        """The live prefix is now ``live_bytes`` (over all planes): pages are mapped at
        once where it grew (with ``lazy``: when ``ensure`` asks for a plane); where it
        shrank they are unmapped at the next ``trim``."""
        per_plane = -(-max(0, live_bytes) // self.planes)
        need = -(-per_plane // self.page_bytes)
        self._target = need
        if not self.lazy:
            self.ensure()

    def ensure(self, planes=None) -> None:
        """Map ``planes`` (default: all) up to the live prefix. A long prefill maps
        hundreds of pages (about 40 us each on the H200): with ``lazy`` a cache maps
        each layer's planes just before it writes them, so the host maps layer i+1's
        while the device still computes layer i, where mapping every plane first left
        the device idle (a 32k prompt: 513 pages, about 20 ms)."""
        need = self._target
        todo = range(self.planes) if planes is None else planes
        if any(len(self.mapped[p]) < need for p in todo):
            self._map_to(need, todo)

    def mapped_pages(self) -> int:
        """Pages mapped in every plane (the bytes of a plane that may be touched)."""
        return min(len(h) for h in self.mapped)

    def trim(self) -> int:
        """Unmap the pages past the live prefix (call when no queued op reads them).
        Returns the pages unmapped."""
        n = 0
        if len(self.mapped[0]) > self._target:
            t0 = time.perf_counter()
            for p, handles in enumerate(self.mapped):
                while len(handles) > self._target:
                    i = len(handles) - 1
                    _untrack(self._tracked[p].pop())
                    self.driver.unmap(self._va(p, i), self.page_bytes)
                    self.pool.give(handles.pop(), self.tenant)
                    n += 1
            self.unmap_s += time.perf_counter() - t0
            self.num_unmaps += n
        return n

    @property
    def trim_pending(self) -> bool:
        return any(len(h) > self._target for h in self.mapped)

    def _va(self, plane: int, page: int) -> int:
        return self.base + plane * self.plane_stride + page * self.page_bytes

    def _map_to(self, need: int, planes=None) -> None:
        t0 = time.perf_counter()
        dirty = []
        for p in range(self.planes) if planes is None else planes:
            handles = self.mapped[p]
            first = len(handles)
            while len(handles) < need:
                handle, zero = self.pool.take(self.tenant)
                va = self._va(p, len(handles))
                self.driver.map(va, handle)
                handles.append(handle)
                self._tracked[p].append(_track(va, self.page_bytes))
                if zero:
                    dirty.append(va)
            if len(handles) > first:  # one access grant for the run just mapped
                self.driver.set_access(self._va(p, first), (len(handles) - first) * self.page_bytes)
                self.num_maps += len(handles) - first
        if dirty:  # another tenant's bytes are never readable: one wait for all of them
            # (lazy: queued on the stream that touches these planes next, no wait)
            self.driver.zero([(va, self.page_bytes) for va in dirty],
                             **({"stream": self.lazy_stream} if self.lazy else {}))
            self.pool.zeroed += len(dirty)
        self.map_s += time.perf_counter() - t0

    # -- queries ------------------------------------------------------------------------
    @property
    def pages_mapped(self) -> int:
        return sum(len(h) for h in self.mapped)

    @property
    def mapped_bytes(self) -> int:
        return self.pages_mapped * self.page_bytes

    def plane_address(self, plane: int) -> int:
        return self.base + plane * self.plane_stride

    def tensor(self, device):
        """The whole reserved range as a torch uint8 tensor ``[planes, plane_stride]``
        (only the mapped pages may be touched)."""
        import torch
        arena = self

        class _Range:
            __cuda_array_interface__ = {"shape": (arena.planes, arena.plane_stride), "typestr": "|u1",
                                        "data": (arena.base, False), "version": 3,
                                        "strides": None}
        t = torch.as_tensor(_Range(), device=device)
        return t[:, : self.plane_bytes]

    def stats(self) -> dict:
        return {"page_bytes": self.page_bytes, "pages_mapped": self.pages_mapped,
                "maps": self.num_maps, "unmaps": self.num_unmaps,
                "map_us_per_page": 1e6 * self.map_s / self.num_maps if self.num_maps else None,
                "unmap_us_per_page": 1e6 * self.unmap_s / self.num_unmaps if self.num_unmaps else None,
                "pages_created": self.pool.created, "pages_released": self.pool.released,
                "pages_zeroed": self.pool.zeroed}

    def close(self) -> None:
        self._target = 0
        self.trim()
        self.driver.free(self.base, self.planes * self.plane_stride)
        if self.own_pool:
            self.pool.close()
