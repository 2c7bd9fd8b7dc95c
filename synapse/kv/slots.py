"""A compacting slot arena: the L1 allocator of the KV engine.

Every slot holds one block in one format (fp16), so the arena is a run of equal slots
and the live blocks are always slots ``[0, num_live)``: a layer's keys are a *view* of
the arena's front, the live bytes are a prefix (the virtual-memory arena maps exactly
the pages that prefix touches), and the block table of the attention kernel is implied
by the slot index. Freeing a block leaves a hole that the last live slots fill; the
arena records each such move as a relocation ``(slot, from_offset, to_offset)`` that the
caller must carry out on the bytes (one batched device copy) before anything reads or
writes the arena again. Attention over a set of past keys does not depend on their
order, so compaction is exact.

One slot can be kept last (``keep_last``): the partial tail block of a sequence, whose
unfilled tokens must sit after every full block for the causal view to stay a prefix.
Blocks allocated after it push it to the new end (one more relocation).

Operations (n = live slots, k = slots freed or allocated):
- ``allocate_prefix(sizes, tenants)`` O(k): new slots at the end, while they fit
- ``free_all(slots)``                  O(k): holes filled from the end (relocations)
- ``take_relocations()``               the moves to carry out, oldest first
- ``keep_last(slot)``                  pin a slot to the end (or release with None)
- ``check_access`` / ``all_accessible`` / ``is_live`` / ``stats``: as the slab allocator
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections import deque
from itertools import repeat
from operator import attrgetter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import AccessDenied, AllocatorError, CapacityError
from ..hw.slab import add_per_tenant


_tenant_of = attrgetter("tenant")


def zero_runs(ranges, keep, slot_bytes: int) -> list[tuple[int, int]]:
    """The slots that ``(offset, nbytes)`` ranges cover, less the slots at offsets
    ``keep``, as maximal runs of adjacent slots ``(offset, nbytes)``, ascending. Works on
    intervals (a range is a run of slots, a kept slot cuts one): a compaction's freed
    tail is one range of up to hundreds of slots, which a set of slot indices walked
    one by one paid for slot by slot."""
    sb = slot_bytes
    merged: list[list[int]] = []  # [first slot, end slot) of overlapping or touching ranges
    for lo, hi in sorted((off // sb, (off + n) // sb) for off, n in ranges):
        if hi <= lo:
            continue
        if merged and lo <= merged[-1][1]:
            if hi > merged[-1][1]:
                merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    cuts = sorted({o // sb for o in keep})
    out: list[tuple[int, int]] = []
    for lo, hi in merged:
        if cuts:
            for c in cuts[bisect_left(cuts, lo):bisect_left(cuts, hi)]:
                if c > lo:
                    out.append((lo * sb, (c - lo) * sb))
                lo = c + 1
        if hi > lo:
            out.append((lo * sb, (hi - lo) * sb))
    return out


class Slot:
    """Handle to one live slot. Mutable: compaction changes ``offset`` in place, so a
    move planned earlier still names the block's current bytes. ``block`` is the page
    table's id for the block in it (set when the page table records the handle)."""

    __slots__ = ("offset", "nbytes", "class_bytes", "tenant", "allocator_id", "generation",
                 "_block", "index")
    assigned = 0  # bumped whenever any slot learns its block: ``SlotArena.blocks`` keys on it

    def __init__(self, index, nbytes, tenant, allocator_id, generation):
        self.index = index
        self.offset = index * nbytes
        self.nbytes = self.class_bytes = nbytes
        self.tenant = tenant
        self.allocator_id = allocator_id
        self.generation = generation
        self._block = -1

    @property
    def block(self) -> int:
        return self._block

    @block.setter
    def block(self, b: int) -> None:
        self._block = b
        Slot.assigned += 1

    def __repr__(self) -> str:
        return f"Slot(index={self.index}, offset={self.offset}, tenant={self.tenant!r}, block={self.block})"


@dataclass(frozen=True)
class SlotStats:
    capacity_bytes: int
    used_bytes: int
    requested_bytes: int
    free_bytes: int
    internal_fragmentation: float
    external_fragmentation: float
    live_slots: int
    capacity_slots: int
    bytes_per_tenant: dict
    num_allocs: int
    num_frees: int
    num_denied: int
    num_relocations: int


class SlotArena:
    """Equal slots over one memory, compacted at the front; see the module docstring."""

    _ids = itertools.count(1 << 20)

    def __init__(self, memory, slot_bytes: int, *, zero_on_init: bool = True,
                 zero_on_free: bool = True, capacity_slots: int | None = None,
                 max_slots: int | None = None) -> None:
        """``max_slots`` above the memory's slots: the arena grows (doubling, through
        ``memory.resize``) as allocations need it, up to that many slots."""
        if slot_bytes <= 0:
            raise CapacityError(f"slot_bytes must be positive, got {slot_bytes}")
        cap = memory.nbytes // slot_bytes if capacity_slots is None else capacity_slots
        if cap <= 0 or cap * slot_bytes > memory.nbytes:
            raise CapacityError(f"arena of {memory.nbytes} bytes cannot hold "
                                f"{max(cap, 1)} slots of {slot_bytes} bytes")
        self.memory = memory
        self.slot_bytes = slot_bytes
        self.size_classes = (slot_bytes,)
        self.capacity_slots = cap
        self.capacity_bytes = cap * slot_bytes
        self.max_slots = max(cap, max_slots or cap)
        self.allocator_id = next(SlotArena._ids)
        self.slots: list[Slot] = []  # slot order: slots[i].index == i
        self._last: Slot | None = None
        self._pending: dict[int, tuple[Slot, int, int]] = {}  # id(slot) -> relocation
        # slots allocated since take_relocations (freed ones too: their index is -1); a
        # slot is one of them when its generation is above ``_fresh_after`` (a list and a
        # watermark: a dict by id cost a pass over every new slot and every freed one)
        self._fresh: list[Slot] = []
        self._fresh_after = 0
        self.zero_on_free = zero_on_free
        self.version = 0  # bumped by every change of the slot order
        self._blocks, self._blocks_version = np.zeros(0, np.int64), -1
        self._zero: list[tuple[int, int]] = []  # freed byte ranges owed a memset
        self._bytes_per_tenant: dict[str, int] = {}
        self._generation = 0
        self.num_allocs = self.num_frees = self.num_denied = self.num_relocations = 0
        # a memory that maps pages on demand (synapse.kv.vmm) follows the live prefix
        self._extent = getattr(memory, "extent", None)
        if zero_on_init and self._extent is None:  # mapped pages are zeroed as they come
            memory.zero(0, self.capacity_bytes)

    # -- queries ----------------------------------------------------------------------
    @property
    def num_live(self) -> int:
        return len(self.slots)

    @property
    def used_bytes(self) -> int:
        return len(self.slots) * self.slot_bytes

    def blocks(self) -> np.ndarray:
        """The page-table id of the block in each slot, in slot order (recomputed only
        after the arena changed: most decode steps change nothing)."""
        key = (self.version, Slot.assigned)
        if self._blocks_version != key:
            self._blocks = np.fromiter((s._block for s in self.slots), np.int64, len(self.slots))
            self._blocks_version = key
        return self._blocks

    def can_allocate(self, nbytes: int) -> bool:
        return nbytes == self.slot_bytes and len(self.slots) < self.max_slots

    def can_allocate_all(self, sizes: Sequence[int]) -> bool:
        sb = self.slot_bytes
        same = sizes.count(sb) == len(sizes) if sizes.__class__ is list \
            else all(n == sb for n in sizes)  # (a list's count runs in C)
        return same and len(self.slots) + len(sizes) <= self.max_slots

    def is_live(self, slot) -> bool:
        return isinstance(slot, Slot) and slot.allocator_id == self.allocator_id \
            and slot.index < len(self.slots) and self.slots[slot.index] is slot

    # -- allocate / free --------------------------------------------------------------
    def allocate(self, nbytes: int, tenant: str) -> Slot:
        got = self.allocate_prefix((nbytes,), (tenant,))
        if not got:
            if nbytes != self.slot_bytes:
                raise CapacityError(f"a slot arena holds blocks of {self.slot_bytes} bytes; "
                                    f"asked for {nbytes}")
            raise CapacityError(f"arena full: {len(self.slots)} of {self.capacity_slots} slots "
                                f"of {self.slot_bytes} bytes in use")
        return got[0]

    def allocate_prefix(self, sizes: Sequence[int], tenants: Sequence[str]) -> list[Slot]:
        """New slots at the end, in order, stopping at the first that does not fit (a
        size other than the slot's, or no slot left). A slot kept last moves behind them."""
        slots, sb, aid = self.slots, self.slot_bytes, self.allocator_id
        if len(slots) + len(sizes) > self.capacity_slots and self.max_slots > self.capacity_slots:
            self._grow(len(slots) + len(sizes))
        room = self.capacity_slots - len(slots)
        n = min(len(sizes), len(tenants))
        if sizes[:n].count(sb) == n:  # every size is the slot's (the common case)
            k = min(n, max(room, 0))
        else:
            k = 0
            for nbytes, _ in zip(sizes, tenants):
                if nbytes != sb or k >= room:
                    break
                k += 1
        n0, g0 = len(slots), self._generation
        out = list(map(Slot, range(n0, n0 + k), repeat(sb), tenants[:k], repeat(aid),
                       range(g0 + 1, g0 + 1 + k)))
        self._generation = g0 + k
        slots.extend(out)
        self._fresh.extend(out)
        per_tenant = self._bytes_per_tenant
        if k:
            add_per_tenant(per_tenant, tenants[:k], sb)
        self.num_allocs += k
        self.version += 1
        if out and self._last is not None:
            self._swap(self._last, slots[-1])
        if out and self._extent is not None:
            self._extent(len(slots) * sb)
        return out

    def free(self, slot: Slot) -> None:
        self.free_all((slot,))

    def _grow(self, need: int) -> None:
        cap = min(self.max_slots, max(need, 2 * self.capacity_slots))
        self.memory.resize(cap * self.slot_bytes)  # keeps the live bytes
        self.capacity_slots, self.capacity_bytes = cap, cap * self.slot_bytes

    def free_all(self, slots: Sequence[Slot]) -> None:
        """Free each slot; the holes are filled by the last live slots (relocations), a
        slot kept last stays last, and the bytes past the new end are zeroed."""
        if not slots:
            return
        live = self.slots
        n_old, aid, sb = len(live), self.allocator_id, self.slot_bytes
        holes = self._holes_if_all_live(slots)
        if holes is not None:  # every slot live and distinct: the checks ran in C
            add_per_tenant(self._bytes_per_tenant, list(map(_tenant_of, slots)), -sb)
            freed = {}  # counted already
        else:
            holes = set()
            freed = {}  # bytes per tenant
            for s in slots:  # every check before any change (is_live, inline)
                if not (isinstance(s, Slot) and s.allocator_id == aid and s.index < n_old
                        and live[s.index] is s):
                    self._require_live(s)
                if s.index in holes:
                    raise AllocatorError(f"double free of {s!r}")
                holes.add(s.index)
                freed[s.tenant] = freed.get(s.tenant, 0) + sb
        per_tenant = self._bytes_per_tenant
        for tenant, nbytes in freed.items():
            left = per_tenant[tenant] - nbytes
            if left:
                per_tenant[tenant] = left
            else:
                del per_tenant[tenant]
        pending = self._pending
        if pending:
            deque(map(pending.pop, map(id, slots), repeat(None)), 0)
        if self._last is not None and self._last.index in holes:
            self._last = None
        n_new = n_old - len(holes)
        # holes below n_new are filled from the end, in place (the slots moved come from
        # at or past n_new, the places they go to are below it), then the end is cut off
        targets = iter(sorted(i for i in holes if i < n_new))
        for i in range(n_new, n_old):
            if i not in holes:
                to = next(targets)
                s = live[to] = live[i]
                self._move(s, to)
        del live[n_new:]
        for s in slots:  # a plain loop: attribute stores beat map(setattr, ...)
            s.index = -1
        if self._last is not None and self._last.index != n_new - 1:
            self._swap(self._last, live[n_new - 1])
        self.num_frees += len(slots)
        self.version += 1
        if self.zero_on_free:  # after the relocations have read it: see take_relocations
            self._zero.append((n_new * self.slot_bytes, (n_old - n_new) * self.slot_bytes))
        if self._extent is not None:  # pages past the end go once the relocations are done
            self._extent(n_new * self.slot_bytes)

    def _holes_if_all_live(self, slots: Sequence) -> set | None:
        """The slot indices of ``slots`` if every one is a distinct live slot of this
        arena (then nothing more needs checking), else None: the caller checks one by
        one, to raise the right error."""
        live = self.slots
        idx = []
        try:  # a plain loop: on Python 3.11 faster than the same checks through map()
            for s in slots:
                i = s.index
                if i < 0 or live[i] is not s:
                    return None
                idx.append(i)
        except (AttributeError, IndexError, TypeError):
            return None
        holes = set(idx)
        return holes if len(holes) == len(idx) else None

    def keep_last(self, slot: Slot | None) -> None:
        """Keep ``slot`` at the end of the live slots from now on (None: no slot). If it
        is not last now, it trades places with the last slot."""
        if slot is not None and not self.is_live(slot):
            self._require_live(slot)
        self._last = slot
        if slot is not None and slot.index != len(self.slots) - 1:
            self._swap(slot, self.slots[-1])

    def owes(self) -> bool:
        """Whether ``take_relocations`` or ``take_zero`` has anything to hand out or to
        forget (relocations, ranges to zero, slots allocated since the last call): when
        not, both calls would change nothing, and the caller may skip them."""
        return bool(self._pending or self._fresh or self._zero)

    def take_relocations(self) -> list[tuple[Slot, int, int]]:
        """The byte moves that bring memory in line with the bookkeeping since the last
        call, as ``(slot, from_offset, to_offset)``. Sources are offsets before the batch
        and distinct, so the caller gathers every source, then scatters (one batched
        copy). Slots allocated since the last call hold no bytes yet and never appear.

        Freed bytes are zeroed only after that copy has read them (they may be a
        relocation's source): ``take_zero`` gives the ranges, in the same batch."""
        self._fresh_after = self._generation
        if not self._pending:  # the common case: nothing moved
            self._fresh.clear()
            return []
        out = list(self._pending.values())
        # a new slot placed where a relocated block's bytes were reads them until zeroed
        sources = {src for _, src, _ in out}
        for s in self._fresh:
            if s.index >= 0 and s.offset in sources:  # (a freed one reads nothing)
                self._zero.append((s.offset, self.slot_bytes))
        self._pending = {}
        self._fresh = []
        self.num_relocations += len(out)
        return [r for r in out if r[1] != r[2]]

    def rekey(self) -> None:
        """After a deep copy of the arena: key the pending relocations by the copied
        slots (their ids are new)."""
        self._pending = {id(r[0]): r for r in self._pending.values()}

    def take_zero(self, keep: Sequence[int] = ()) -> list[tuple[int, int]]:
        """Freed ``(offset, nbytes)`` ranges owed a memset (zero-on-free), merged where
        they touch, less the slots at offsets ``keep`` (the destinations of this batch's
        relocations, which their copy overwrites whole). Zeroed after the relocation copy
        has read its sources and before anything else writes the arena."""
        ranges, self._zero = self._zero, []
        if not ranges:
            return []
        return zero_runs(ranges, keep, self.slot_bytes)

    def _swap(self, a: Slot, b: Slot) -> None:
        if a is b:
            return
        ia, ib = a.index, b.index
        self.slots[ia], self.slots[ib] = b, a
        self._move(a, ib)
        self._move(b, ia)

    def _move(self, s: Slot, to: int) -> None:
        """``s`` is now at slot ``to``; remember where its bytes were before this batch."""
        self.version += 1
        if s.generation <= self._fresh_after:  # not a new slot (those hold no bytes yet)
            first = self._pending.get(id(s))
            src = first[1] if first is not None else s.offset
            self._pending[id(s)] = (s, src, to * self.slot_bytes)
        s.index, s.offset = to, to * self.slot_bytes

    # -- access checks ----------------------------------------------------------------
    def check_access(self, tenant: str, slot) -> None:
        if not self.is_live(slot):
            self.num_denied += 1
            raise AccessDenied(f"tenant {tenant!r} denied: {slot!r} is not a live slot of "
                               f"arena {self.allocator_id}")
        if slot.tenant != tenant:
            self.num_denied += 1
            raise AccessDenied(f"tenant {tenant!r} denied access to the slot at offset "
                               f"{slot.offset} owned by tenant {slot.tenant!r}")

    def check_access_all(self, tenants, slots) -> None:
        if not self.all_accessible(tenants, slots):
            for t, s in zip(tenants, slots):
                self.check_access(t, s)

    def all_accessible(self, tenants, slots) -> bool:
        live = self.slots
        slots = slots[: len(tenants)]  # as zip: the pairs there are
        try:  # live slots of this arena (identity at their index), of these tenants
            for s, tenant in zip(slots, tenants):
                i = s.index
                if i < 0 or live[i] is not s or s.tenant != tenant:
                    return False
            return True
        except (AttributeError, IndexError, TypeError):
            return False

    # -- introspection ----------------------------------------------------------------
    def stats(self) -> SlotStats:
        used = self.used_bytes
        return SlotStats(self.capacity_bytes, used, used, self.capacity_bytes - used, 0.0, 0.0,
                         len(self.slots), self.capacity_slots, dict(self._bytes_per_tenant),
                         self.num_allocs, self.num_frees, self.num_denied, self.num_relocations)

    def live_slabs(self) -> tuple[Slot, ...]:
        return tuple(self.slots)

    def audit(self) -> None:
        for i, s in enumerate(self.slots):
            if s.index != i or s.offset != i * self.slot_bytes:
                raise AllocatorError(f"audit: {s!r} is not at slot {i}")
        if self._last is not None and self.slots and self.slots[-1] is not self._last:
            raise AllocatorError(f"audit: the kept-last slot {self._last!r} is not last")
        per = {}
        for s in self.slots:
            per[s.tenant] = per.get(s.tenant, 0) + self.slot_bytes
        if per != self._bytes_per_tenant:
            raise AllocatorError("audit: bytes per tenant drifted")

    def _require_live(self, slot) -> None:
        if not isinstance(slot, Slot):
            raise AllocatorError(f"expected a Slot handle, got {type(slot).__name__}")
        if slot.allocator_id != self.allocator_id:
            raise AllocatorError(f"foreign handle: {slot!r} belongs to arena {slot.allocator_id}, "
                                 f"not {self.allocator_id}")
        raise AllocatorError(f"double free or use after free: {slot!r} is not live")
