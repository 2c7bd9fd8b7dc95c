"""The prefix store: KV of token chunks saved once and loaded by any later request (or
process) whose prompt starts the same way.

    store = PrefixStore(Fingerprint("my-model", chunk_tokens=256), l1_bytes=8 << 30,
                        l2_bytes=64 << 30, l3_dir="/nvme/kv", l3_bytes=1 << 40)
    store.save(tokens, kv)                    # kv[i] (or kv(i)): chunk i's array
    got = store.load(tokens)                  # got.tokens leading tokens, got.chunks
    mask = store.check(tokens)                # bit i set: chunk i is cached somewhere
    handle = store.load_async(tokens); ...; got = handle.wait()
    store.flush(); store.report(); store.close()

Decisions come from ``PrefixIndex`` (LRU, watermarks, capacities; no I/O); this class
carries its moves out on the media: L1 ``DeviceMedium`` (or any ``ChunkMedium``), L2
``HostMedium`` (pinned where CUDA exists), L3 ``DiskTier``. Memory copies happen in the
calling thread; disk reads and writes run on two thread pools (reads never wait behind
writes), so ``save`` returns without waiting for the disk, and ``load_async`` returns a
handle while L3 reads proceed. A chunk that fails its checksum, is truncated or has vanished is deleted,
counted and treated as a miss: ``load`` restores the prefix up to it and the caller
recomputes the rest. Thread-safe (one lock around the index and the media).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import StorageError
from .chunk import ChunkCorrupt, ChunkMeta, describe, from_bytes, host_bytes
from .disk import DiskTier
from .index import Move, PrefixIndex, TierSpec
from .keys import Fingerprint, chunk_keys
from .media import DeviceMedium, HostMedium, host_buffer
from .stats import PrefixStats


@dataclass
class SaveResult:
    chunks: int      # whole chunks in the tokens
    saved: int       # newly stored
    present: int     # already cached (refreshed)


@dataclass
class LoadResult:
    tokens: int                       # leading tokens restored (a multiple of chunk_tokens)
    chunks: list = field(default_factory=list)   # one array per restored chunk
    tiers: list = field(default_factory=list)    # where each was found: "l1", "l2", "l3"


class LoadHandle:
    """A load in flight: memory hits are resolved, L3 reads run on the I/O threads."""

    def __init__(self, store, keys, tiers, futures, into):
        self._store, self._keys, self._tiers = store, keys, tiers
        self._futures, self._into = futures, into
        self._result: LoadResult | None = None

    def done(self) -> bool:
        return self._result is not None or all(f is None or f.done() for f in self._futures)

    def wait(self) -> LoadResult:
        if self._result is None:
            self._result = self._store._finish_load(self._keys, self._tiers, self._futures,
                                                    self._into)
        return self._result


class PrefixStore:
    def __init__(self, fingerprint: Fingerprint, *, l1_bytes: int = 0, l2_bytes: int = 0,
                 l3_dir=None, l3_bytes: int = 0, device=None, high_watermark: float = 0.95,
                 low_watermark: float = 0.85, write_through: bool = True, io_workers: int = 4,
                 fsync: bool = True, secret: bytes = b"", l1_medium=None):
        self.fingerprint, self.secret = fingerprint, secret
        self.chunk_tokens = fingerprint.chunk_tokens
        specs, self.media = [], []
        self.disk: DiskTier | None = None
        if l1_bytes or l1_medium is not None:
            specs.append(TierSpec("l1", l1_bytes, high_watermark, low_watermark))
            self.media.append(l1_medium if l1_medium is not None else DeviceMedium("l1", device))
        if l2_bytes:
            specs.append(TierSpec("l2", l2_bytes, high_watermark, low_watermark))
            self.media.append(HostMedium("l2"))
        if l3_dir is not None:
            if l3_bytes <= 0:
                raise ValueError(f"l3_bytes: got {l3_bytes}, expected a capacity > 0 with l3_dir")
            self.disk = DiskTier(l3_dir, fingerprint, fsync)
            specs.append(TierSpec("l3", l3_bytes, high_watermark, low_watermark))
            self.media.append(self.disk)
        if not specs:
            raise ValueError("a prefix store needs at least one tier (l1_bytes, l2_bytes or l3_dir)")
        self.index = PrefixIndex(specs, write_through)
        self.names = self.index.names
        self.l3 = len(specs) - 1 if self.disk is not None else None
        self.stats = PrefixStats(self.names)
        self._lock = threading.RLock()
        # Two pools, so a load's reads never queue behind the background writes of saves.
        self._pool = ThreadPoolExecutor(max(1, io_workers), thread_name_prefix="synapse-l3-read")
        self._write_pool = ThreadPoolExecutor(max(1, io_workers),
                                              thread_name_prefix="synapse-l3-write")
        self._meta: dict[bytes, ChunkMeta] = {}
        self._writes: dict[bytes, Future] = {}
        self._errors: list[str] = []
        self._pins: Counter = Counter()
        if self.disk is not None:
            with self.disk.lock():
                self._rescan_l3()

    # -- the public verbs -------------------------------------------------------------
    def keys(self, tokens, tenant: str = "default") -> list[bytes]:
        return chunk_keys(tokens, self.fingerprint, tenant, self.secret)

    def check(self, tokens, tenant: str = "default") -> int:
        """Bitmask of cached chunks: bit i is set when chunk i is in some tier."""
        keys = self.keys(tokens, tenant)
        with self._lock:
            found = self._lookup(keys)
        return sum(1 << i for i, t in enumerate(found) if t >= 0)

    def save(self, tokens, kv, tenant: str = "default", fmt: str = "") -> SaveResult:
        """Store every whole chunk of ``tokens`` not cached yet. ``kv`` is a sequence with
        one array per chunk, or a callable ``kv(i)``; only missing chunks are asked for."""
        keys = self.keys(tokens, tenant)
        get: Callable = kv if callable(kv) else kv.__getitem__
        saved = present = 0
        with self._lock:
            found = self._lookup(keys)
            protected = set(self._pins)  # a save's own older chunks may make room for newer
            for i, key in enumerate(keys):
                if found[i] >= 0:
                    self.index.refresh(key)
                    present += 1
                    continue
                data = get(i)
                meta = describe(data, fmt)
                self._meta[key] = meta
                moves = self.index.store(key, meta.nbytes, protected)
                self._apply(moves, {key: data})
                saved += any(m.op == "store" for m in moves)
            self._trim()
        self.stats.add(chunks_saved=saved)
        return SaveResult(len(keys), saved, present)

    def load_async(self, tokens, tenant: str = "default", max_tokens: int | None = None,
                   into: str | None = None) -> LoadHandle:
        """Start restoring the longest cached prefix of ``tokens`` (at most ``max_tokens``,
        e.g. ``len(tokens) - 1`` so one token is left to compute). Chunks found in a lower
        tier are promoted up to ``into`` (default: the fastest tier)."""
        if into is not None and into not in self.names:
            raise ValueError(f"into: got {into!r}, expected one of {', '.join(self.names)}")
        into_t = 0 if into is None else self.names.index(into)
        keys = self.keys(tokens, tenant)
        limit = len(keys) if max_tokens is None else min(len(keys), max_tokens // self.chunk_tokens)
        with self._lock:
            found = self._lookup(keys)
            self.stats.add(lookups=1, lookup_tokens=len(keys) * self.chunk_tokens)
            n = self.index.leading(found[:limit])
            keys, tiers = keys[:n], found[:n]
            self._pins.update(keys)
            futures = [self._pool.submit(self._read, k) if t == self.l3 else None
                       for k, t in zip(keys, tiers)]
        return LoadHandle(self, keys, tiers, futures, into_t)

    def load(self, tokens, tenant: str = "default", max_tokens: int | None = None) -> LoadResult:
        return self.load_async(tokens, tenant, max_tokens).wait()

    def prefetch(self, tokens, tenant: str = "default") -> LoadHandle:
        """Bring the cached prefix's L3 chunks into L2 in the background (returns the
        handle; its ``wait`` also gives the chunks)."""
        return self.load_async(tokens, tenant, into="l2" if "l2" in self.names else None)

    def flush(self) -> None:
        """Wait for every pending disk write; raise StorageError (naming the directory)
        if one failed since the last flush."""
        while True:
            with self._lock:
                self._drain_writes()
                pending = list(self._writes.values())
            if not pending:
                break
            wait_all(pending)
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise StorageError(errors[0] + more)

    def report(self) -> dict:
        with self._lock:
            return self.stats.report(self.index)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)
            self._write_pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- lookups ------------------------------------------------------------------------
    def _lookup(self, keys: Sequence[bytes]) -> list[int]:
        """``index.lookup``, plus a stat of every key L3 does not know (another process
        may have written it). The same work for every key, hit or not."""
        if self._writes:
            self._drain_writes()
        found = self.index.lookup(keys)
        if self.disk is not None:
            for i, key in enumerate(keys):
                if self.index.holds(key, self.l3):
                    continue
                size = self.disk.payload_bytes(key)
                if size is not None and key not in self._writes:
                    self.index.adopt(key, size, self.l3)
                    self.stats.add(adopted=1)
                    if found[i] < 0:
                        found[i] = self.l3
        return found

    # -- loads ----------------------------------------------------------------------------
    def _read(self, key: bytes):
        """On an I/O thread: (buffer, meta, seconds) or the reason it is a miss."""
        t0 = time.perf_counter()
        try:
            buf, meta = self.disk.read(key, lambda n: host_buffer(n, pinned=True))
        except FileNotFoundError:
            return "vanished"
        except ChunkCorrupt:
            self.disk.remove(key)
            return "corrupt"
        except OSError as e:  # EIO and the like: a miss, reported, the file left as it is
            self.stats.add(read_errors=1)
            self.stats.error(f"L3 directory {self.disk.dir}: reading a chunk failed: {e}",
                             counter=None)
            return "unreadable"
        return buf, meta, time.perf_counter() - t0

    def _finish_load(self, keys, tiers, futures, into: int) -> LoadResult:
        reads = [f.result() if f is not None else None for f in futures]
        result = LoadResult(0)
        try:
            with self._lock:
                for key, read in zip(keys, reads):
                    if isinstance(read, str):  # a miss after all, wherever it stands
                        self.index.forget(key, self.l3)
                        if read != "unreadable":
                            self.stats.add(**{"checksum_failures" if read == "corrupt"
                                              else "vanished": 1})
                protected = set(self._pins)
                for key, t, read in zip(keys, tiers, reads):
                    if isinstance(read, str):
                        break
                    self._restore(key, t, read, into, protected, result)
                self.stats.add(restored_tokens=result.tokens)
                self._trim()
        finally:
            with self._lock:
                self._pins.subtract(keys)
                self._pins += Counter()  # drop zero counts
        return result

    def _restore(self, key, t, read, into, protected, result) -> None:
        name = self.names[t]
        data = None
        if t == self.l3:
            buf, meta, seconds = read
            self._meta[key] = meta
            self.stats.loaded(name, meta.nbytes, seconds)
            data = from_bytes(buf, meta)
            self._apply(self.index.promote(key, t, into, protected), {key: data}, raw={key: buf})
        else:  # in memory: promoted up to ``into`` (a timed copy), or served in place
            t0 = time.perf_counter()
            if t > into:
                self._apply(self.index.promote(key, t, into, protected))
            else:
                self.index.touch(key, t)
            self.stats.loaded(name, self._meta[key].nbytes, time.perf_counter() - t0)
        for u in range(len(self.names)):  # the fastest memory copy there is now
            if u != self.l3 and self.index.holds(key, u):
                data = self.media[u].get(key)
                break
        result.chunks.append(data)
        result.tiers.append(name)
        result.tokens += self.chunk_tokens
        self.stats.add_tier("hit_tokens", name, self.chunk_tokens)

    # -- moves ------------------------------------------------------------------------------
    def _apply(self, moves: Sequence[Move], data=None, raw=None) -> None:
        data, raw = data or {}, raw or {}
        for m in moves:
            if m.op == "free":
                self._free(m.src, m.key)
                continue
            meta = self._meta[m.key]
            src = data[m.key] if m.op == "store" or m.src == self.l3 else self.media[m.src].get(m.key)
            if m.dst == self.l3:
                if m.op == "store":  # the caller's array may change after save returns
                    src = host_bytes(src).copy()
                self._write_later(m.key, src, meta)
            elif m.src == self.l3 and isinstance(self.media[m.dst], HostMedium):
                self.media[m.dst].adopt(m.key, raw[m.key], meta)  # the read buffer itself
            else:
                self.media[m.dst].put(m.key, src, meta)
                self.stats.add_tier("bytes_saved", self.names[m.dst], meta.nbytes)

    def _free(self, t: int, key: bytes) -> None:
        if t != self.l3:
            self.media[t].free(key)
            return
        pending = self._writes.pop(key, None)
        if pending is not None and not pending.cancel():
            pending.exception()  # let the write finish, then delete what it wrote
        self.disk.remove(key)

    def _write_later(self, key: bytes, data, meta: ChunkMeta) -> None:
        self._writes[key] = self._write_pool.submit(self._write, key, data, meta)

    def _write(self, key: bytes, data, meta: ChunkMeta) -> None:
        # On an I/O thread; takes no store lock (``_free`` may wait for this under it).
        self.disk.write(key, data, meta)
        self.stats.add_tier("bytes_saved", "l3", meta.nbytes)

    def _drain_writes(self) -> None:
        """Retire finished disk writes; a failed one is forgotten and its error kept for
        ``flush`` and the report."""
        for key, fut in [(k, f) for k, f in self._writes.items() if f.done()]:
            del self._writes[key]
            err = None if fut.cancelled() else fut.exception()
            if err is None:
                continue
            if not isinstance(err, StorageError):
                err = StorageError(f"L3 directory {self.disk.dir}: writing a chunk failed: {err}")
            self.index.forget(key, self.l3)
            self._errors.append(str(err))
            self.stats.error(str(err))

    def _trim(self) -> None:
        """Watermarks on every tier; over L3's high mark, first a sweep of the directory
        under its lock, so files other processes wrote count against the capacity too."""
        protected = set(self._pins)
        if self.disk is not None:
            l3 = self.index.tiers[self.l3]
            if l3.used_bytes > l3.spec.high_watermark * l3.spec.capacity_bytes:
                with self.disk.lock():
                    self._rescan_l3()
                    self._apply(self.index.trim(protected))
                return
        self._apply(self.index.trim(protected))

    def _rescan_l3(self) -> None:
        """Make the L3 index match the directory: adopt unknown files as the least
        recently used (oldest modification first), forget files that are gone."""
        files = self.disk.scan()
        on_disk = {k for k, _, _ in files}
        tier = self.index.tiers[self.l3]
        for key in [k for k in tier.lru if k not in on_disk and k not in self._writes]:
            self.index.forget(key, self.l3)
            self.stats.add(vanished=1)
        for key, size, _ in reversed(files):
            if key not in tier.lru:
                self.index.adopt(key, size, self.l3, hot=False)
