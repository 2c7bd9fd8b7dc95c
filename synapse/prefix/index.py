"""Where each cached chunk lives: LRU per tier, capacity limits and watermarks. No I/O.

``PrefixIndex`` is the bookkeeping half of the prefix store (vLLM's offloading manager is
the model): it decides and returns ``Move`` descriptors, and whoever holds the bytes
carries them out in order (``PrefixStore`` with real media, the ``prefix_reuse`` driver
with backend ops, so the simulator and the hardware make the same decisions).

Tiers are ordered fastest first (L1 device, L2 pinned host, L3 disk); any subset may be
configured. Caching is inclusive: a chunk may have copies in several tiers.

- ``store``: a computed chunk goes to the first tier that can take it (or stays where it
  already is); with ``write_through`` it is also copied down to every lower tier (so the
  disk holds everything saved, which is what other processes sharing the directory find).
- eviction from tier t: a chunk with a copy below is just freed; otherwise it is demoted
  (copied to t+1, making room there the same way, then freed); from the last tier it is
  dropped. ``protected`` chunks (those a request is using) are never victims.
- watermarks: ``trim`` brings every tier above ``high_watermark`` of its capacity down to
  ``low_watermark``; an insertion beyond capacity evicts what it needs at once.
- ``lookup`` probes every tier for every key and never stops early, so its work depends
  only on the number of keys (a tenant's lookup cannot be timed to learn whether some
  other key space is populated).

Operations (n keys, T tiers): lookup O(n T); touch, adopt, forget O(1); refresh O(T); store/promote
O(T + victims); trim O(victims).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence


@dataclass(frozen=True)
class TierSpec:
    name: str
    capacity_bytes: int
    high_watermark: float = 0.95
    low_watermark: float = 0.85

    def __post_init__(self):
        if self.capacity_bytes < 0:
            raise ValueError(f"{self.name} capacity: got {self.capacity_bytes}, expected >= 0")
        if not 0.0 <= self.low_watermark <= self.high_watermark <= 1.0:
            raise ValueError(f"{self.name} watermarks: got low {self.low_watermark}, high "
                             f"{self.high_watermark}, expected 0 <= low <= high <= 1")


class Move(NamedTuple):
    """One step for the data holder. ``op``: "store" (the caller's data into ``dst``),
    "copy" (tier ``src`` into tier ``dst``, the source keeps its copy) or "free" (drop the
    copy in ``src``). Tiers are indices into the index's tier list; -1 means none."""

    op: str
    key: bytes
    src: int
    dst: int
    nbytes: int


@dataclass
class TierCounters:
    evictions: int = 0    # copies removed to make room or by the watermarks
    demotions: int = 0    # of those, copied to the next tier first
    drops: int = 0        # of those, the last copy anywhere (the chunk left the cache)


class TierIndex:
    """The chunks of one tier in LRU order (oldest first) and the bytes they use."""

    def __init__(self, spec: TierSpec):
        self.spec = spec
        self.lru: OrderedDict[bytes, int] = OrderedDict()
        self.used_bytes = 0
        self.counters = TierCounters()

    def __contains__(self, key) -> bool:
        return key in self.lru

    def __len__(self) -> int:
        return len(self.lru)

    def add(self, key: bytes, nbytes: int, hot: bool = True) -> None:
        if key in self.lru:
            self.lru.move_to_end(key, last=hot)
            return
        self.lru[key] = nbytes
        self.lru.move_to_end(key, last=hot)
        self.used_bytes += nbytes

    def remove(self, key: bytes) -> int:
        nbytes = self.lru.pop(key)
        self.used_bytes -= nbytes
        return nbytes

    def touch(self, key: bytes) -> None:
        self.lru.move_to_end(key)

    def evictable_bytes(self, protected) -> int:
        return sum(n for k, n in self.lru.items() if k not in protected)


@dataclass
class PrefixIndex:
    specs: Sequence[TierSpec]
    write_through: bool = True
    tiers: list = field(init=False)

    def __post_init__(self):
        if not self.specs:
            raise ValueError("a prefix index needs at least one tier")
        self.tiers = [TierIndex(s) for s in self.specs]

    @property
    def names(self) -> list[str]:
        return [t.spec.name for t in self.tiers]

    # -- queries ----------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The fastest tier holding each key, -1 where none does. Every tier is probed for
        every key (no early exit): the work depends on ``len(keys)`` only."""
        found = []
        for k in keys:
            where = -1
            for t in range(len(self.tiers) - 1, -1, -1):
                if k in self.tiers[t].lru:
                    where = t
            found.append(where)
        return found

    @staticmethod
    def leading(found: Sequence[int]) -> int:
        """How many leading entries of a ``lookup`` are hits (a prefix must be whole)."""
        n = 0
        for t in found:
            if t < 0:
                break
            n += 1
        return n

    def holds(self, key: bytes, tier: int) -> bool:
        return key in self.tiers[tier].lru

    # -- updates ------------------------------------------------------------------------
    def touch(self, key: bytes, tier: int) -> None:
        if key in self.tiers[tier].lru:
            self.tiers[tier].touch(key)

    def store(self, key: bytes, nbytes: int, protected=frozenset()) -> list[Move]:
        """Place a chunk the caller has just computed: into the fastest tier with room (a
        tier that already holds it ends the search and is only refreshed), then, with
        ``write_through``, into every lower tier that lacks it."""
        moves: list[Move] = []
        protected = set(protected) | {key}
        first = None
        for t in range(len(self.tiers)):
            if key in self.tiers[t].lru:
                self.tiers[t].touch(key)
                first = t
                break
            room = self._make_room(t, nbytes, protected)
            if room is not None:
                moves += room
                self.tiers[t].add(key, nbytes)
                moves.append(Move("store", key, -1, t, nbytes))
                first = t
                break
        if first is not None and self.write_through:
            moves += self._copy_along(key, nbytes, first, range(first + 1, len(self.tiers)),
                                       protected)
        return moves

    def refresh(self, key: bytes) -> None:
        """Mark a chunk as just used in every tier that holds it."""
        for t in self.tiers:
            if key in t.lru:
                t.touch(key)

    def promote(self, key: bytes, src: int, dst: int, protected=frozenset()) -> list[Move]:
        """Copy a chunk found in ``src`` up into every tier from ``dst`` to ``src - 1``
        (a hit from disk lands in L2 on its way to L1). Tiers that cannot make room are
        skipped; the moves say which copies happen."""
        nbytes = self.tiers[src].lru[key]
        self.tiers[src].touch(key)
        return self._copy_along(key, nbytes, src, range(src - 1, dst - 1, -1),
                                set(protected) | {key})

    def trim(self, protected=frozenset()) -> list[Move]:
        """Watermarks: every tier above its high mark is brought down to its low mark."""
        moves: list[Move] = []
        for t, tier in enumerate(self.tiers):
            cap = tier.spec.capacity_bytes
            if tier.used_bytes <= tier.spec.high_watermark * cap:
                continue
            target = tier.spec.low_watermark * cap
            for key in [k for k in tier.lru if k not in protected]:
                if tier.used_bytes <= target:
                    break
                moves += self._evict(t, key, protected)
        return moves

    def adopt(self, key: bytes, nbytes: int, tier: int, hot: bool = True) -> None:
        """Record a copy that appeared without a move (a file another process wrote);
        ``hot=False`` files it as the least recently used."""
        self.tiers[tier].add(key, nbytes, hot)

    def forget(self, key: bytes, tier: int) -> None:
        """A copy is gone (a corrupt or vanished file): no move, it no longer exists."""
        if key in self.tiers[tier].lru:
            self.tiers[tier].remove(key)

    # -- internals ----------------------------------------------------------------------
    def _make_room(self, t: int, nbytes: int, protected) -> list[Move] | None:
        tier = self.tiers[t]
        cap = tier.spec.capacity_bytes
        need = tier.used_bytes + nbytes - cap
        if nbytes > cap or (need > 0 and tier.evictable_bytes(protected) < need):
            return None
        moves: list[Move] = []
        for key in [k for k in tier.lru if k not in protected]:
            if tier.used_bytes + nbytes <= cap:
                break
            moves += self._evict(t, key, protected)
        return moves

    def _evict(self, t: int, key: bytes, protected) -> list[Move]:
        tier = self.tiers[t]
        nbytes = tier.lru[key]
        tier.counters.evictions += 1
        below = any(key in self.tiers[u].lru for u in range(t + 1, len(self.tiers)))
        moves: list[Move] = []
        if not below and t + 1 < len(self.tiers):
            room = self._make_room(t + 1, nbytes, set(protected) | {key})
            if room is not None:
                moves += room
                self.tiers[t + 1].add(key, nbytes)
                moves.append(Move("copy", key, t, t + 1, nbytes))
                tier.counters.demotions += 1
                below = True
        if not below:
            tier.counters.drops += 1
        tier.remove(key)
        moves.append(Move("free", key, t, -1, nbytes))
        return moves

    def _copy_along(self, key: bytes, nbytes: int, src: int, order, protected) -> list[Move]:
        """Copy a chunk from tier ``src`` into each tier of ``order`` in turn (each copy
        from the previous one), skipping tiers that already hold it or have no room."""
        moves: list[Move] = []
        prev = src
        for t in order:
            if key in self.tiers[t].lru:
                self.tiers[t].touch(key)
                prev = t
                continue
            room = self._make_room(t, nbytes, protected)
            if room is None:
                continue
            moves += room
            self.tiers[t].add(key, nbytes)
            moves.append(Move("copy", key, prev, t, nbytes))
            prev = t
        return moves
