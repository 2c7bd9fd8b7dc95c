"""The page table: one row per block id, recording tier, format, size and owner.

Columns are NumPy arrays indexed by block id so that policies and drivers can work on
thousands of blocks at once (masks, sums, argpartition) instead of looping in Python.
Operations: ``add`` (new ids, placed in a tier), ``move`` (change tier/format/size),
``drop`` and ``free`` (leave the tiers, counted), ``ids_in``/``bytes_in`` (queries) and
``check`` (the invariants, used by tests and by the scenario option ``check_invariants``).

Invariant: every LIVE block is in exactly one tier (L1 or L2); a block that left the
tiers did so through ``drop`` or ``free`` and is counted there.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Iterable, Sequence

import numpy as np

from .blocks import BlockSpec, Fmt, Kind, State, Tier
from .kv.slots import Slot

_LIVE = int(State.LIVE)  # plain ints on the hot path: enum attribute access is slow
_L1 = int(Tier.L1)
_NONE = int(Tier.NONE)
_offset_of = attrgetter("offset")


def _int8_column(values: Sequence) -> np.ndarray:
    """Enum members (or ints) as an int8 array; one conversion when they are all one."""
    n = len(values)
    if n and values.count(values[0]) == n:
        return np.full(n, int(values[0]), np.int8)
    return np.fromiter(values, np.int8, n)


class PageTable:
    def __init__(self, initial_capacity: int = 1024):
        self._n = 0
        cap = max(16, initial_capacity)
        self.tier = np.zeros(cap, np.int8)
        self.state = np.zeros(cap, np.int8)
        self.fmt = np.zeros(cap, np.int8)
        self.kind = np.zeros(cap, np.int8)
        self.nbytes = np.zeros(cap, np.int64)
        self.owner = np.zeros(cap, np.int64)
        self.tenant = np.zeros(cap, np.int32)
        self.layer = np.zeros(cap, np.int32)
        self.token_start = np.zeros(cap, np.int64)
        self.token_end = np.zeros(cap, np.int64)
        self.offset = np.full(cap, -1, np.int64)  # the handle's byte offset, for vector ops
        self.content_hash: list[str] = []
        self.handle: list[object | None] = []  # the slab (or ring slot) holding the bytes
        self.tenants: list[str] = []
        self._tenant_index: dict[str, int] = {}
        self._bytes = {Tier.L1: 0, Tier.L2: 0}
        self.num_dropped = 0
        self.num_freed = 0
        self._version = 0  # bumped by every change of the tier column (ids_in's cache key)
        self._ids_in: dict[int, tuple[int, np.ndarray]] = {}

    # -- growth -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def _grow(self, need: int) -> None:
        cap = len(self.tier)
        if need <= cap:
            return
        new = max(need, cap * 2)
        for name in ("tier", "state", "fmt", "kind", "nbytes", "owner", "tenant", "layer",
                     "token_start", "token_end", "offset"):
            old = getattr(self, name)
            arr = np.zeros(new, old.dtype)
            arr[:cap] = old
            setattr(self, name, arr)

    def tenant_id(self, name: str) -> int:
        if name not in self._tenant_index:
            self._tenant_index[name] = len(self.tenants)
            self.tenants.append(name)
        return self._tenant_index[name]

    # -- mutation -----------------------------------------------------------------
    def add(self, specs: Sequence[BlockSpec], tier: Tier, handles: Sequence[object]) -> np.ndarray:
        """Register new blocks, already placed in ``tier`` with the given handles."""
        k = len(specs)
        lo, hi = self._n, self._n + k
        self._grow(hi)
        ids = np.arange(lo, hi, dtype=np.int64)
        self._version += 1
        self.tier[lo:hi] = tier
        self.state[lo:hi] = State.LIVE
        if k:
            nbytes = [s.nbytes for s in specs]
            self.fmt[lo:hi] = [s.fmt for s in specs]
            self.kind[lo:hi] = [s.kind for s in specs]
            self.nbytes[lo:hi] = nbytes
            self.owner[lo:hi] = [s.owner for s in specs]
            self.tenant[lo:hi] = [self.tenant_id(s.tenant) for s in specs]
            self.layer[lo:hi] = [s.layer for s in specs]
            self.token_start[lo:hi] = [s.token_start for s in specs]
            self.token_end[lo:hi] = [s.token_end for s in specs]
            self.content_hash.extend(s.content_hash for s in specs)
            self.handle.extend(handles[:k])
            self.offset[lo:hi] = [getattr(h, "offset", -1) for h in handles[:k]]
            slots = 0
            for b, h in zip(range(lo, hi), handles[:k]):
                if h.__class__ is Slot:
                    h._block = b  # as in move_all: Slot.block's setter, once for the batch
                    slots += 1
            if slots:
                Slot.assigned += 1
            self._bytes[tier] += int(sum(nbytes))
        self._n = hi
        return ids

    def move(self, block: int, tier: Tier, fmt: Fmt, nbytes: int, handle: object) -> None:
        """The block's bytes now live in ``tier`` (possibly re-encoded)."""
        if not (0 <= block < self._n) or self.state[block] != _LIVE:
            raise KeyError(f"block {block} is not live")
        self._bytes[int(self.tier[block])] -= int(self.nbytes[block])
        self._version += 1
        self.tier[block] = tier
        self.fmt[block] = fmt
        self.nbytes[block] = nbytes
        self.handle[block] = handle
        if handle.__class__ is Slot:
            handle.block = block
        self.offset[block] = handle.offset
        self._bytes[tier] += nbytes

    def move_all(self, blocks: Sequence[int], tiers: Sequence[Tier], fmts: Sequence[Fmt],
                 nbytes: Sequence[int], handles: Sequence[object],
                 ids: np.ndarray | None = None) -> None:
        """``move`` for each block at once (distinct blocks, all live); ``ids``: the
        blocks as an int64 array, where the caller has one."""
        ids = np.asarray(blocks, np.int64) if ids is None else ids
        self._require_all_live(ids)
        # fromiter: an enum member is an int to NumPy only through Python, and fromiter
        # with a count converts one several times faster than asarray on a list
        n = len(tiers)
        one_tier = n and tiers.count(tiers[0]) == n  # a batch of one kind (the common case)
        new_bytes = np.asarray(nbytes, np.int64)
        self._account(self.tier[ids], self.nbytes[ids], -1)
        if one_tier:  # what _account adds, without the masks
            self._bytes[Tier.L1 if int(tiers[0]) == _L1 else Tier.L2] += int(new_bytes.sum())
            tiers = int(tiers[0])
        else:
            tiers = _int8_column(tiers)
            self._account(tiers, new_bytes, +1)
        self._version += 1
        self.tier[ids] = tiers
        self.fmt[ids] = _int8_column(fmts)
        self.nbytes[ids] = new_bytes
        handle = self.handle
        kinds = set(map(type, handles))
        if kinds == {Slot}:  # Slot.block's setter, once for the batch (its counter below)
            for b, h in zip(blocks, handles):  # one plain loop: item and attribute stores
                handle[b] = h                  # beat map(__setitem__ / setattr, ...)
                h._block = b
            Slot.assigned += 1
        else:
            for b, h in zip(blocks, handles):
                handle[b] = h
            if Slot in kinds:
                for b, h in zip(blocks, handles):
                    if h.__class__ is Slot:
                        h._block = b
                Slot.assigned += 1
        self.offset[ids] = np.fromiter(map(_offset_of, handles), np.int64, len(handles))

    def move_batch(self, ids: np.ndarray, blocks: list, src_tier: Tier, tier: Tier,
                   fmts: Sequence[Fmt], nbytes: int, handles: Sequence[object]) -> None:
        """``move_all`` for blocks that all go from ``src_tier`` to one tier at one size (a
        ``MoveBatch``), ``handles`` all of one allocator: the same columns, without the
        passes over the handles that find their types and sizes. ``ids`` are block ids
        the manager planned (non-negative, below ``len(self)``)."""
        # every block in src_tier (L1 or L2) is live (the invariant ``check`` asserts):
        # one comparison checks both and leaves one byte count to subtract
        if (self.tier[ids] == int(src_tier)).all():
            src = Tier.L1 if int(src_tier) == _L1 else Tier.L2
            self._bytes[src] -= int(self.nbytes[ids].sum())
        else:
            self._require_all_live(ids)  # raises, naming the first block that is not live
            self._account(self.tier[ids], self.nbytes[ids], -1)
        n = len(ids)
        self._bytes[Tier.L1 if int(tier) == _L1 else Tier.L2] += nbytes * n
        self._version += 1
        self.tier[ids] = int(tier)
        f0 = fmts[0] if n else 0
        self.fmt[ids] = int(f0) if fmts.count(f0) == n else np.fromiter(fmts, np.int8, n)
        self.nbytes[ids] = nbytes
        handle = self.handle
        if handles and handles[0].__class__ is Slot:  # (one allocator: all Slots or none)
            for b, h in zip(blocks, handles):  # as in move_all
                handle[b] = h
                h._block = b
            Slot.assigned += 1
        else:
            for b, h in zip(blocks, handles):
                handle[b] = h
        self.offset[ids] = np.fromiter(map(_offset_of, handles), np.int64, len(handles))

    def relocate(self, blocks: Sequence[int], handles: Sequence[object]) -> None:
        """A compacting allocator moved these blocks' bytes: record their new offsets
        (the handles are the same objects, already updated)."""
        self.offset[np.asarray(blocks, np.int64)] = [h.offset for h in handles]

    def drop_all(self, blocks: Sequence[int]) -> None:
        """``drop`` for each block at once (distinct blocks, all live)."""
        ids = np.asarray(blocks, np.int64)
        self._leave_all(ids, State.DROPPED)
        self.num_dropped += len(ids)

    def _account(self, tiers: np.ndarray, nbytes: np.ndarray, sign: int) -> None:
        in_l1 = tiers == _L1
        l1 = int(nbytes[in_l1].sum())
        self._bytes[Tier.L1] += sign * l1
        self._bytes[Tier.L2] += sign * (int(nbytes.sum()) - l1)  # live blocks: L1 or L2

    def _require_all_live(self, ids: np.ndarray) -> None:
        if len(ids) == 0 or (ids.min() >= 0 and ids.max() < self._n
                             and (self.state[ids] == _LIVE).all()):
            return
        ok = (ids >= 0) & (ids < self._n)
        ok[ok] = self.state[ids[ok]] == _LIVE
        if not ok.all():
            raise KeyError(f"block {int(ids[~ok][0])} is not live")

    def _leave_all(self, ids: np.ndarray, state: State) -> None:
        self._require_all_live(ids)
        self._account(self.tier[ids], self.nbytes[ids], -1)
        self._version += 1
        self.tier[ids] = _NONE
        self.state[ids] = int(state)
        for b in ids.tolist():
            self.handle[b] = None
        self.offset[ids] = -1

    def drop(self, block: int) -> None:
        """Leave the tiers on purpose (no lower tier to demote to); counted."""
        self._leave(block, State.DROPPED)
        self.num_dropped += 1

    def free(self, block: int) -> None:
        """The owner released the block."""
        self._leave(block, State.FREED)
        self.num_freed += 1

    def _leave(self, block: int, state: State) -> None:
        self._require_live(block)
        self._bytes[Tier(self.tier[block])] -= int(self.nbytes[block])
        self._version += 1
        self.tier[block] = Tier.NONE
        self.state[block] = state
        self.handle[block] = None
        self.offset[block] = -1

    def _require_live(self, block: int) -> None:
        if not (0 <= block < self._n) or self.state[block] != State.LIVE:
            raise KeyError(f"block {block} is not live")

    # -- queries ------------------------------------------------------------------
    def ids_in(self, tier: Tier, owner: int | None = None) -> np.ndarray:
        """Ids of the blocks in ``tier`` (of one ``owner``), ascending. Without an owner
        the answer is kept until the tier column changes (read-only: it is shared)."""
        t = int(tier)  # a plain int: NumPy probes an IntEnum slowly
        if owner is None:
            hit = self._ids_in.get(t)
            if hit is not None and hit[0] == self._version:
                return hit[1]
        mask = self.tier[: self._n] == t
        if owner is not None:
            mask &= self.owner[: self._n] == owner
            return mask.nonzero()[0]
        ids = mask.nonzero()[0]
        ids.flags.writeable = False
        self._ids_in[t] = (self._version, ids)
        return ids

    def is_ids_in(self, ids: np.ndarray, tier: Tier) -> bool:
        """Whether ``ids`` is the array ``ids_in(tier)`` returns now (the same object,
        and the tier column unchanged since): then every id in it is in ``tier``."""
        hit = self._ids_in.get(int(tier))
        return hit is not None and hit[1] is ids and hit[0] == self._version

    def bytes_in(self, tier: Tier) -> int:
        return self._bytes[tier]

    def is_live(self, ids: np.ndarray) -> np.ndarray:
        return self.state[ids] == State.LIVE

    def live_ids(self) -> np.ndarray:
        return np.flatnonzero(self.state[: self._n] == State.LIVE)

    def where(self, block: int) -> Tier:
        return Tier(self.tier[block])

    # -- invariants ---------------------------------------------------------------
    def check(self, expected_live: Iterable[int] | None = None) -> None:
        """Raise AssertionError if the table is inconsistent (an internal bug, not user input)."""
        n = self._n
        live = self.state[:n] == State.LIVE
        placed = np.isin(self.tier[:n], (Tier.L1, Tier.L2))
        assert np.array_equal(live, placed), "a live block is not in exactly one tier"
        for tier in (Tier.L1, Tier.L2):
            total = int(self.nbytes[:n][self.tier[:n] == tier].sum())
            assert total == self._bytes[tier], f"{tier.name} byte count drifted"
        for i in np.flatnonzero(live):
            assert self.handle[i] is not None, f"live block {i} has no handle"
        if expected_live is not None:
            missing = set(expected_live) - set(np.flatnonzero(live).tolist())
            assert not missing, f"blocks lost: {sorted(missing)[:10]}"

    def lost_blocks(self, expected_live: Iterable[int]) -> int:
        """Blocks the caller still owns that are no longer in any tier (must be 0)."""
        exp = np.fromiter(expected_live, np.int64)
        if exp.size == 0:
            return 0
        return int((self.state[exp] != State.LIVE).sum())


__all__ = ["PageTable", "Tier", "State", "Fmt", "Kind", "BlockSpec"]
