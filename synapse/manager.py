"""The tier manager: owns the page table and the tiers' allocators, asks the policy to
rank, and returns the moves that must happen. It does no I/O: a driver turns moves into
backend ops (``mover.py``) and reports back with ``commit`` or ``abort``.

Operations:
- ``insert``        new blocks into L1 (space must have been made)
- ``fits``          whether blocks of these sizes can be allocated in L1 now
- ``make_room``     forced victims so that ``fits`` becomes true (demote or drop)
- ``plan_fetch``    L2 -> L1 for blocks needed now (demand) or predicted (prefetch)
- ``plan_background``  demotion down to the low watermark, then prefetch into headroom
- ``commit`` / ``abort``  apply or undo in-flight moves once their ops finished or failed
- ``release``       the owner is done with blocks
- ``take_relocations``  byte moves a compacting L1 (``synapse.kv.slots``) owes after frees
A move keeps both its source and destination allocated until it is committed, so no byte
range is reused while a copy may still read it.

The manager is the only door to the tiers: drivers and the transformers cache read the
page table through it and change it only through these verbs (``touch``, ``observe``,
``record_reads``, ``extend``, ``evictable``, ``evict``), never through its privates
(tests/test_layering.py checks the rule).

L1 holds blocks in full precision only: a block fetched from an INT4 L2 is dequantized on
its way in (through an INT4 staging slot on the device), as it is quantized on its way out.
"""

from __future__ import annotations

import functools
import math
import time
from operator import attrgetter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .blocks import BlockSpec, Fmt, Tier
from .errors import CapacityError
from .moves import Move, MoveBatch, _new_move
from .page_table import PageTable
from .policy import Demotion, EvictionPolicy, KVPrefetch, Watermarks

_FMT = {int(f): f for f in Fmt}  # int -> Fmt without the enum call (slow on the hot path)
# Enum members as module constants: ``Tier.L1`` costs an attribute lookup through the enum
# metaclass, several times a dict lookup, and the loops below run once per block moved.
_T_NONE, _T_L1, _T_L2, _FP16, _INT4 = Tier.NONE, Tier.L1, Tier.L2, Fmt.FP16, Fmt.INT4


_tenant_of = attrgetter("tenant")  # of a slab or a slot
_nbytes_of = attrgetter("nbytes")


@dataclass
class Counters:
    l1_hits: int = 0
    l2_hits: int = 0
    misses: int = 0
    evictions: int = 0
    demotions: int = 0
    drops: int = 0
    fetches: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    refusals: int = 0
    forced_evictions: int = 0


@dataclass
class DecisionLog:
    """Every placement decision, in order: what parity tests and ``compare`` diff."""

    entries: list = field(default_factory=list)

    def add(self, step: int, action: str, ids) -> None:
        if ids.__class__ is list and set(map(type, ids)) <= {int}:
            ids = list(ids)  # the manager's own lists of ids: already plain ints
        elif isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
            ids = ids.reshape(-1).tolist()
        else:
            ids = [int(i) for i in np.atleast_1d(ids)]
        if ids:
            self.entries.append((int(step), action, ids))

    def add_ints(self, step: int, action: str, ids: list) -> None:
        """``add`` for a list of plain ints (the manager's own, from ``tolist``): the
        same entry, without checking the type of each id."""
        if ids:
            self.entries.append((int(step), action, list(ids)))


class Spaces:
    """The allocators of one run: L1 (device budget), L2 (pinned pool), INT4 staging."""

    def __init__(self, l1, l2, staging=None):
        self.l1, self.l2, self.staging = l1, l2, staging

    def of(self, tier: Tier):
        return self.l1 if tier == _T_L1 else self.l2


def can_allocate_all(alloc, sizes: Sequence[int]) -> bool:
    """Whether every size can be allocated at once (objects in partial pages, then pages)."""
    if hasattr(alloc, "can_allocate_all"):
        return alloc.can_allocate_all(sizes)
    need: dict[int, int] = {}
    for n in sizes:
        ci = alloc._class_index_or_none(int(n))
        if ci is None:
            return False
        need[ci] = need.get(ci, 0) + 1
    pages = len(alloc._free_pages) + alloc.num_pages - len(alloc._pages)
    for ci, k in need.items():
        opp = alloc._objects_per_page[ci]
        spare = sum(opp - alloc._pages[p].num_live for p in alloc._partial[ci])
        extra = k - spare
        if extra > 0:
            pages -= -(-extra // opp)
    return pages >= 0


def _k_smallest(neg: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest values (``0 < k < len(neg)``), smallest first: what
    ``neg.argpartition(k - 1)[:k]``, then a stable sort of those, gives. Found among the
    few hundred values below a threshold from a sample when no tie can decide the answer
    (the k values distinct and below every other), else by exactly those two calls: on
    thousands of scores a round, the partition's fresh index array was its cost."""
    sample = np.partition(neg[::16], 2 * k + 2) if len(neg) > 32 * (k + 1) else None
    if sample is not None:
        below = np.flatnonzero(neg <= sample[2 * k + 2])  # (NaN is never below)
        if len(below) > k:
            v = neg[below]
            part = v.argpartition(k)  # the k smallest, then the next one at [k]
            first = part[:k]
            vf = v[first]
            o = vf.argsort(kind="stable")
            ranked = vf[o].tolist()  # (k values: compared in Python)
            if ranked[-1] < float(v[part[k]]) and all(map(float.__lt__, ranked, ranked[1:])):
                return below[first[o]]
    idx = neg.argpartition(k - 1)[:k]
    return idx[neg[idx].argsort(kind="stable")]


def _decision(fn):
    """Count the wall time of a planning call in ``TierManager.decision_s``: the policy's
    and the manager's share of a step's host time, reported apart from the rest."""
    @functools.wraps(fn)
    def timed(self, *args, **kwargs):
        if self._deciding:  # inside another planning call (a prefetch plans a fetch):
            return fn(self, *args, **kwargs)  # its time is the outer call's, counted once
        self._deciding = True
        self.decision_calls += 1
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self.decision_s += time.perf_counter() - t0
            self._deciding = False
            if self.on_decision is not None:
                self.on_decision()
    return timed


class TierManager:
    def __init__(self, table: PageTable, spaces: Spaces, policy: EvictionPolicy,
                 demotion: Demotion, watermarks: Watermarks, prefetch: KVPrefetch | None,
                 sizes: dict[Fmt, int], log: DecisionLog | None = None,
                 tail_last: bool = False):
        self.table = table
        self.spaces = spaces
        self.policy = policy
        self.demotion = demotion
        self.watermarks = watermarks
        self.prefetch = prefetch
        self.sizes = sizes
        self.log = log or DecisionLog()
        self.counters = Counters()
        self._busy = np.zeros(1024, bool)  # in flight or pinned: never a victim
        self.pinned: set[int] = set()  # blocks never chosen as victims (a partial tail)
        self.tail_last = tail_last  # keep the pinned tail last in a compacting L1
        self.decision_s = 0.0  # host seconds spent planning (see _decision)
        self.decision_calls = 0  # planning calls (outermost), the same on every backend
        self._deciding = False
        self.on_decision = None  # called after each planning call (SimBackend.decision_done)
        policy.bind(spaces.l1.capacity_bytes // sizes[Fmt.FP16])
        # the tiers whose allocator compacts (take_relocations asks them on every submit)
        self._compacting = [(tier, space) for tier, space in ((_T_L1, spaces.l1),
                                                              (_T_L2, spaces.l2))
                            if hasattr(space, "take_relocations")]

    # -- queries --------------------------------------------------------------------
    @property
    def l1_capacity(self) -> int:
        return self.spaces.l1.capacity_bytes

    @property
    def wants_attention(self) -> bool:
        """Whether ``observe`` reaches the policy (H2O): a driver need not compute a
        step's attention masses for it otherwise."""
        policy = self.policy
        return policy.needs_attention \
            or type(policy).on_attention is not EvictionPolicy.on_attention

    def l1_used(self) -> int:
        return self.spaces.l1.used_bytes

    def fits(self, sizes: Sequence[int]) -> bool:
        return can_allocate_all(self.spaces.l1, sizes)

    def resident(self, owner: int | None = None) -> np.ndarray:
        return self.table.ids_in(Tier.L1, owner)

    def l1_sizes(self, ids: np.ndarray) -> list[int]:
        """Bytes each block takes in L1 (full precision, whatever its L2 format)."""
        return [self.sizes[Fmt.FP16]] * len(ids)

    def handle(self, block: int):
        """The allocator handle (slab or slot) holding a live block's bytes."""
        return self.table.handle[block]

    def tiers(self, ids: np.ndarray) -> np.ndarray:
        return self.table.tier[np.asarray(ids, np.int64)]

    # -- what callers tell the manager -----------------------------------------------
    def record_reads(self, l1: int = 0, l2: int = 0, misses: int = 0) -> None:
        """Blocks a step read from each tier, and reads of blocks no tier holds."""
        c = self.counters
        c.l1_hits += int(l1)
        c.l2_hits += int(l2)
        c.misses += int(misses)

    def record_refusal(self, step: int, ids) -> None:
        self.counters.refusals += len(np.atleast_1d(ids))
        self.log.add(step, "refuse", ids)

    @_decision
    def touch(self, ids: np.ndarray, step: int) -> None:
        """These blocks were used at ``step`` (LRU's clock; others ignore it)."""
        self.policy.on_access(np.asarray(ids, np.int64), step)

    @_decision
    def observe(self, ids: np.ndarray, mass: np.ndarray, step: int) -> None:
        """Attention mass each block received at ``step`` (H2O's score)."""
        self.policy.on_attention(np.asarray(ids, np.int64), mass, step)

    def extend(self, block: int, token_end: int) -> None:
        """A partial block received tokens: it now covers up to ``token_end``."""
        self.table.token_end[block] = token_end

    def count_denied(self, n: int) -> None:
        """Reads refused by a tenant check outside the allocators' own checks."""
        self.spaces.l1.num_denied += n

    def take_relocations(self) -> dict[Tier, tuple[list, list]]:
        """What the compacting tiers owe after frees and allocations:
        ``{tier: ([(block, from_offset, to_offset), ...], [(offset, nbytes) to zero])}``.
        The page table already names the new offsets. The caller copies the moves
        (gather, then scatter), then zeroes the ranges, before any other op touches the
        tier."""
        out = {}
        for tier, space in self._compacting:  # on every submit
            if not space.owes():  # most calls: nothing owed
                continue
            moves = space.take_relocations()
            zero = space.take_zero([dst for _, _, dst in moves])
            if moves:
                self.table.relocate([s.block for s, _, _ in moves], [s for s, _, _ in moves])
            if moves or zero:
                out[tier] = ([(s.block, src, dst) for s, src, dst in moves], zero)
        return out

    def _set_busy(self, block: int, busy: bool) -> None:
        if block >= len(self._busy):
            self._grow_busy(block)
        self._busy[block] = busy or block in self.pinned

    def _grow_busy(self, max_block: int) -> None:
        grown = np.zeros(max(max_block + 1, 2 * len(self._busy)), bool)
        grown[: len(self._busy)] = self._busy
        self._busy = grown

    def _mark_busy(self, blocks: np.ndarray) -> None:
        """``_set_busy(b, True)`` for every block (an int64 array: indexing with it
        converts no Python list)."""
        try:  # within the marks (NumPy checks every index before it writes any)
            self._busy[blocks] = True
        except IndexError:
            if not len(blocks):
                raise
            self._grow_busy(int(blocks.max()))
            self._busy[blocks] = True

    def _clear_busy(self, blocks) -> None:
        """``_set_busy(b, False)`` for every block (pinned blocks stay busy)."""
        if len(blocks):
            blocks = np.asarray(blocks, np.int64)  # (indexing with a list converts it)
            try:  # within the marks (NumPy checks every index before it writes any)
                self._busy[blocks] = False
            except IndexError:
                self._grow_busy(int(blocks.max()))
                self._busy[blocks] = False
            for p in self.pinned:  # a pinned block is always busy
                self._busy[p] = True

    def pin(self, block: int) -> None:
        """Never a victim until unpinned (a partial tail block). With ``tail_last``, an
        L1-resident pinned block is also kept at the end of the compacted L1."""
        self.pinned.add(block)
        self._set_busy(block, True)
        if self.tail_last and self.table.tier[block] == int(Tier.L1):
            self.spaces.l1.keep_last(self.table.handle[block])

    def unpin(self, block: int) -> None:
        self.pinned.discard(block)
        self._set_busy(block, False)
        if self.tail_last:
            self.spaces.l1.keep_last(None)

    def _in_flight(self, ids: np.ndarray) -> np.ndarray:
        """Mask of ``ids`` that are busy (a planned move not yet committed, or pinned)."""
        if len(ids) and ids.max() < len(self._busy):
            return self._busy[ids]
        out = np.zeros(len(ids), bool)
        inside = ids < len(self._busy)
        out[inside] = self._busy[ids[inside]]
        return out

    def evictable(self, protected: np.ndarray) -> np.ndarray:
        """L1 blocks that may be chosen as victims now: not in flight, not pinned, not in
        ``protected`` (the working set of the current step)."""
        return self._evictable(np.asarray(protected, np.int64))

    def _evictable(self, protected: np.ndarray) -> np.ndarray:
        l1 = self.table.ids_in(Tier.L1)
        if len(l1) and int(l1[-1]) >= len(self._busy):
            self._set_busy(int(l1[-1]), False)
        if not len(protected):
            return l1[~self._busy[l1]]
        # membership through a mask over block ids (np.isin sorts; this is O(n)): the busy
        # marks and the protected ids in one mask, so L1's ids are gathered once
        busy, top = self._busy, int(protected.max()) + 1
        if top > len(busy):
            off = np.zeros(top, bool)
            off[: len(busy)] = busy
        else:
            off = busy.copy()
        off[protected] = True
        return l1[~off[l1]]

    # -- insertion ------------------------------------------------------------------
    @_decision
    def insert(self, specs: Sequence[BlockSpec], step: int, positions: np.ndarray) -> np.ndarray:
        if not specs:
            return np.zeros(0, np.int64)
        if not self.fits([s.nbytes for s in specs]):
            raise CapacityError(f"no room in L1 for {len(specs)} new blocks of "
                                f"{sum(s.nbytes for s in specs)} bytes (L1 budget "
                                f"{self.l1_capacity} bytes, {self.l1_used()} in use); "
                                f"make_room first")
        slabs = self.spaces.l1.allocate_prefix([s.nbytes for s in specs], [s.tenant for s in specs])
        if len(slabs) < len(specs):  # fits() said yes: an allocator that disagrees is a bug
            raise CapacityError(f"L1 allocated {len(slabs)} of {len(specs)} blocks that fit")
        ids = self.table.add(specs, Tier.L1, slabs)
        self.policy.on_insert(ids, step, positions)
        self.log.add(step, "insert", ids)
        return ids

    # -- eviction -------------------------------------------------------------------
    @_decision
    def make_room(self, sizes: Sequence[int], protected: np.ndarray, step: int,
                  arriving: np.ndarray | None = None) -> Sequence[Move]:
        """Victims whose leaving frees at least ``sum(sizes)`` bytes of L1 (forced eviction).
        ``arriving``: positions of the new blocks the room is for (the policy counts them
        as the newest; H2O's recent window includes them).

        Raises CapacityError when even evicting every unprotected block cannot make room.
        """
        # the round leaves L1 full once the blocks are in
        self.policy.begin_round(self.l1_capacity // self.sizes[Fmt.FP16], arriving)
        need = sum(sizes) - (self.l1_capacity - self.l1_used())
        cand = self._evictable(protected)
        if need <= 0:
            need = min(sizes) if len(sizes) else 0  # fragmentation: free at least one object
        victims = self._lowest_covering(cand, need, step)
        if len(victims) == 0:
            raise CapacityError(
                f"L1 cannot take {len(sizes)} blocks of {sum(sizes)} bytes: budget "
                f"{self.l1_capacity} bytes, {self.l1_used()} in use, and every resident "
                f"block is needed by the current step or in flight")
        moves = self._evict(victims, step, forced=True)
        if not moves:
            raise CapacityError(f"no INT4 staging slot is free to demote block {int(victims[0])}; "
                                f"in-flight demotions must complete first (memory.staging_blocks)")
        return moves

    def _lowest_covering(self, cand: np.ndarray, need_bytes: int, step: int) -> np.ndarray:
        """The lowest-scoring candidates whose bytes add up to at least ``need_bytes``."""
        if need_bytes <= 0 or len(cand) == 0:
            return cand[:0]
        nbytes = self.table.nbytes[cand]
        upper = min(len(cand), int(math.ceil(need_bytes / max(1, int(nbytes.min())))))
        chosen = self.policy.victims(cand, upper, step)
        if len(chosen) > 1:
            order = np.argsort(self.policy.scores(chosen, step), kind="stable")
            chosen = chosen[order]
        covered = np.cumsum(self.table.nbytes[chosen])
        k = int(np.searchsorted(covered, need_bytes)) + 1
        return np.sort(chosen[:k])

    @_decision
    def evict(self, victims: np.ndarray, step: int, forced: bool = False) -> Sequence[Move]:
        """Moves for these L1 blocks, chosen by the caller (a scheduler swapping whole
        requests): demotions or drops as the demotion rule says; see ``_evict``."""
        return self._evict(np.array(victims, np.int64), step, forced)  # (a copy: the
        # moves keep the ids, and the caller may reuse its array)

    def _evict(self, victims: np.ndarray, step: int, forced: bool) -> Sequence[Move]:
        """Moves for ``victims`` in order: drops, or demotions with their L2 (and INT4
        staging) slabs. The first victim that finds no staging slot ends the round; an
        L2 that cannot take a demotion raises CapacityError. Allocations are batched per
        allocator, with the result of allocating victim by victim."""
        table, sizes, spaces = self.table, self.sizes, self.spaces
        victims = np.asarray(victims, np.int64)
        blocks = victims.tolist()
        src_fmts = list(map(_FMT.__getitem__, table.fmt[victims].tolist()))
        srcs = list(map(table.handle.__getitem__, blocks))
        target = {f: self.demotion.target(f) for f in set(src_fmts)}
        n = len(blocks)
        uniform = len(target) == 1  # one source format (the common case): one plan for all
        if uniform:
            ((src_fmt0, plan0),) = target.items()
            need_staging = range(n) if plan0[0] != _T_NONE and plan0[1] != src_fmt0 else ()
        else:
            plan = [target[f] for f in src_fmts]  # (tier, fmt) per victim
            need_staging = [i for i, (tier, fmt) in enumerate(plan)
                            if tier != _T_NONE and fmt != src_fmts[i]]
        staged: dict[int, object] = {}
        if need_staging:
            got = [] if spaces.staging is None else spaces.staging.allocate_prefix(
                [sizes[plan0[1] if uniform else plan[i][1]] for i in need_staging],
                [srcs[i].tenant for i in need_staging])
            staged = dict(zip(need_staging, got))
            if len(got) < len(need_staging):
                n = need_staging[len(got)]  # staging full: the rest waits for the next round
        if uniform:
            demote = range(n) if plan0[0] != _T_NONE else range(0)
            dst_sizes = [sizes[plan0[1]]] * len(demote)
        else:
            demote = [i for i in range(n) if plan[i][0] != _T_NONE]
            dst_sizes = [sizes[plan[i][1]] for i in demote]
        l2 = spaces.l2
        dsts = l2.allocate_prefix(dst_sizes, list(map(_tenant_of, srcs[:n])) if uniform
                                  else [srcs[i].tenant for i in demote])
        if len(dsts) < len(demote):
            j = demote[len(dsts)]
            if staged:  # as victim by victim: no staging slot is kept from victim j on
                spaces.staging.free_all([staged[i] for i in need_staging if j <= i < n])
            raise CapacityError(
                f"L2 is full ({l2.stats().used_bytes} of {l2.capacity_bytes} bytes): "
                f"cannot demote block {blocks[j]}; raise memory.l2_budget or use demote: drop")
        if uniform and plan0[0] == _T_NONE:
            fmts = src_fmts[:n]
            moves = MoveBatch("drop", _T_L1, _T_NONE, victims[:n], blocks[:n], fmts, fmts,
                              srcs[:n], None, 0, None) if n else []
            drops, demotes = blocks[:n], []
        elif uniform:
            moves = MoveBatch("demote", _T_L1, _T_L2, victims[:n], blocks[:n], src_fmts[:n],
                              [plan0[1]] * n, srcs[:n], dsts, sizes[plan0[1]],
                              [staged[i] for i in range(n)] if staged else None) if n else []
            drops, demotes = [], blocks[:n]
        else:
            dst_of = dict(zip(demote, dsts))
            moves = []
            drops, demotes = [], []
            for i in range(n):
                b, src_fmt, src = blocks[i], src_fmts[i], srcs[i]
                tier, fmt = plan[i]
                if tier == _T_NONE:
                    moves.append(_new_move(Move, (b, "drop", _T_L1, _T_NONE, src_fmt, src_fmt,
                                                  src, None, None)))
                    drops.append(b)
                else:
                    moves.append(_new_move(Move, (b, "demote", _T_L1, _T_L2, src_fmt, fmt, src,
                                                  dst_of[i], staged.get(i))))
                    demotes.append(b)
        self._mark_busy(victims[:n])
        c = self.counters
        c.evictions += len(moves)
        c.drops += len(drops)
        c.demotions += len(demotes)
        if forced:
            c.forced_evictions += len(moves)
        self.log.add_ints(step, "drop", drops)
        self.log.add_ints(step, "demote", demotes)
        return moves

    # -- fetch ----------------------------------------------------------------------
    @_decision
    def plan_fetch(self, ids: np.ndarray, step: int, purpose: str = "fetch") -> Sequence[Move]:
        """L1 destinations (full precision) for L2 blocks, in order, for as many as L1
        (and, for INT4 blocks, the device staging that takes them before dequantization)
        can take now."""
        ids = np.asarray(ids, np.int64)
        if len(ids) == 0:
            return []
        # a block already moving (planned, not yet committed) is not moved twice (a copy
        # either way: the batch keeps the ids, and the caller may reuse its array)
        busy = self._in_flight(ids)
        ids = ids[~busy] if busy.any() else ids.copy()
        table, spaces = self.table, self.spaces
        blocks = ids.tolist()
        srcs = list(map(table.handle.__getitem__, blocks))
        fmts = list(map(_FMT.__getitem__, table.fmt[ids].tolist()))
        tenants = list(map(_tenant_of, srcs))
        quant = [i for i, f in enumerate(fmts) if f == _INT4] if _INT4 in fmts else []
        staged: dict[int, object] = {}
        n = len(blocks)
        if quant:
            got = [] if spaces.staging is None else spaces.staging.allocate_prefix(
                [self.sizes[Fmt.INT4]] * len(quant), [tenants[i] for i in quant])
            staged = dict(zip(quant, got))
            if len(got) < len(quant):
                n = quant[len(got)]  # staging full: the rest waits for a later step
        dsts = spaces.l1.allocate_prefix([self.sizes[Fmt.FP16]] * n, tenants[:n])
        if len(dsts) < n and staged:
            spaces.staging.free_all([staged[i] for i in quant if len(dsts) <= i < n])
        k = len(dsts)
        if not k:
            return []
        done = blocks[:k]
        moves = MoveBatch(purpose, _T_L2, _T_L1, ids[:k], done, fmts[:k], [_FP16] * k,
                          srcs[:k], dsts, self.sizes[Fmt.FP16],
                          list(map(staged.get, range(k))) if staged else None)
        self._mark_busy(moves.ids)
        if purpose == "prefetch":
            self.counters.prefetches += len(done)
        else:
            self.counters.fetches += len(done)
        self.log.add_ints(step, purpose, done)
        return moves

    @_decision
    def plan_background(self, step: int,
                        protected: np.ndarray) -> tuple[Sequence[Move], Sequence[Move]]:
        """Demote down to the low watermark; then prefetch L2 blocks the policy ranks above
        L1's weakest into the headroom below the high watermark."""
        used = self.l1_used()
        # the round runs after the step's scores and keeps at most the low watermark
        self.policy.begin_round(int(self.watermarks.low * self.l1_capacity) // self.sizes[Fmt.FP16])
        to_free = self.watermarks.bytes_to_free(used, self.l1_capacity)
        prefetching = self.prefetch is not None and self.prefetch.max_blocks > 0 \
            and self.demotion is not Demotion.DROP
        # the candidates only where a demotion or a prefetch needs them (most steps: none)
        cand = self._evictable(protected) if to_free > 0 or prefetching else None
        demotions = self._evict(self._lowest_covering(cand, to_free, step), step, False) \
            if to_free > 0 else []
        prefetches: Sequence[Move] = []
        if prefetching and not demotions:
            headroom = self.watermarks.headroom_bytes(used, self.l1_capacity)
            l2 = self.table.ids_in(Tier.L2) if headroom > 0 and len(cand) else ()
            if len(l2):
                busy = self._in_flight(l2)
                if busy.any():  # (most rounds: none in flight, and no copy of l2 to make)
                    l2 = l2[~busy]
            if len(l2):
                prefetches = self._plan_prefetch(l2, cand, headroom, step)
        return demotions, prefetches

    def _plan_prefetch(self, l2, cand, headroom, step) -> Sequence[Move]:
        k = min(len(l2), self.prefetch.max_blocks)
        s = self.policy.scores(l2, step)
        weakest = float(self.policy.scores(cand, step).min())
        if not s.max() > weakest:  # no L2 block outranks L1's weakest (LRU, FIFO: most steps)
            return []
        # negated once, for the partition and the sort, in place: ``scores`` hands out a
        # new array, and a fresh one of thousands of scores costs more in cache misses
        # than the arithmetic (``-s < -weakest`` is ``s > weakest`` exactly)
        neg = np.negative(s, out=s)
        if k < len(l2):
            order = _k_smallest(neg, k)
        else:
            idx = np.arange(len(l2))
            order = idx[neg[idx].argsort(kind="stable")]
        top = l2[order][neg[order] < -weakest]
        chosen = self.prefetch.choose(top, self.table.nbytes[top], headroom)
        return self.plan_fetch(chosen, step, "prefetch")

    # -- completion -----------------------------------------------------------------
    @_decision
    def commit(self, moves: Sequence[Move], step: int) -> None:
        """The ops of these moves finished: the page table follows, sources are freed."""
        if not moves:
            return
        if moves.__class__ is MoveBatch:  # the manager's own batches: their columns
            return self._commit_batch(moves, step)
        table, spaces = self.table, self.spaces
        n = len(moves)
        # the moves as columns (one transpose in C); a batch of one kind (a round's
        # demotions, a step's fetches) needs no Python loop over its blocks
        blocks, purposes, src_tiers, dst_tiers, _, dst_fmts, srcs, dsts, stagings = zip(*moves)
        purpose, src_tier = purposes[0], src_tiers[0]
        if purposes.count(purpose) == n and src_tiers.count(src_tier) == n \
                and dst_tiers.count(dst_tiers[0]) == n \
                and dsts.count(None) == (n if purpose == "drop" else 0):
            drop = purpose == "drop"
            # the ids as one array, read (never changed) by every use below: the busy
            # marks, the page table and the policy's hooks index with it, where a list
            # would be converted by each of them
            ids = np.fromiter(blocks, np.int64, n)
            removed = ids if drop else ()
            free_l1 = srcs if src_tier == _T_L1 else ()
            free_l2 = () if src_tier == _T_L1 else srcs
            staged = [] if stagings.count(None) == n else [s for s in stagings if s is not None]
            fetched = ids if not drop and dst_tiers[0] == _T_L1 \
                and purpose != "prefetch" else ()
            prefetched = ids if not drop and dst_tiers[0] == _T_L1 \
                and purpose == "prefetch" else ()
            self._clear_busy(ids)
            if drop:
                table.drop_all(ids)
            else:
                table.move_all(blocks, dst_tiers, dst_fmts,
                               np.fromiter(map(_nbytes_of, dsts), np.int64, n), dsts, ids=ids)
        else:
            removed, moved, fetched, prefetched = [], [], [], []
            free_l1, free_l2 = [], []
            staged = []
            for m in moves:  # sources are freed in move order, per allocator
                if m.dst is None:
                    removed.append(m.block)
                    free_l1.append(m.src)
                    continue
                moved.append(m)
                (free_l1 if m.src_tier == _T_L1 else free_l2).append(m.src)
                if m.staging is not None:
                    staged.append(m.staging)
                if m.dst_tier == _T_L1:
                    (prefetched if m.purpose == "prefetch" else fetched).append(m.block)
            self._clear_busy(list(blocks))
            if removed:
                table.drop_all(removed)
            if moved:
                table.move_all([m.block for m in moved], [m.dst_tier for m in moved],
                               [m.dst_fmt for m in moved], [m.dst.nbytes for m in moved],
                               [m.dst for m in moved])
        spaces.l1.free_all(free_l1)
        spaces.l2.free_all(free_l2)
        if staged:
            spaces.staging.free_all(staged)
        if len(removed):
            self.policy.on_remove(np.asarray(removed, np.int64))
        if len(fetched):
            self.policy.on_fetch(np.asarray(fetched, np.int64), step)
        if len(prefetched):
            self.policy.on_prefetch(np.asarray(prefetched, np.int64), step)
        if self.tail_last:
            for p in self.pinned:  # a pinned tail fetched back stays last
                if table.tier[p] == int(Tier.L1):
                    spaces.l1.keep_last(table.handle[p])

    def _commit_batch(self, b: MoveBatch, step: int) -> None:
        """``commit`` of a ``MoveBatch``: the same changes, in the same order, read from
        its columns."""
        table, spaces = self.table, self.spaces
        ids, srcs = b.ids, b.srcs
        self._clear_busy(ids)
        if b.dsts is None:  # drops
            table.drop_all(ids)
        else:
            table.move_batch(ids, b.blocks, b.src_tier, b.dst_tier, b.dst_fmts, b.dst_nbytes,
                             b.dsts)
        if b.src_tier == _T_L1:
            spaces.l1.free_all(srcs)
        else:
            spaces.l2.free_all(srcs)
        if b.stagings is not None:
            staged = [s for s in b.stagings if s is not None]
            if staged:
                spaces.staging.free_all(staged)
        if b.dsts is None:
            self.policy.on_remove(ids)
        elif b.dst_tier == _T_L1:
            if b.purpose == "prefetch":
                self.policy.on_prefetch(ids, step)
            else:
                self.policy.on_fetch(ids, step)
        if self.tail_last:
            for p in self.pinned:  # a pinned tail fetched back stays last
                if table.tier[p] == int(Tier.L1):
                    spaces.l1.keep_last(table.handle[p])

    def abort(self, moves: Sequence[Move]) -> None:
        """The ops failed: destinations are released and every block stays where it was."""
        self._clear_busy([m.block for m in moves])
        for m in moves:
            if m.dst is not None:
                self.spaces.of(m.dst_tier).free(m.dst)
            if m.staging is not None:
                self.spaces.staging.free(m.staging)

    @_decision
    def release(self, ids: np.ndarray) -> None:
        """The owner is done with these blocks: they leave every tier (freed, counted)."""
        ids = np.asarray(ids, np.int64)
        frees = {Tier.L1: [], Tier.L2: []}
        for b in ids.tolist():
            tier = self.table.where(b)
            handle = self.table.handle[b]
            self.table.free(b)
            if tier != Tier.NONE:
                frees[tier].append(handle)
        for tier, handles in frees.items():
            self.spaces.of(tier).free_all(handles)
        self.policy.on_remove(ids)

    def check(self) -> None:
        """Invariants across the page table and the allocators (tests, check_invariants)."""
        self.table.check()
        for tier in (Tier.L1, Tier.L2):
            space = self.spaces.of(tier)
            ids = self.table.ids_in(tier)
            for b in ids.tolist():
                assert space.is_live(self.table.handle[b]), f"block {b}: stale handle in {tier.name}"
