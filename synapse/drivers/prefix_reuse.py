"""The prefix-reuse driver: requests whose prompts share prefixes, served one at a time,
each loading what L1/L2/L3 hold and computing the rest.

Per request (one step):
1. lookup: the prompt's chunk keys (``synapse.prefix.keys``, salted by tenant) in the
   ``PrefixIndex``; the longest cached prefix is used, leaving at least one token to
   compute.
2. load: chunks in L2 are copied to L1 (H2D); chunks in L3 are read from their files into
   L2 (disk stream) and then copied to L1. Victims that make room are demoted first.
3. compute: one ``Prefill`` op writes the KV of the remaining tokens into L1 after the
   loads (the time to first token ends when it completes). The new whole chunks are
   saved: kept in L1 and, with ``write_through``, copied to L2 (D2H) and written to L3.
4. watermarks: every tier above its high mark is trimmed to its low mark (background).

Decisions (every hit and every move of the index, in order) come from the same
``PrefixIndex`` on every backend; the simulator times the ops from the profile (disk
reads and writes from its ``disk`` section), the hardware backends move real bytes and
write real chunk files (``synapse.prefix.disk``, in a temporary directory unless
``workload.l3_dir`` names one) and check that every restored chunk holds the bytes that
were computed for it. Deleting an evicted file is not charged by the simulator.
"""

from __future__ import annotations

import shutil
import tempfile

import numpy as np

from ..config import to_dict
from ..errors import KernelError, ScenarioError
from ..hw.kv_layout import KVLayout
from ..manager import Counters, DecisionLog
from ..ops import Copy, DiskIO, Prefill, Region, Stream
from ..prefix.chunk import describe
from ..prefix.index import PrefixIndex, TierSpec
from ..prefix.keys import Fingerprint, chunk_keys, config_digest
from ..telemetry import Recorder, latency_summary
from ..units import fmt_bytes
from ..workloads.prefix_reuse import prefix_requests
from .kv_common import resolve_budget

NAMES = ("l1", "l2", "l3")
L1, L2, L3 = 0, 1, 2


class PrefixReuseDriver:
    def __init__(self, scenario, backend, profile, source: str = "scenario"):
        s, w, m = scenario, scenario.workload, scenario.model
        self.s, self.w, self.backend = s, w, backend
        if w.chunk_tokens % 4:
            raise ScenarioError(f"{source}: workload.chunk_tokens: got {w.chunk_tokens}, "
                                f"expected a multiple of 4")
        self.C = w.chunk_tokens
        self.layout = KVLayout(m.layers, m.kv_heads, m.head_dim, self.C, s.memory.int4_group)
        self.cb = self.layout.fp16_bytes
        self.fp = Fingerprint(f"scenario:{s.name}", config_digest(to_dict(m)), "float16",
                              self.C, "token-major [tokens, 2, layers, kv_heads, head_dim]")
        self.requests = prefix_requests(w, s.seed)
        self.keys = [chunk_keys(r.tokens, self.fp, r.tenant) for r in self.requests]
        longest = max(len(k) for k in self.keys)
        working = len({k for ks in self.keys for k in ks}) * self.cb
        budgets = [resolve_budget(s.memory.l1_budget, working, "memory.l1_budget", source,
                                  profile.hbm_bytes, f"the HBM of profile {profile.name}"),
                   resolve_budget(s.memory.l2_budget, working, "memory.l2_budget", source,
                                  profile.host_pinned_bytes,
                                  f"the pinned host memory of profile {profile.name}"),
                   resolve_budget(w.l3_budget, working, "workload.l3_budget", source, 1 << 62,
                                  "2^62 bytes")]
        fields = ("memory.l1_budget", "memory.l2_budget", "workload.l3_budget")
        values = (s.memory.l1_budget, s.memory.l2_budget, w.l3_budget)
        self.slots = [b // self.cb for b in budgets]
        for t in range(3):
            if self.slots[t] < longest:
                raise ScenarioError(
                    f"{source}: {fields[t]}: got {values[t]!r} = {fmt_bytes(budgets[t])}, below "
                    f"what the longest prompt passes through it: {longest} chunks of "
                    f"{fmt_bytes(self.cb)} = {fmt_bytes(longest * self.cb)}")
        p = s.policy
        self.index = PrefixIndex([TierSpec(NAMES[t], self.slots[t] * self.cb, p.high_watermark,
                                           p.low_watermark) for t in range(3)], w.write_through)
        # L1: the cached chunks' slots, then scratch for the request's uncached tail (and,
        # without reuse, for all of its chunks).
        self.scratch = 1 if w.reuse else longest + 1
        self.l1 = backend.memory("l1", (self.slots[L1] + self.scratch) * self.cb, "device")
        self.l2 = backend.memory("l2", self.slots[L2] * self.cb, "pinned_host")
        if backend.moves_data:
            backend.reserve_staging((longest + 1) * self.cb)
        self.free = {L1: list(range(self.slots[L1] - 1, -1, -1)),
                     L2: list(range(self.slots[L2] - 1, -1, -1))}
        self.slot_of: dict[int, dict[bytes, int]] = {L1: {}, L2: {}}
        self.last: dict = {}          # (tier, slot) or key -> ticket of its last op
        self.disk = None
        self._tmp = None
        if backend.moves_data:
            from ..prefix.disk import DiskTier
            root = w.l3_dir or tempfile.mkdtemp(prefix="synapse-l3-")
            self._tmp = None if w.l3_dir else root
            self.disk = DiskTier(root, self.fp)
        self.working_bytes = working
        self.budgets = budgets
        self.counters = Counters()
        self.log = DecisionLog()
        self.rec = Recorder()
        self.num_steps = len(self.requests)
        self._ids: dict[bytes, int] = {}
        self._pool = None
        if backend.moves_data:  # set-up, not run time (pinned where the backend DMAs)
            self._payload_pool()
        self.ttft: list[float] = []
        self.restored = {n: 0 for n in NAMES}
        self.computed_tokens = 0
        self.checked = self.mismatches = 0

    # -- data -----------------------------------------------------------------------------
    def _id(self, key: bytes) -> int:
        return self._ids.setdefault(key, len(self._ids))

    def _payload_pool(self):
        if self._pool is None:
            from ..workloads.payload import PayloadPool
            self._pool = PayloadPool.for_backend(self.s.seed, self.backend)
        return self._pool

    def _payload(self, tag: tuple, nbytes: int) -> np.ndarray:
        return self._payload_pool().take(tag, nbytes // 2).view(np.uint8)

    def _chunk_tag(self, key: bytes) -> tuple:
        return (self.s.seed, 0x6B76, *np.frombuffer(key[:16], "<u4").tolist())

    def _chunk_payload(self, key: bytes) -> np.ndarray:
        """The KV computed for a chunk: a function of its key, so of its whole prefix."""
        return self._payload(self._chunk_tag(key), self.cb)

    def _prefill_sources(self, regions, sources):
        """``fill`` (one copy into staging) and, where the pool is pinned, ``pinned`` (DMA
        from it, no host copy) for a prefill's regions."""
        pool = self._payload_pool()

        def tag(i):
            src = sources[i]
            return self._chunk_tag(src) if isinstance(src, bytes) else src

        def fill(i, out):
            out[:] = pool.take(tag(i), regions[i].nbytes // 2, copy=False).view(np.uint8)

        def pinned(i):
            start = pool.window_start(tag(i), regions[i].nbytes // 2)
            return None if start is None else (pool.address(start), None)
        return fill, (pinned if pool.pinned else None)

    def _region(self, tier: int, slot: int, nbytes: int | None = None) -> Region:
        return Region(NAMES[tier], slot * self.cb, self.cb if nbytes is None else nbytes)

    # -- the process --------------------------------------------------------------------------
    def process(self):
        try:
            for t, req in enumerate(self.requests):
                yield from self._serve(t, req)
            yield self.backend.wait(list(self.last.values()))   # background saves
            self.run_end_s = self.backend.now()
            c, tiers = self.counters, self.index.tiers
            c.evictions = sum(x.counters.evictions for x in tiers)
            c.demotions = sum(x.counters.demotions for x in tiers)
            c.drops = tiers[L3].counters.drops
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def _serve(self, t: int, req):
        be, ix, w, C = self.backend, self.index, self.w, self.C
        keys = self.keys[t]
        t0 = be.now()
        n = 0
        if w.reuse:
            found = ix.lookup(keys)
            n = ix.leading(found[:(len(req.tokens) - 1) // C])
            for tier in range(3):
                hit = [self._id(k) for k, f in zip(keys[:n], found[:n]) if f == tier]
                self.log.add(t, f"hit_{NAMES[tier]}", hit)
                self.restored[NAMES[tier]] += len(hit) * C
            c = self.counters
            c.l1_hits += found[:n].count(L1)
            c.l2_hits += found[:n].count(L2)
            c.misses += len(keys) - found[:n].count(L1) - found[:n].count(L2)  # L3 or computed
            c.fetches += n - found[:n].count(L1)
        protected = set(keys)
        loads = []
        for i in range(n):
            if found[i] > L1:
                for m in ix.promote(keys[i], found[i], L1, protected):
                    issue = self._plan(t, m)
                    loads.append(issue())
        new = set(keys[n:]) if w.reuse else set()
        deferred = []
        for k in keys[n:] if w.reuse else ():
            for m in ix.store(k, self.cb, protected):
                issue = self._plan(t, m)
                (deferred.append(issue) if m.key in new else issue())
        prefill = self._prefill(t, req, keys, n, [x for x in loads if x is not None])
        for issue in deferred:
            issue()
        yield be.wait([prefill])
        self.ttft.append(be.now() - t0)
        if be.moves_data and self.s.checks.data:
            self._check_restored(keys[:n])
        for m in ix.trim():
            self._plan(t, m)()
        if self.s.checks.invariants:
            self._check_invariants()
        self.computed_tokens += len(req.tokens) - n * C
        self.rec.step(t, be.now(), ttft_s=self.ttft[-1], restored_tokens=n * C,
                      computed_tokens=len(req.tokens) - n * C,
                      **{f"{NAMES[u]}_bytes": ix.tiers[u].used_bytes for u in range(3)})

    def _prefill(self, t: int, req, keys, n: int, loads):
        """One op for the uncached tokens: every new whole chunk (its L1 slot, or scratch
        without reuse) and the partial tail (scratch)."""
        C, cb, m = self.C, self.cb, self.s.model
        total = len(req.tokens)
        regions, sources, after = [], [], list(loads)
        base = self.slots[L1]
        for j, k in enumerate(keys[n:]):
            slot = self.slot_of[L1][k] if self.w.reuse else base + 1 + j
            regions.append(self._region(L1, slot))
            sources.append(k)
            after.append(self.last.get((L1, slot)))
        tail = total % C
        if tail:
            regions.append(self._region(L1, base, tail * self.layout.token_bytes))
            sources.append((self.s.seed, 0x7461, t))
        new_tokens = total - n * C
        ctx = n * C
        hq = m.kv_heads * self.w.q_per_kv
        attn = 4.0 * m.layers * hq * m.head_dim * (new_tokens * ctx + new_tokens * (new_tokens - 1) / 2)
        flops = 2.0 * self.w.params * new_tokens + attn
        fill = pinned = None
        if self.backend.moves_data:
            fill, pinned = self._prefill_sources(regions, sources)
        op = Prefill(purpose="prefill", dst=tuple(regions), fill=fill, pinned=pinned,
                     flops=flops, tokens=new_tokens)
        ticket = self.backend.submit(op, Stream.COMPUTE, after)
        for r in regions:
            self.last[(L1, r.offset // self.cb)] = ticket
        self.log.add(t, "compute", [self._id(k) for k in keys[n:]] or [-1])
        return ticket

    def _plan(self, t: int, m):
        """Book one move now (slots, the decision log); return what submits its op."""
        self.log.add(t, f"{m.op}_{NAMES[m.dst] if m.op == 'store' else NAMES[m.src]}"
                        f"{'' if m.op != 'copy' else '_' + NAMES[m.dst]}", [self._id(m.key)])
        key = m.key
        if m.op == "store":
            if m.dst != L1:
                raise KernelError(f"prefix index stored chunk {self._id(key)} in "
                                  f"{NAMES[m.dst]}; computed KV is in L1")
            self.slot_of[L1][key] = self.free[L1].pop()
            return lambda: None
        if m.op == "free":
            if m.src == L3:
                return lambda: self._remove_file(key)
            self.free[m.src].append(self.slot_of[m.src].pop(key))
            return lambda: None
        src, dst = m.src, m.dst
        if (src, dst) in ((L1, L2), (L2, L1)):
            s_slot = self.slot_of[src][key]
            d_slot = self.free[dst].pop()
            self.slot_of[dst][key] = d_slot
            return lambda: self._copy(src, s_slot, dst, d_slot)
        if (src, dst) == (L2, L3):
            slot = self.slot_of[L2][key]
            return lambda: self._disk("write", key, slot)
        if (src, dst) == (L3, L2):
            slot = self.free[L2].pop()
            self.slot_of[L2][key] = slot
            return lambda: self._disk("read", key, slot)
        raise KernelError(f"prefix index moved chunk {self._id(key)} {NAMES[src]} -> "
                          f"{NAMES[dst]}, which this driver has no path for")

    def _copy(self, src: int, s_slot: int, dst: int, d_slot: int):
        after = [self.last.get((src, s_slot)), self.last.get((dst, d_slot))]
        direction, stream = ("h2d", Stream.H2D) if dst == L1 else ("d2h", Stream.D2H)
        op = Copy.between(f"{NAMES[src]}_to_{NAMES[dst]}", direction,
                          self._region(src, s_slot), self._region(dst, d_slot))
        ticket = self.backend.submit(op, stream, after)
        self.last[(src, s_slot)] = self.last[(dst, d_slot)] = ticket
        return ticket if dst == L1 else None

    def _disk(self, direction: str, key: bytes, slot: int):
        run = None
        if self.disk is not None:
            view = self.l2.view(slot * self.cb, self.cb)
            if direction == "write":
                arr = view.view(np.float16).reshape(self.layout.shape)
                run = lambda: self.disk.write(key, arr, describe(arr, "fp16"))  # noqa: E731
            else:
                run = lambda: self._read_file(key, view)  # noqa: E731
        op = DiskIO(purpose=f"disk_{direction}", direction=direction,
                    sizes=np.array([self.cb], np.int64), run=run)
        stream = Stream.DISK_READ if direction == "read" else Stream.DISK_WRITE
        ticket = self.backend.submit(op, stream, [self.last.get(key), self.last.get((L2, slot))])
        self.last[key] = self.last[(L2, slot)] = ticket
        return None

    def _remove_file(self, key: bytes) -> None:
        if self.disk is not None:
            last = self.last.pop(key, None)
            if last is not None:  # disk ops run off the loop: the file's last one first
                self.backend.result(last)
            self.disk.remove(key)

    def _read_file(self, key: bytes, view: np.ndarray) -> None:
        from ..prefix.chunk import ChunkCorrupt

        def into(nbytes):
            if nbytes != view.nbytes:
                raise ChunkCorrupt(f"{nbytes} payload bytes for a slot of {view.nbytes}")
            return view
        try:
            self.disk.read(key, into)
        except (OSError, ChunkCorrupt) as e:
            raise KernelError(f"disk_read of chunk {self._id(key)}: {e}") from None

    # -- checks and results ------------------------------------------------------------------
    def _check_restored(self, keys) -> None:
        """Every restored chunk in L1 holds exactly the bytes computed for it."""
        for k in keys:
            got = self.backend.read_region(self._region(L1, self.slot_of[L1][k]))
            self.checked += 1
            self.mismatches += not np.array_equal(got, self._chunk_payload(k))

    def _check_invariants(self) -> None:
        for t in (L1, L2):
            assert set(self.slot_of[t]) == set(self.index.tiers[t].lru), f"{NAMES[t]} slots"
            assert len(self.slot_of[t]) + len(self.free[t]) == self.slots[t]

    @property
    def mgr(self):
        return self

    def metrics(self) -> dict:
        recs = self.backend.records()
        disk_read = sum(r.nbytes for r in recs if r.kind == "disk_read")
        disk_write = sum(r.nbytes for r in recs if r.kind == "disk_write")
        prompt = sum(len(r.tokens) for r in self.requests)
        restored = sum(self.restored.values())
        by_kind = {}
        for kind in ("chat", "document"):
            v = [x for x, r in zip(self.ttft, self.requests) if r.kind == kind]
            by_kind[kind] = float(np.mean(v)) if v else None
        saved = sum(1 for _, action, _ in self.log.entries if action == "store_l1")
        out = {
            "requests": len(self.requests),
            "prompt_tokens": prompt,
            "restored_tokens": dict(self.restored),
            "computed_tokens": self.computed_tokens,
            "token_hit_rate": restored / prompt if prompt else None,
            "ttft": latency_summary(self.ttft),
            "ttft_mean_s_by_kind": by_kind,
            "disk_read_bytes": disk_read,
            "disk_write_bytes": disk_write,
            "working_set_bytes": self.working_bytes,
            "chunk_bytes": self.cb,
            "tiers": {t.spec.name: {"capacity_bytes": t.spec.capacity_bytes,
                                    "used_bytes": t.used_bytes, "evictions": t.counters.evictions,
                                    "demotions": t.counters.demotions, "drops": t.counters.drops}
                      for t in self.index.tiers},
            "chunks_saved": saved,
            "saves_but_no_loads": saved > 0 and restored == 0,
        }
        if self.backend.moves_data and self.s.checks.data:
            out.update(restored_checked=self.checked, restored_mismatches=self.mismatches)
        return out

    def decisions(self):
        return self.log.entries

    def lost_blocks(self) -> int:
        return 0  # a chunk leaves the cache only by a counted drop; a request never loses one
