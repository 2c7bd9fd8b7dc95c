"""The serving driver: many requests sharing L1 (memory tsunami, tenants).

Requests arrive, are admitted or refused, prefill, decode one token per step and finish.
Admission reserves a request's largest footprint against L1 + L2 together, so an admitted
request can always be swapped out and no block is ever lost; a request that cannot be
reserved is refused with ``AdmissionRefused`` (counted, never dropped in silence).
Backpressure works on whole requests, and L1 never goes above the high watermark: a swap-in
or a start that would cross it waits, and before decode growth would cross it the policy
picks running requests to swap out to L2 (demote every block) until L1 is at most the low
watermark; swapped requests come back when there is headroom. ``peak_l1_fraction`` is the
largest L1 use after any allocation of a step, not a sample at its end. With tenants, victims come from
tenants above their guaranteed share first, and every so often one tenant tries to read
another's block, which the allocator must refuse.
"""

from __future__ import annotations

import math
from itertools import chain
from dataclasses import dataclass, field

import numpy as np

from ..blocks import BlockSpec, State, Tier
from ..errors import AccessDenied, AdmissionRefused, ScenarioError
from ..ops import Attention, Ingest, Region, Stream
from ..telemetry import Recorder
from .kv_common import audit_residency, build_kv, finish_step, shape_of


@dataclass
class Request:
    rid: int
    tenant: str
    prompt: int
    decode: int
    arrival: int
    state: str = "waiting"   # waiting -> running <-> swapped -> finished | refused
    generated: int = 0
    blocks: list = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.prompt + self.generated

    def max_blocks(self, bt: int) -> int:
        return math.ceil((self.prompt + self.decode) / bt)


class ServingDriver:
    def __init__(self, scenario, backend, profile, source: str = "scenario"):
        s = scenario
        if s.policy.demote == "drop":
            raise ScenarioError(f"{source}: policy.demote: got 'drop', expected l2 or l2_int4 "
                                f"(the {s.kind} scenario swaps whole requests and must not lose "
                                f"their blocks)")
        self.s, self.backend = s, backend
        self.bt = s.memory.block_tokens
        self.requests = self._requests()
        sizes = shape_of(s)
        working = sum(r.max_blocks(self.bt) for r in self.requests) * sizes.fp16_bytes
        self.max_running = s.workload.max_running
        self.kv = build_kv(s, backend, profile, working, 2, source)
        self.mgr, self.mover, self.table = self.kv.manager, self.kv.mover, self.kv.table
        self.sizes = sizes
        # the most prompt bytes one step can ingest: the largest prompts that may start together
        largest = sorted((r.prompt for r in self.requests), reverse=True)[:self.max_running]
        backend.reserve_staging(sum(largest) * sizes.token_bytes)
        self.capacity_blocks = (self.kv.l1_bytes + self.kv.l2_bytes) // sizes.fp16_bytes
        self.reserved = 0
        self.rec = Recorder()
        self.num_steps = None
        self.shares = {}
        self.protected: set[str] = set()
        if s.kind == "tenants":
            self.shares = {t.name: t.share for t in s.workload.tenants}
            self.protected = {t.name for t in s.workload.tenants if t.protected}
        self.padded_fetches, self.fetch_pad_s = 0, 0.0
        self.protected_fetch_s: list[float] = []  # observed swap-in times, padded
        self._pool = None
        if backend.moves_data:  # set-up, not run time (pinned where the backend DMAs)
            self._payload_pool()
        self._queries: dict[int, np.ndarray] = {}
        self.denied = 0
        self.leaks = 0
        self.peak_l1_fraction = 0.0
        self.roundtrip_checked = 0
        self.roundtrip_mismatch = 0
        self.zero_checked = 0
        self.zero_violations = 0
        self.tenant_stats = {t: {"l1_hits": 0, "l2_hits": 0, "swapped_out": 0, "refused": 0,
                                 "finished": 0, "peak_l1_bytes": 0}
                             for t in sorted({r.tenant for r in self.requests})}

    def _requests(self) -> list[Request]:
        s, w = self.s, self.s.workload
        rng = np.random.default_rng([s.seed, 0x7265])
        reqs = []
        if s.kind == "tsunami":
            arrivals = np.sort(rng.integers(0, w.arrival_steps, w.requests))
            for i, a in enumerate(arrivals.tolist()):
                reqs.append(Request(i, "default", w.prompt_tokens, w.decode_tokens, a))
        else:
            for t in w.tenants:
                for _ in range(t.requests):
                    reqs.append(Request(0, t.name, t.prompt_tokens, t.decode_tokens,
                                        int(rng.integers(0, 8))))
            reqs.sort(key=lambda r: (r.arrival, r.tenant))
            for i, r in enumerate(reqs):
                r.rid = i
        return reqs

    # -- helpers -------------------------------------------------------------------------
    def _l1_fraction(self) -> float:
        return self.mgr.l1_used() / self.mgr.l1_capacity

    def _crosses_high(self, nbytes: int) -> bool:
        """Whether allocating ``nbytes`` more in L1 would take it above the high watermark."""
        return self.mgr.l1_used() + nbytes > self.s.policy.high_watermark * self.mgr.l1_capacity

    def _note_peak(self) -> float:
        """Record L1 use now (after an allocation): the peaks are maxima over the step."""
        frac = self._l1_fraction()
        self.peak_l1_fraction = max(self.peak_l1_fraction, frac)
        for tenant, nbytes in self._tenant_l1().items():
            st = self.tenant_stats[tenant]
            st["peak_l1_bytes"] = max(st["peak_l1_bytes"], nbytes)
        return frac

    def _tenant_l1(self) -> dict[str, int]:
        return self.mgr.spaces.l1.stats().bytes_per_tenant

    def _payload(self, rid: int, pos: int) -> np.ndarray:
        m = self.s.model
        shape = (self.bt, 2, m.layers, m.kv_heads, m.head_dim)
        # a read-only view: decode steps ingest one token of it, not a copy of the block
        return self._payload_pool().take((self.s.seed, 0x7271, rid, pos), math.prod(shape),
                                         copy=False).reshape(shape)

    def _payload_pool(self):
        if self._pool is None:
            from ..workloads.payload import PayloadPool
            self._pool = PayloadPool.for_backend(self.s.seed, self.backend)
        return self._pool

    def _pinned_source(self, items):
        """DMA sources (each region's slice of its block's window of the pinned pool), or
        None when the pool is not pinned."""
        pool = self._payload_pool()
        if not pool.pinned:
            return None
        m = self.s.model
        tok = 2 * m.layers * m.kv_heads * m.head_dim

        def pinned(i):
            rid, pos, lo, _ = items[i]
            start = pool.window_start((self.s.seed, 0x7271, rid, pos), self.bt * tok)
            return None if start is None else (pool.address(start + lo * tok), None)
        return pinned

    def _admit(self, r: Request, t: int) -> None:
        need = r.max_blocks(self.bt)
        if self.reserved + need > self.capacity_blocks:
            raise AdmissionRefused(f"request {r.rid} needs {need} blocks; {self.reserved} of "
                                   f"{self.capacity_blocks} (L1 + L2) are reserved")
        self.reserved += need
        r.state = "queued"

    def _victims(self, running: list[Request], exclude: set[int], t: int) -> list[Request]:
        """Running requests in the order the policy would swap them out."""
        cand = [r for r in running if r.rid not in exclude and r.blocks]
        if self.shares:
            used = self._tenant_l1()
            cap = self.mgr.l1_capacity
            over = [r for r in cand if used.get(r.tenant, 0) > self.shares[r.tenant] * cap]
            cand = over or cand
        if not cand:
            return []
        rids = np.array([r.rid for r in cand], np.int64)
        order = np.argsort(self.policy_scores(rids, t), kind="stable")
        return [cand[i] for i in order]

    def _start_order(self, queued: list[Request]) -> list[Request]:
        """Queued requests in start order: tenants under their share first, then arrival."""
        if not self.shares:
            return list(queued)
        used, cap = self._tenant_l1(), self.mgr.l1_capacity
        return sorted(queued, key=lambda r: (used.get(r.tenant, 0) > self.shares[r.tenant] * cap,
                                             r.arrival, r.rid))

    def policy_scores(self, rids, t):
        return self._req_policy.scores(rids, t)

    # -- the process -----------------------------------------------------------------------
    def process(self):
        from ..policy import make_policy
        p = self.s.policy
        self._req_policy = make_policy(p.eviction)
        self._req_policy.bind(self.max_running)
        mgr, be = self.mgr, self.backend
        low = p.low_watermark
        pending = list(self.requests)
        running: list[Request] = []
        swapped: list[Request] = []
        queued: list[Request] = []
        t = 0
        while pending or running or swapped or queued:
            # 1. arrivals: admit or refuse
            while pending and pending[0].arrival <= t:
                r = pending.pop(0)
                try:
                    self._admit(r, t)
                    queued.append(r)
                except AdmissionRefused:
                    r.state = "refused"
                    mgr.record_refusal(t, [r.rid])
                    self.tenant_stats[r.tenant]["refused"] += 1
            # 2. swap in (oldest first), then start queued requests, while below high
            moves, swapped_in = [], []
            owed: list = []  # L1 sizes of admitted blocks the INT4 staging defers (_fetch_rest)
            for r in list(swapped):
                if len(running) >= self.max_running:
                    break
                ids = np.asarray(r.blocks, np.int64)
                sizes = mgr.l1_sizes(ids)
                if self._crosses_high(sum(sizes) + sum(owed)) or not mgr.fits(owed + list(sizes)):
                    break
                planned = mgr.plan_fetch(ids, t, "fetch")
                moves += planned
                owed += list(sizes)[len(planned):]
                self._note_peak()
                mgr.record_reads(l2=len(ids))
                self.tenant_stats[r.tenant]["l2_hits"] += len(ids)
                swapped.remove(r)
                running.append(r)
                swapped_in.append(r)
                r.state = "running"
                self._req_policy.on_fetch(np.array([r.rid]), t)
            fetch_t0 = be.now()
            tickets = self.mover.submit(moves)
            ingests = []
            for r in self._start_order(queued):
                nb = math.ceil(r.prompt / self.bt)
                if len(running) >= self.max_running:
                    break
                sizes = [self.sizes.fp16_bytes] * nb
                if self._crosses_high(sum(sizes) + sum(owed)) or not mgr.fits(owed + sizes):
                    break
                queued.remove(r)
                ingests.append(self._start(r, t))
                self._note_peak()
                running.append(r)
            ingest = self._ingest(ingests)
            if ingest is not None:
                tickets.append(ingest)
            yield from self.mover.finish(moves, tickets, t)
            yield from self._fetch_rest(swapped_in, t)
            yield from self._pad_fetch(swapped_in, fetch_t0)
            if self.backend.moves_data and self.s.checks.data and moves:
                self._check_roundtrip(moves)
            # 3. decode: one token per running request; a new block when one fills. Growth
            # that would cross the high watermark (or not fit) swaps out first, down to low.
            while True:
                sizes = [self.sizes.fp16_bytes] * sum(r.tokens % self.bt == 0 for r in running)
                fits = mgr.fits(sizes)
                if not sizes or (fits and not self._crosses_high(sum(sizes))):
                    break
                need = mgr.l1_used() + sum(sizes) - int(low * mgr.l1_capacity)
                yield from self._swap_out(running, swapped, set(), t, need_bytes=max(1, need),
                                          forced=not fits)
            appends, grow = [], []
            for r in running:
                pos = r.tokens // self.bt
                if r.tokens % self.bt == 0:
                    grow.append((r, pos))
                else:
                    appends.append((r, pos, r.tokens % self.bt))
            items = []
            for r, pos in grow:
                spec = BlockSpec(self.sizes.fp16_bytes, tenant=r.tenant, token_start=pos * self.bt,
                                 token_end=pos * self.bt + 1, owner=r.rid,
                                 content_hash=f"req:{r.rid}:{pos}")
                b = int(mgr.insert([spec], t, np.array([pos]))[0])
                r.blocks.append(b)
                items.append((r, b, pos, 0))
            if grow:
                self._note_peak()
            for r, pos, off in appends:
                b = r.blocks[pos]
                mgr.extend(b, pos * self.bt + off + 1)
                items.append((r, b, pos, off))
            tok = self._ingest_tokens(items)
            # 4. attention of every running request over its blocks (all in L1): one op
            # for the step, each request its own segment of it
            att = self._attention(running, [tok] if tok is not None else [])
            for r in running:
                mgr.record_reads(l1=len(r.blocks))
                self.tenant_stats[r.tenant]["l1_hits"] += len(r.blocks)
                r.generated += 1
            self._req_policy.on_access(np.array([r.rid for r in running], np.int64), t)
            yield be.wait([att] + ([tok] if tok is not None else []))
            # 5. finished requests leave
            for r in [r for r in running if r.generated >= r.decode]:
                running.remove(r)
                mgr.release(np.asarray(r.blocks, np.int64))
                self.reserved -= r.max_blocks(self.bt)
                r.state = "finished"
                self.tenant_stats[r.tenant]["finished"] += 1
                mgr.log.add(t, "finish", [r.rid])
            # 6. isolation probe
            if self.shares and self.s.workload.probe_every and t % self.s.workload.probe_every == 0:
                self._probe(running, t)
            frac = self._note_peak()
            audit_residency(self)
            if self.s.checks.invariants:
                mgr.check()
                assert self.lost_blocks() == 0, "an admitted request lost a block"
            extra = finish_step(self)
            self.rec.step(t, be.now(), **extra, l1_bytes=self.table.bytes_in(Tier.L1),
                          l2_bytes=self.table.bytes_in(Tier.L2), l1_fraction=frac,
                          running=len(running), swapped=len(swapped), queued=len(queued),
                          refused=mgr.counters.refusals)
            t += 1

    def _start(self, r: Request, t: int):
        nb = math.ceil(r.prompt / self.bt)
        specs = [BlockSpec(self.sizes.fp16_bytes, tenant=r.tenant, token_start=p * self.bt,
                           token_end=min((p + 1) * self.bt, r.prompt), owner=r.rid,
                           content_hash=f"req:{r.rid}:{p}") for p in range(nb)]
        ids = self.mgr.insert(specs, t, np.arange(nb))
        r.blocks = ids.tolist()
        r.state = "running"
        self._req_policy.on_insert(np.array([r.rid]), t, np.array([r.rid]))
        self.mgr.log.add(t, "start", [r.rid])
        return r

    def _ingest(self, started: list[Request]):
        regions, items = [], []
        tb = self.sizes.token_bytes
        for r in started:
            ntok = (self.table.token_end[r.blocks] - self.table.token_start[r.blocks]).tolist()
            # the offsets checked for the request's tenant per allocator at once
            for p, (offset, n) in enumerate(zip(self.mover.l1_offsets(r.blocks), ntok)):
                regions.append(Region("l1", offset, n * tb, r.tenant))
                items.append((r.rid, p, 0, n))
        return self._submit_ingest(regions, items)

    def _ingest_tokens(self, items):
        self.mover.relocate()  # freed slots are zeroed (and compacted) before any check
        if self.backend.moves_data and self.s.checks.data:
            for _, b, _, off in items:
                if off == 0:
                    self._check_zero(b)
        tb = self.sizes.token_bytes
        offsets = self.mover.l1_offsets([b for _, b, _, _ in items])
        regions = [Region("l1", o + off * tb, tb, r.tenant)
                   for o, (r, _, _, off) in zip(offsets, items)]
        src = [(r.rid, pos, off, off + 1) for r, _, pos, off in items]
        return self._submit_ingest(regions, src)

    def _submit_ingest(self, regions, items):
        if not regions:
            return None
        fill = pinned = None
        if self.backend.moves_data:
            def fill(i, out, items=items):
                rid, pos, lo, hi = items[i]
                kv = self._payload(rid, pos)
                out.view(np.float16).reshape((hi - lo,) + kv.shape[1:])[:] = kv[lo:hi]
            pinned = self._pinned_source(items)
        return self.mover.submit_op(Ingest(purpose="ingest", dst=tuple(regions), fill=fill,
                                           pinned=pinned), Stream.H2D)

    def _attention(self, running: list[Request], after):
        """One attention op over every running request's blocks (a segment each)."""
        if not running:
            return None
        m = self.s.model
        counts = [len(r.blocks) for r in running]
        ids = np.fromiter(chain.from_iterable(r.blocks for r in running), np.int64,
                          sum(counts))
        seg = np.zeros(len(running) + 1, np.int64)
        np.cumsum(counts, out=seg[1:])
        nv = self.table.token_end[ids] - self.table.token_start[ids]
        queries = [self._query(r.rid) for r in running] if self.backend.moves_data else None
        flops = 4.0 * m.layers * m.kv_heads * m.head_dim * float(nv.sum())
        return self.mover.attention_batch(ids, nv, seg, [r.tenant for r in running], queries,
                                          flops, self.sizes.layout,
                                          softmax_scale=m.head_dim ** -0.5, after=after,
                                          readback=False)

    def _query(self, rid: int) -> np.ndarray:
        # One query per request: drawing a fresh one every step cost 0.5 ms of host time
        # per attention op, synthetic-workload work the system does not do.
        q = self._queries.get(rid)
        if q is None:
            m = self.s.model
            rng = np.random.default_rng([self.s.seed, 0x71, rid])
            q = rng.standard_normal((m.layers, m.kv_heads, m.head_dim), np.float32)
            self._queries[rid] = q
        return q

    def _pad_fetch(self, swapped_in, t0: float):
        """Timing protection: when a protected tenant's request was swapped in, the host
        goes on only at a whole number of quanta after the fetch was submitted, so how
        long it took (how much was in L2, what others moved) does not show."""
        if not any(r.tenant in self.protected for r in swapped_in):
            return
        q = self.s.policy.fetch_quantum_us * 1e-6
        if q:
            elapsed = self.backend.now() - t0
            pad = max(1, math.ceil(elapsed / q)) * q - elapsed
            self.padded_fetches += 1
            self.fetch_pad_s += pad
            yield self.backend.delay(pad)
        self.protected_fetch_s.append(self.backend.now() - t0)  # what the tenant can see

    def _fetch_rest(self, requests, t):
        """The device staging that INT4 blocks pass through takes a swap-in in rounds (as
        it does a swap-out): fetch what is still in L2 until every block of a swapped-in
        request is in L1 (attention reads only L1; without this, tenants and tsunami with
        ``policy.demote=l2_int4`` stopped with AccessDenied)."""
        mgr = self.mgr
        for r in requests:
            ids = np.asarray(r.blocks, np.int64)
            while True:
                left = ids[mgr.tiers(ids) == Tier.L2]
                if not len(left):
                    break
                moves = mgr.plan_fetch(left, t, "fetch")
                if not moves:
                    raise AdmissionRefused("no INT4 staging slot is free for a swap-in")
                yield from self.mover.execute(moves, t)

    def _swap_out(self, running, swapped, exclude, t, need_bytes: int, forced: bool = False):
        mgr = self.mgr
        victims, freed = [], 0
        for r in self._victims(running, exclude, t):
            if freed >= need_bytes:
                break
            victims.append(r)
            freed += int(self.table.nbytes[np.asarray(r.blocks, np.int64)].sum())
        if not victims:
            raise AdmissionRefused(f"L1 cannot make room for {need_bytes} bytes: every running "
                                   f"request is protected this step")
        for r in victims:
            ids = np.asarray(r.blocks, np.int64)
            while True:  # INT4 staging may take a request in several rounds
                left = ids[mgr.tiers(ids) == Tier.L1]
                if not len(left):
                    break
                moves = mgr.evict(left, t, forced)
                if not moves:
                    raise AdmissionRefused("no INT4 staging slot is free for a swap-out")
                yield from self.mover.execute(moves, t)
            running.remove(r)
            swapped.append(r)
            r.state = "swapped"
            self.tenant_stats[r.tenant]["swapped_out"] += 1
            mgr.log.add(t, "swap_out", [r.rid])

    def _probe(self, running, t):
        """One tenant asks for another tenant's block; the allocator must refuse."""
        owners = {}
        for r in running:
            if r.blocks:
                owners.setdefault(r.tenant, r.blocks[0])
        names = sorted(owners)
        if len(names) < 2:
            return
        thief, victim = names[t % len(names)], names[(t + 1) % len(names)]
        try:
            self.mover.read_as(thief, owners[victim])
            self.leaks += 1
        except AccessDenied:
            self.denied += 1

    def _check_zero(self, b: int) -> None:
        """A block's fresh slab must read zeros before its first token lands."""
        region, _ = self.mover.block_region(b)
        data = self.backend.read_region(region)
        self.zero_checked += 1
        if data.any():
            self.zero_violations += 1

    def _check_roundtrip(self, moves) -> None:
        """Blocks back from L2 hold the bytes they left with (fp16 path: bit-exact)."""
        from ..blocks import Fmt
        for m in moves:
            if m.src_fmt != Fmt.FP16:  # an INT4 copy comes back within the INT4 bound only
                continue
            b = m.block
            r = self.requests[int(self.table.owner[b])]
            pos = int(self.table.token_start[b]) // self.bt
            n = int(self.table.token_end[b] - self.table.token_start[b])
            want = np.ascontiguousarray(self._payload(r.rid, pos)[:n]).view(np.uint8).reshape(-1)
            region, _ = self.mover.block_region(b)
            got = self.backend.read_region(Region(region.space, region.offset, want.size))
            self.roundtrip_checked += 1
            if not np.array_equal(got, want):
                self.roundtrip_mismatch += 1

    # -- results ----------------------------------------------------------------------------
    def metrics(self) -> dict:
        served = sum(r.state == "finished" for r in self.requests)
        out = {
            "requests": len(self.requests),
            "served": served,
            "refused": sum(r.state == "refused" for r in self.requests),
            "unaccounted_requests": len(self.requests) - served
                                    - sum(r.state == "refused" for r in self.requests),
            "peak_l1_fraction": self.peak_l1_fraction,
            "high_watermark": self.s.policy.high_watermark,
        }
        if self.backend.moves_data and self.s.checks.data:
            out.update(roundtrip_checked=self.roundtrip_checked,
                       roundtrip_mismatches=self.roundtrip_mismatch,
                       zero_on_free_checked=self.zero_checked,
                       zero_on_free_violations=self.zero_violations)
        if self.shares:
            out.update(cross_tenant_denied=self.denied, cross_tenant_leaks=self.leaks,
                       tenants=self.tenant_stats, padded_fetches=self.padded_fetches,
                       fetch_pad_s=self.fetch_pad_s)
        return out

    def decisions(self):
        return self.mgr.log.entries

    def lost_blocks(self) -> int:
        lost = 0
        for r in self.requests:
            if r.state in ("running", "swapped") and r.blocks:
                ids = np.asarray(r.blocks, np.int64)
                lost += int((self.table.state[ids] != State.LIVE).sum())
        return lost
