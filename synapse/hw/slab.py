"""Slab allocator: size classes carved from fixed pages of one memory arena.

The arena (a :class:`~synapse.hw.memory.Memory`) is cut into pages of ``page_bytes``. A
size class takes a page from the free-page stack when it needs room, carves it lazily
into objects of that one class, and gives it back when the page's last object is freed,
so memory moves between classes at page granularity and never needs compaction.

Operations (C = size classes, T = tenants, n = live objects, P = pages):

- ``can_allocate(nbytes)``         O(log C)
- ``allocate(nbytes, tenant)``     O(log C) class lookup, then O(1): no scan, no device call
- ``allocate_prefix(sizes, tenants)``  allocate in order while each fits, O(1) per object
- ``free(slab)``                   O(1) bookkeeping + one ``memory.zero`` of the object
- ``free_all(slabs)``              ``free`` of each in order
- ``check_access(tenant, slab)``   O(1); the backends call it on every read/write/copy
- ``check_access_all(tenants, slabs)``  ``check_access`` of each pair
- ``all_accessible(tenants, slabs)``    whether all would pass, without counting
- ``is_live(slab)``                O(1)
- ``stats()``                      O(C + T)
- ``live_slabs()`` / ``audit()``   O(n) / O(P + n), for health reports and tests
"""

from __future__ import annotations

import bisect
import itertools
from itertools import repeat
from operator import attrgetter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from synapse.errors import AccessDenied, AllocatorError, CapacityError
from synapse.hw.memory import Memory

PAGE_GRANULE_BYTES = 2 << 20  # default pages are whole 2 MiB units (large-page friendly)


def round_up(nbytes: int, multiple: int) -> int:
    return -(-nbytes // multiple) * multiple


class Slab(NamedTuple):
    """Handle to one live object. ``generation`` is unique per allocation, so a handle
    kept after ``free`` never matches the object that later reuses its offset.

    Immutable, compared field by field. A named tuple rather than a frozen dataclass:
    the simulator creates one per block move, and a tuple is built about six times faster.
    """

    offset: int
    nbytes: int  # requested
    class_bytes: int  # bytes actually reserved at ``offset``
    tenant: str
    allocator_id: int
    generation: int


@dataclass(frozen=True)
class SlabStats:
    capacity_bytes: int
    used_bytes: int  # class bytes of live objects
    requested_bytes: int
    free_bytes: int
    internal_fragmentation: float  # 1 - requested / used
    external_fragmentation: float  # free bytes inside used pages / free bytes
    pages_free: int
    pages_used: int
    live_per_class: dict[int, int]
    bytes_per_tenant: dict[str, int]
    num_allocs: int
    num_frees: int
    num_denied: int


class _Page:
    __slots__ = ("class_index", "num_live", "num_carved", "free_objects", "partial_pos")

    def __init__(self, class_index: int) -> None:
        self.class_index = class_index
        self.num_live = 0
        self.num_carved = 0  # objects [0, num_carved) have been handed out at least once
        self.free_objects: list[int] = []  # object indices below num_carved, free again
        self.partial_pos: int | None = None  # position in its class's partial-page list


class _Whole:
    """The state of a page that keeps no ``_Page``: free (on the free-page stack), or
    holding one object of a size class as large as the page. So allocating or freeing
    those touches no per-page object (the simulator's L2 moves thousands a step); a
    page of smaller objects gets a ``_Page`` when a class takes it. Without slots:
    writing to it fails loudly."""

    __slots__ = ()


_WHOLE = _Whole()


class SlabAllocator:
    """Size-class allocator over one arena; see the module docstring for costs."""

    _ids = itertools.count(1)

    def __init__(self, memory: Memory, size_classes: tuple[int, ...], page_bytes: int | None = None,
                 *, alignment_bytes: int = 256, zero_on_init: bool = True) -> None:
        if alignment_bytes <= 0:
            raise CapacityError(f"alignment_bytes must be positive, got {alignment_bytes}")
        bad = [c for c in size_classes if c <= 0]
        if bad or not size_classes:
            raise CapacityError(f"size classes must be positive byte counts, got {tuple(size_classes)}")
        # Classes are rounded up to the alignment so every object starts aligned; the
        # padding shows up honestly as internal fragmentation.
        classes = tuple(sorted({round_up(c, alignment_bytes) for c in size_classes}))
        largest = classes[-1]
        if page_bytes is None:
            page_bytes = round_up(largest, PAGE_GRANULE_BYTES)
        if page_bytes < largest:
            raise CapacityError(f"page_bytes {page_bytes} is smaller than the largest size class "
                                f"of {largest} bytes")
        if page_bytes % alignment_bytes:
            raise CapacityError(f"page_bytes {page_bytes} is not a multiple of alignment_bytes "
                                f"{alignment_bytes}")
        num_pages = memory.nbytes // page_bytes
        if num_pages == 0:
            raise CapacityError(f"arena of {memory.nbytes} bytes is smaller than one page of "
                                f"{page_bytes} bytes")
        self.memory = memory
        self.size_classes = classes
        self._largest = largest
        self._class_cache: dict[int, int] = {}  # nbytes -> class index, for valid sizes
        self.page_bytes = page_bytes
        self.alignment_bytes = alignment_bytes
        self.num_pages = num_pages
        self.capacity_bytes = num_pages * page_bytes  # an arena tail shorter than a page is unused
        self.allocator_id = next(SlabAllocator._ids)
        self._objects_per_page = tuple(page_bytes // c for c in classes)
        # grows on first use of a page, so P stays what was touched; _WHOLE for free pages
        # and pages of one object (see _Whole)
        self._pages: list[_Page | _Whole] = []
        self._free_pages: list[int] = []  # indices below len(_pages) whose page is empty
        self._partial: list[list[int]] = [[] for _ in classes]  # pages with a free object
        self._live: dict[int, Slab] = {}
        self._live_per_class = [0] * len(classes)
        self._bytes_per_tenant: dict[str, int] = {}
        self._used_bytes = 0
        self._requested_bytes = 0
        self._generation = 0
        self.num_allocs = self.num_frees = self.num_denied = 0
        if zero_on_init:
            # The arena may hold an earlier owner's bytes; clear it once so every object
            # handed out reads zeros, not only reused ones.
            memory.zero(0, self.capacity_bytes)

    # -- allocate / free ---------------------------------------------------------------

    def can_allocate(self, nbytes: int) -> bool:
        ci = self._class_index_or_none(nbytes)
        if ci is None:
            return False
        return bool(self._partial[ci]) or bool(self._free_pages) or len(self._pages) < self.num_pages

    def allocate(self, nbytes: int, tenant: str) -> Slab:
        ci = self._class_index_or_none(nbytes)
        if ci is None:
            if nbytes <= 0:
                raise CapacityError(f"allocation must be positive, got {nbytes} bytes")
            raise CapacityError(f"request of {nbytes} bytes exceeds the largest size class of "
                                f"{self.size_classes[-1]} bytes (arena {self.capacity_bytes} bytes)")
        if not self.can_allocate(nbytes):
            self._take_page(ci)  # raises CapacityError: arena full
        return self.allocate_prefix((nbytes,), (tenant,))[0]

    def allocate_prefix(self, sizes: Sequence[int], tenants: Sequence[str]) -> list[Slab]:
        """Allocate ``sizes[i]`` for ``tenants[i]`` in order, stopping at the first that
        does not fit: the same slabs as ``allocate`` for each while ``can_allocate``.

        One loop with the bookkeeping inline: the simulator allocates hundreds of
        thousands of objects per run, and a method call per step of each would double
        the cost.
        """
        out = self._allocate_whole_pages(sizes, tenants)
        if out is not None:
            return out
        out = []
        cls_of, partial_of, free_pages, pages = self._class_index_or_none, self._partial, \
            self._free_pages, self._pages
        opp, classes, page_bytes, live = self._objects_per_page, self.size_classes, \
            self.page_bytes, self._live
        per_tenant, live_per_class, aid = self._bytes_per_tenant, self._live_per_class, \
            self.allocator_id
        class_cache = self._class_cache
        used = requested = 0
        generation = self._generation
        try:
            for nbytes, tenant in zip(sizes, tenants):
                ci = class_cache.get(nbytes)
                if ci is None:
                    ci = cls_of(nbytes)
                    if ci is None:
                        break
                    class_cache[nbytes] = ci
                partial = partial_of[ci]
                if opp[ci] == 1:
                    # A page of one object goes from the free stack (or from the pages
                    # never used) straight to full, and keeps no _Page (see _Whole).
                    if free_pages:
                        page_index = free_pages.pop()
                    elif len(pages) < self.num_pages:
                        page_index = len(pages)
                        pages.append(_WHOLE)
                    else:
                        break
                    class_bytes = classes[ci]
                    offset = page_index * page_bytes
                else:
                    if partial:
                        page_index = partial[-1]
                    elif free_pages or len(pages) < self.num_pages:
                        page_index = self._take_page(ci)
                    else:
                        break
                    page = pages[page_index]
                    if page.free_objects:
                        obj = page.free_objects.pop()
                    else:
                        obj = page.num_carved
                        page.num_carved += 1
                    page.num_live += 1
                    if page.num_live == opp[ci]:
                        self._unlink_partial(page_index)
                    class_bytes = classes[ci]
                    offset = page_index * page_bytes + obj * class_bytes
                generation += 1
                slab = _new_slab(Slab, (offset, nbytes, class_bytes, tenant, aid, generation))
                live[offset] = slab
                live_per_class[ci] += 1
                per_tenant[tenant] = per_tenant.get(tenant, 0) + class_bytes
                used += class_bytes
                requested += nbytes
                out.append(slab)
        finally:
            self._generation = generation
            self._used_bytes += used
            self._requested_bytes += requested
            self.num_allocs += len(out)
        return out

    def _allocate_whole_pages(self, sizes: Sequence[int], tenants: Sequence[str]):
        """``allocate_prefix`` when every object is of one class that fills a page and
        the free-page stack holds them all (the simulator's L2 of block-sized slabs): the
        same slabs, pages and counters, built by ``map`` and ``zip`` in C. None when that
        does not apply (the general loop does it)."""
        n = min(len(sizes), len(tenants))
        if n == 0:
            return None
        nbytes = sizes[0]
        ci = self._class_cache.get(nbytes)
        if ci is None or self._objects_per_page[ci] != 1 or self._partial[ci] \
                or sizes[:n].count(nbytes) != n:
            return None
        class_bytes, page_bytes, pages, free_pages = self.size_classes[ci], self.page_bytes, \
            self._pages, self._free_pages
        # free pages first (as ``pop`` takes them), then pages never used, in order
        k1 = min(n, len(free_pages))
        taken = free_pages[len(free_pages) - k1:]
        taken.reverse()
        del free_pages[len(free_pages) - k1:]
        k2 = min(n - k1, self.num_pages - len(pages))
        if k2 > 0:
            first = len(pages)
            pages.extend(repeat(_WHOLE, k2))
            taken += range(first, first + k2)
        n = len(taken)  # fewer when the arena is full: the prefix that fits
        if n == 0:
            return []
        offsets = [p * page_bytes for p in taken]
        g = self._generation
        tenants = tenants[:n]
        out = list(map(_new_slab, repeat(Slab, n),
                       zip(offsets, repeat(nbytes), repeat(class_bytes), tenants,
                           repeat(self.allocator_id), range(g + 1, g + 1 + n))))
        self._live.update(zip(offsets, out))
        self._live_per_class[ci] += n
        add_per_tenant(self._bytes_per_tenant, tenants, class_bytes)
        self._generation = g + n
        self._used_bytes += n * class_bytes
        self._requested_bytes += n * nbytes
        self.num_allocs += n
        return out

    def free(self, slab: Slab) -> None:
        self.free_all((slab,))

    def free_all(self, slabs) -> None:
        """``free`` each slab in order (a failure leaves the earlier ones freed).

        Each object is zeroed before any of its bookkeeping, so if the memset fails the
        slab simply stays live. One loop with the bookkeeping inline (see
        ``allocate_prefix``).
        """
        if self._free_whole_pages(slabs):
            return
        live, pages, opp, page_bytes = self._live, self._pages, self._objects_per_page, \
            self.page_bytes
        zero, free_pages, per_tenant, live_per_class = self.memory.zero, self._free_pages, \
            self._bytes_per_tenant, self._live_per_class
        # Memory whose zeroing is only queued (the simulator's) takes the ranges at once.
        ranges = [] if getattr(self.memory, "zero_ranges", None) is not None else None
        used = requested = n = 0
        try:
            for slab in slabs:
                # The handle we handed out (identity) is live by construction; anything
                # else (a copy, a stale, foreign or forged handle) gets every check.
                if slab.__class__ is not Slab or live.get(slab.offset) is not slab:
                    self._require_live(slab)
                offset, class_bytes = slab.offset, slab.class_bytes
                if ranges is None:
                    zero(offset, class_bytes)
                else:
                    ranges.append((offset, class_bytes))
                del live[offset]
                page_index, in_page = divmod(offset, page_bytes)
                page = pages[page_index]
                if page is _WHOLE:  # its one object: the page is free again
                    ci = self._class_index_or_none(class_bytes)
                    free_pages.append(page_index)
                else:
                    ci = page.class_index
                    was_full = page.num_live == opp[ci]
                    page.num_live -= 1
                    if page.num_live == 0:  # empty: a free page keeps no _Page either
                        if not was_full:
                            self._unlink_partial(page_index)
                        pages[page_index] = _WHOLE
                        free_pages.append(page_index)
                    else:
                        page.free_objects.append(in_page // class_bytes)
                        if was_full:
                            self._link_partial(page_index)
                live_per_class[ci] -= 1
                left = per_tenant[slab.tenant] - class_bytes
                if left:
                    per_tenant[slab.tenant] = left
                else:
                    del per_tenant[slab.tenant]
                used += class_bytes
                requested += slab.nbytes
                n += 1
        finally:
            self._used_bytes -= used
            self._requested_bytes -= requested
            self.num_frees += n
            if ranges:
                self.memory.zero_ranges(ranges)

    def _free_whole_pages(self, slabs) -> bool:
        """``free_all`` when every slab is a distinct live handle of one class that fills
        a page and the memory queues its zeroing (the simulator's L2): the same
        bookkeeping with the per-object loop in C. False (nothing done) otherwise."""
        zero_ranges = getattr(self.memory, "zero_ranges", None)
        n = len(slabs)
        if zero_ranges is None or n == 0 or slabs[0].__class__ is not Slab:
            return False
        live = self._live
        class_bytes = slabs[0].class_bytes
        ci = bisect.bisect_left(self.size_classes, class_bytes)
        if ci == len(self.size_classes) or self.size_classes[ci] != class_bytes \
                or self._objects_per_page[ci] != 1:
            return False
        offsets = []
        pop = live.pop
        try:  # a plain loop: on Python 3.11 faster than the same checks through map()
            for s in slabs:  # each leaves the live map as it is checked (a slab listed
                offset = s.offset  # twice is not there the second time)
                got = pop(offset, None)
                if got is not s or s.class_bytes != class_bytes:
                    if got is not None:
                        live[offset] = got
                    break
                offsets.append(offset)
        except (AttributeError, TypeError):  # not a handle at all
            pass
        if len(offsets) < n:  # not all distinct live handles of the class: none is freed
            live.update(zip(offsets, slabs))
            return False
        zero_ranges(list(zip(offsets, repeat(class_bytes))))
        page_bytes = self.page_bytes
        # full (one object) to empty: the pages stay _WHOLE, nothing per page to change
        self._free_pages.extend([o // page_bytes for o in offsets])
        self._live_per_class[ci] -= n
        add_per_tenant(self._bytes_per_tenant, list(map(_tenant_of, slabs)), -class_bytes)
        self._used_bytes -= n * class_bytes
        self._requested_bytes -= sum(map(_nbytes_of, slabs))
        self.num_frees += n
        return True

    # -- access checks -----------------------------------------------------------------

    def is_live(self, slab: Slab) -> bool:
        return isinstance(slab, Slab) and self._live.get(slab.offset) == slab

    def check_access(self, tenant: str, slab: Slab) -> None:
        if slab.__class__ is Slab and self._live.get(slab.offset) is slab and slab.tenant == tenant:
            return  # the live handle itself, its own tenant: the common case, no more checks
        if not self.is_live(slab):
            self.num_denied += 1
            raise AccessDenied(f"tenant {tenant!r} denied: {_describe(slab)} is not a live slab "
                               f"of allocator {self.allocator_id}")
        if slab.tenant != tenant:
            self.num_denied += 1
            raise AccessDenied(f"tenant {tenant!r} denied access to the slab at offset "
                               f"{slab.offset} owned by tenant {slab.tenant!r}")

    def check_access_all(self, tenants: Sequence[str], slabs: Sequence[Slab]) -> None:
        """``check_access(tenants[i], slabs[i])`` for each pair, in order."""
        if not self.all_accessible(tenants, slabs):
            for tenant, slab in zip(tenants, slabs):
                self.check_access(tenant, slab)

    def all_accessible(self, tenants: Sequence[str], slabs: Sequence[Slab]) -> bool:
        """Whether ``check_access`` would pass for every pair; counts nothing, raises
        nothing (callers repeat the checks one by one when it says no)."""
        live = self._live
        slabs = slabs[: len(tenants)]  # as zip: the pairs there are
        try:  # the live handles themselves (identity), of these tenants; a plain loop
            for s, tenant in zip(slabs, tenants):  # (faster than map() on Python 3.11)
                if live.get(s.offset) is not s or s.tenant != tenant:
                    return False
            return True
        except (AttributeError, TypeError):  # not a handle at all
            return False

    # -- introspection -----------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Class bytes of live objects (``stats().used_bytes``, O(1))."""
        return self._used_bytes

    def stats(self) -> SlabStats:
        used = self._used_bytes
        free = self.capacity_bytes - used
        pages_used = len(self._pages) - len(self._free_pages)
        stranded = pages_used * self.page_bytes - used
        return SlabStats(
            capacity_bytes=self.capacity_bytes, used_bytes=used,
            requested_bytes=self._requested_bytes, free_bytes=free,
            internal_fragmentation=1 - self._requested_bytes / used if used else 0.0,
            external_fragmentation=stranded / free if free else 0.0,
            pages_free=self.num_pages - pages_used, pages_used=pages_used,
            live_per_class=dict(zip(self.size_classes, self._live_per_class)),
            bytes_per_tenant=dict(self._bytes_per_tenant),
            num_allocs=self.num_allocs, num_frees=self.num_frees, num_denied=self.num_denied)

    def live_slabs(self) -> tuple[Slab, ...]:
        return tuple(self._live.values())

    def audit(self) -> None:
        """Cross-check every free list and counter; raise AllocatorError on the first mismatch."""
        live_in_page: dict[int, set[int]] = {}
        for offset, slab in self._live.items():
            page_index, in_page = divmod(offset, self.page_bytes)
            page = self._pages[page_index] if page_index < len(self._pages) else None
            if page is _WHOLE:  # the page's one object: of a class as large as the page
                ci = self._class_index_or_none(slab.class_bytes)
                on_grid = ci is not None and self.size_classes[ci] == slab.class_bytes \
                    and self._objects_per_page[ci] == 1 and in_page == 0
            else:
                on_grid = page is not None \
                    and self.size_classes[page.class_index] == slab.class_bytes \
                    and not in_page % slab.class_bytes
            if not on_grid or offset + slab.class_bytes > self.capacity_bytes:
                raise AllocatorError(f"audit: {slab} does not sit on its page's object grid")
            live_in_page.setdefault(page_index, set()).add(in_page // slab.class_bytes)
        free_pages = set(self._free_pages)
        if len(free_pages) != len(self._free_pages):
            raise AllocatorError(f"audit: free-page stack has duplicates: {self._free_pages}")
        for ci, partial in enumerate(self._partial):
            for pos, page_index in enumerate(partial):
                page = self._pages[page_index]
                if page.partial_pos != pos or page.class_index != ci:
                    raise AllocatorError(f"audit: page {page_index} misfiled in class {ci} partial list")
        for page_index, page in enumerate(self._pages):
            live = live_in_page.get(page_index, set())
            if page is _WHOLE:  # free, or holding its one object
                if live != (set() if page_index in free_pages else {0}):
                    raise AllocatorError(f"audit: page {page_index} of one object is "
                                         f"inconsistent (live {sorted(live)}, "
                                         f"free {page_index in free_pages})")
                continue
            free = set(page.free_objects)
            per_page = self._objects_per_page[page.class_index]
            expect_partial = page_index not in free_pages and page.num_live < per_page
            if (page.num_live != len(live) or len(free) != len(page.free_objects)
                    or free & live or free | live != set(range(page.num_carved))
                    or (page_index in free_pages) != (page.num_live == 0)
                    or (page.partial_pos is not None) != expect_partial):
                raise AllocatorError(f"audit: page {page_index} bookkeeping is inconsistent "
                                     f"(live {sorted(live)}, free {page.free_objects}, "
                                     f"carved {page.num_carved}, num_live {page.num_live})")
        slabs = self._live.values()
        if (self._used_bytes != sum(s.class_bytes for s in slabs)
                or self._requested_bytes != sum(s.nbytes for s in slabs)):
            raise AllocatorError(f"audit: used/requested counters {self._used_bytes}/"
                                 f"{self._requested_bytes} disagree with the live slabs")

    # -- internals ---------------------------------------------------------------------

    def _class_index_or_none(self, nbytes: int) -> int | None:
        if nbytes <= 0 or nbytes > self._largest:
            return None
        return bisect.bisect_left(self.size_classes, nbytes)

    def _take_page(self, ci: int) -> int:
        if self._free_pages:
            page_index = self._free_pages.pop()
            self._pages[page_index] = _Page(ci)  # (a free page keeps none)
        elif len(self._pages) < self.num_pages:
            page_index = len(self._pages)
            self._pages.append(_Page(ci))
        else:
            raise CapacityError(
                f"arena full: {self._used_bytes} of {self.capacity_bytes} bytes used, no free "
                f"object of class {self.size_classes[ci]} bytes and no free page of "
                f"{self.page_bytes} bytes")
        self._link_partial(page_index)
        return page_index

    def _link_partial(self, page_index: int) -> None:
        page = self._pages[page_index]
        partial = self._partial[page.class_index]
        page.partial_pos = len(partial)
        partial.append(page_index)

    def _unlink_partial(self, page_index: int) -> None:
        # Swap-remove keeps this O(1): the last page takes the leaving page's position.
        page = self._pages[page_index]
        partial = self._partial[page.class_index]
        last = partial.pop()
        if last != page_index:
            partial[page.partial_pos] = last
            self._pages[last].partial_pos = page.partial_pos
        page.partial_pos = None

    def _require_live(self, slab: Slab) -> None:
        if not isinstance(slab, Slab):
            raise AllocatorError(f"expected a Slab handle, got {type(slab).__name__}")
        if slab.allocator_id != self.allocator_id:
            raise AllocatorError(f"foreign handle: {_describe(slab)} belongs to allocator "
                                 f"{slab.allocator_id}, not {self.allocator_id}")
        live = self._live.get(slab.offset)
        if live is None:
            raise AllocatorError(f"double free or use after free: {_describe(slab)} is not live")
        if live.generation != slab.generation:
            raise AllocatorError(f"stale handle: {_describe(slab)} was freed; the object at that "
                                 f"offset now has generation {live.generation}")
        if live != slab:
            raise AllocatorError(f"handle {slab} does not match the live slab {live}")


_tenant_of, _nbytes_of = attrgetter("tenant"), attrgetter("nbytes")
_new_slab = tuple.__new__  # builds a Slab without the named tuple's argument parsing


def add_per_tenant(per_tenant: dict, tenants: Sequence[str], nbytes: int) -> None:
    """``nbytes`` more for each entry of ``tenants`` (negative: fewer; a tenant left
    with none is removed), in one update when they are all one tenant."""
    if tenants.count(tenants[0]) == len(tenants):
        totals = {tenants[0]: nbytes * len(tenants)}
    else:
        totals = {}
        for t in tenants:
            totals[t] = totals.get(t, 0) + nbytes
    for t, delta in totals.items():
        left = per_tenant.get(t, 0) + delta
        if left:
            per_tenant[t] = left
        else:
            del per_tenant[t]


def _describe(slab: object) -> str:
    if isinstance(slab, Slab):
        return f"slab at offset {slab.offset} (generation {slab.generation})"
    return f"a {type(slab).__name__}"
