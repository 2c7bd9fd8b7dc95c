"""Prefix store telemetry: what was looked up, found, loaded, saved and lost, per tier.

``report()`` is a plain dict (JSON-ready) with one flag a user of any offloading cache
wants first: ``saves_but_no_loads``, true when chunks were saved but no lookup ever
restored a token, i.e. the store costs copies and disk writes and saves nothing (a
prompt that never repeats, a tenant salt or fingerprint that changes between calls, or
a chunk size larger than the shared prefix). ``load_per_chunk`` is the time to bring a
chunk to the tier it is served from (an L3 read and check, a copy up into L1; about zero
for a chunk served in place); ``bytes_loaded`` counts the payload of the chunks served
from each tier. The counters are updated under a lock because the L3 I/O
threads report too.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from ..telemetry import latency_summary


class PrefixStats:
    def __init__(self, tiers):
        self.tiers = list(tiers)
        self._lock = threading.Lock()
        self.lookups = 0
        self.lookup_tokens = 0
        self.hit_tokens = {t: 0 for t in self.tiers}
        self.restored_tokens = 0
        self.bytes_loaded = {t: 0 for t in self.tiers}
        self.bytes_saved = {t: 0 for t in self.tiers}
        self.load_s: dict[str, list] = defaultdict(list)
        self.chunks_saved = 0
        self.checksum_failures = 0
        self.vanished = 0            # a file the index knew was gone (another process)
        self.adopted = 0             # files another process wrote, found by this one
        self.write_errors = 0
        self.read_errors = 0
        self.last_error = ""

    def add(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def add_tier(self, counter: str, tier: str, value) -> None:
        with self._lock:
            getattr(self, counter)[tier] += value

    def loaded(self, tier: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.bytes_loaded[tier] += nbytes
            self.load_s[tier].append(seconds)

    def error(self, message: str, counter: str | None = "write_errors") -> None:
        with self._lock:
            if counter:
                setattr(self, counter, getattr(self, counter) + 1)
            self.last_error = message

    def report(self, index=None) -> dict:
        with self._lock:
            hit = sum(self.hit_tokens.values())
            out = {
                "lookups": self.lookups,
                "lookup_tokens": self.lookup_tokens,
                "hit_tokens": dict(self.hit_tokens),
                "restored_tokens": self.restored_tokens,
                "token_hit_rate": hit / self.lookup_tokens if self.lookup_tokens else None,
                "bytes_loaded": dict(self.bytes_loaded),
                "bytes_saved": dict(self.bytes_saved),
                "load_per_chunk": {t: latency_summary(v) for t, v in self.load_s.items()},
                "chunks_saved": self.chunks_saved,
                "checksum_failures": self.checksum_failures,
                "vanished_files": self.vanished,
                "adopted_files": self.adopted,
                "write_errors": self.write_errors,
                "read_errors": self.read_errors,
                "last_error": self.last_error,
                "saves_but_no_loads": self.chunks_saved > 0 and self.restored_tokens == 0,
            }
        if index is not None:
            out["tiers"] = {t.spec.name: {"capacity_bytes": t.spec.capacity_bytes,
                                          "used_bytes": t.used_bytes, "chunks": len(t),
                                          "evictions": t.counters.evictions,
                                          "demotions": t.counters.demotions,
                                          "drops": t.counters.drops}
                            for t in index.tiers}
        if out["saves_but_no_loads"]:
            out["warning"] = (f"{self.chunks_saved} chunks saved but no lookup restored a "
                              f"token: the store is doing nothing useful")
        return out
