"""Prefix reuse: KV of token chunks keyed by content, kept in L1/L2/L3 and loaded instead
of recomputed (docs/prefix.md).

- ``keys``: the prefix-hash chain, tenant salts and the model/layout fingerprint
- ``index``: LRU + watermarks + capacities per tier, as moves (no I/O)
- ``chunk``: a chunk's header and the L3 file format with its checksum
- ``media``: L1 device and L2 pinned-host storage behind one small interface
- ``disk``: the L3 directory (atomic writes, recovery, sharing between processes)
- ``store``: ``PrefixStore``, the public save / load / check
- ``stats``: telemetry, including "saves but no loads"
"""

from .index import Move, PrefixIndex, TierSpec
from .keys import Fingerprint, chunk_keys, config_digest
from .store import LoadHandle, LoadResult, PrefixStore, SaveResult

__all__ = ["Fingerprint", "LoadHandle", "LoadResult", "Move", "PrefixIndex", "PrefixStore",
           "SaveResult", "TierSpec", "chunk_keys", "config_digest"]
