"""The needle-in-a-haystack driver: one long sequence, block-level eviction.

Per step (the same generator on every backend):
1. demand: the blocks the step uses are L1 hits, L2 hits (fetched before compute) or
   misses (dropped earlier); at the question step the needle's tier is recorded;
2. room: if the step's new blocks and fetches do not fit, forced eviction (synchronous);
3. fetch from L2 and ingest the new KV (prompt chunk or one decode token), then wait;
4. attention over everything resident in L1 (the output is real on the hardware);
5. the policy observes the attention masses of the resident blocks;
6. background: demotion down to the low watermark and prefetch into the headroom,
   overlapping the attention; then commit.
"""

from __future__ import annotations

import numpy as np

from ..blocks import BlockSpec, Fmt, Tier
from ..ops import Attention, Ingest, Region, Stream
from ..telemetry import Recorder
from ..workloads.needle import NeedleTrace
from ..kv.planner import follow_tail
from .kv_common import audit_residency, build_kv, finish_step, shape_of

_NONE, _L1, _L2 = int(Tier.NONE), int(Tier.L1), int(Tier.L2)  # NumPy compares plain ints fast


class NeedleDriver:
    def __init__(self, scenario, backend, profile, source: str = "scenario"):
        s = scenario
        self.s, self.backend = s, backend
        self.trace = NeedleTrace(s.workload, s.memory.block_tokens, s.seed)
        tr = self.trace
        shape = shape_of(s)
        working = tr.num_blocks * shape.fp16_bytes
        self.kv = build_kv(s, backend, profile, working, tr.chunk_blocks + 2, source)
        self.mgr, self.mover, self.table = self.kv.manager, self.kv.mover, self.kv.table
        backend.reserve_staging(tr.chunk_blocks * tr.bt * shape.token_bytes)
        if self.mgr.policy.needs_future:
            self.mgr.policy.bind_future(self._next_use, self._used_between)
        self.pos2id = np.full(tr.num_blocks, -1, np.int64)
        self.rec = Recorder()
        self.m = s.model
        self._mean_v: dict[int, np.ndarray] = {}
        self.needle_tier: str | None = None
        self.errors: list[tuple[int, float]] = []
        self.score_err = 0.0
        self.tail: int | None = None
        if backend.moves_data:  # set-up, not run time (pinned where the backend DMAs)
            self.trace.payload_pool(backend)

    def _next_use(self, ids: np.ndarray, step: int) -> np.ndarray:
        # Block ids are assigned in position order for a single sequence.
        return self.trace.next_use(self.table.token_start[ids] // self.trace.bt, step)

    def _used_between(self, a: int, t: int) -> np.ndarray:
        """Ids of the blocks used at steps ``a + 1`` to ``t`` (inserted ones only: a block
        inserted later is scored when it arrives)."""
        pos = [self.trace.needed(s) for s in range(a + 1, t + 1)]
        ids = self.pos2id[pos[0] if len(pos) == 1 else np.concatenate(pos)]
        return ids[ids >= 0]

    # -- payloads (hardware backends only) ----------------------------------------------
    def _payload(self, pos: int) -> np.ndarray:
        kv = self.trace.block_payload(pos, self.m.layers, self.m.kv_heads, self.m.head_dim)
        return kv

    def _ingest_pinned(self, items):
        """DMA sources: each block's window of the pinned pool, its key written on the
        device (``cuda/kv_fill.cu``); None when the pool is not pinned."""
        m, tr = self.m, self.trace
        if not tr.payload_pool(self.backend).pinned:
            return None
        pool = tr.payload_pool()
        tok = 2 * m.layers * m.kv_heads * m.head_dim
        keys = tr.keys

        def pinned(i: int):
            pos, tok_lo, _ = items[i]
            start = tr.block_window(pos, tr.bt * tok)
            if start is None:
                return None
            return pool.address(start + tok_lo * tok), keys[pos].astype(np.float16)
        return pinned

    def _ingest_fill(self, items):
        m = self.m
        row = (2, m.layers, m.kv_heads, m.head_dim)

        def fill(i: int, out: np.ndarray) -> None:
            pos, tok_lo, tok_hi = items[i]
            kv = out.view(np.float16).reshape((tok_hi - tok_lo,) + row)
            self.trace.write_block_payload(pos, kv, tok_lo)
            if (self.s.checks.data and pos not in self._mean_v
                    and tok_hi == self.trace.bt and tok_lo == 0):  # kept for _check_output
                self._mean_v[pos] = kv[:, 1].astype(np.float64).mean(axis=0)
        return fill

    # -- the process ----------------------------------------------------------------------
    def process(self):
        tr, mgr, mover, table, be = self.trace, self.mgr, self.mover, self.table, self.backend
        bt = tr.bt
        for t in range(tr.num_steps):
            st = tr.step(t)
            # 1. demand
            needed_pos = tr.needed(t)
            needed_pos = needed_pos[self.pos2id[needed_pos] >= 0]  # new blocks are not hits
            needed = self.pos2id[needed_pos]
            tiers = mgr.tiers(needed)
            in_l1, in_l2 = needed[tiers == _L1], needed[tiers == _L2]
            mgr.record_reads(l1=len(in_l1), misses=int((tiers == _NONE).sum()))
            if st.is_question:
                nid = self.pos2id[tr.needle]
                self.needle_tier = Tier(mgr.tiers([nid])[0]).name if nid >= 0 else "NONE"
            mgr.touch(in_l1, t)
            # 2. room for new blocks and fetches (most-attended fetches first)
            if len(in_l2):
                order = np.argsort(-tr.logits(t, table.token_start[in_l2] // bt), kind="stable")
                in_l2 = in_l2[order]
            new_sizes = [self.kv.shape.fp16_bytes] * len(st.new_blocks)
            protected = np.concatenate([in_l1, [self.tail] if self.tail is not None else []]).astype(np.int64)
            while True:
                sizes = new_sizes + mgr.l1_sizes(in_l2)
                if mgr.fits(sizes):
                    break
                if len(mgr.evictable(protected)) == 0 and len(in_l2):
                    in_l2 = in_l2[:-1]  # cannot make room: the least attended stays in L2
                    mgr.record_reads(misses=1)
                    continue
                yield from mover.execute(mgr.make_room(sizes, protected, t, st.new_blocks), t)
            mgr.record_reads(l2=len(in_l2))
            # 3. fetch + ingest
            fetch = mgr.plan_fetch(in_l2, t)
            tickets = mover.submit(fetch)
            ingest = self._insert_and_ingest(st, t)
            if ingest is not None:
                tickets.append(ingest)
            yield from mover.finish(fetch, tickets, t)
            # 4. attention over L1
            resident = mgr.resident()
            pos = table.token_start[resident]  # (a gather: a new array, divided in place)
            pos //= bt
            nvalid = tr.n_valid(t, pos)
            att = self._attention(t, resident, nvalid)
            att_fmts = table.fmt[resident] if be.moves_data else None  # (for _check_output)
            # 5. observe (the masses only for a policy that reads them)
            if mgr.wants_attention:
                mgr.observe(resident, tr.masses(t, pos, nvalid), t)
            # 6. background demotion + prefetch, overlapping the attention
            demote, prefetch = mgr.plan_background(
                t, np.asarray([self.tail] if self.tail is not None else [], np.int64))
            bg = mover.submit(demote + prefetch)
            yield from mover.finish(demote + prefetch, [att] + bg, t)
            if self.backend.moves_data and self.s.checks.data and (st.is_question or (
                    self.s.workload.check_every and t % self.s.workload.check_every == 0)):
                self._check_output(t, att, pos, nvalid, att_fmts)
            audit_residency(self)
            if self.s.checks.invariants:
                mgr.check()
            c = mgr.counters
            extra = finish_step(self)
            self.rec.step(t, be.now(), **extra, l1_bytes=table.bytes_in(Tier.L1),
                          l2_bytes=table.bytes_in(Tier.L2), resident_blocks=len(resident),
                          l1_hits=c.l1_hits, l2_hits=c.l2_hits, misses=c.misses)

    def _insert_and_ingest(self, st, t):
        tr, table, mgr = self.trace, self.table, self.mgr
        bt, tb = tr.bt, self.kv.shape.token_bytes
        regions, items = [], []
        if len(st.new_blocks):
            specs = []
            for p in st.new_blocks.tolist():
                lo = p * bt
                hi = min(lo + bt, st.tokens)
                specs.append(BlockSpec(self.kv.shape.fp16_bytes, token_start=lo, token_end=hi,
                                       content_hash=f"needle:{self.s.seed}:{p}"))
            ids = mgr.insert(specs, t, st.new_blocks)
            self.pos2id[st.new_blocks] = ids
            lengths = (table.token_end[ids] - table.token_start[ids]).tolist()
            for p, offset, n in zip(st.new_blocks.tolist(), self.mover.l1_offsets(ids.tolist()),
                                    lengths):
                regions.append(Region("l1", offset, n * tb))
                items.append((p, 0, n))
        if st.append is not None:
            p, off = st.append
            b = int(self.pos2id[p])
            mgr.extend(b, p * bt + off + 1)
            if not (len(st.new_blocks) and st.new_blocks[-1] == p):
                region, _ = self.mover.block_region(b)
                regions.append(Region("l1", region.offset + off * tb, tb))
                items.append((p, off, off + 1))
        # The block still being written is never a victim until it is full.
        last = int(self.pos2id[(st.tokens - 1) // bt])
        full = table.token_end[last] - table.token_start[last] == bt
        self.tail = follow_tail(mgr, self.tail, last, bool(full))
        if not regions:
            return None
        fill = pinned = None
        if self.backend.moves_data:
            fill, pinned = self._ingest_fill(items), self._ingest_pinned(items)
        m = self.m
        return self.mover.submit_op(Ingest(purpose="ingest", dst=tuple(regions), fill=fill,
                                           pinned=pinned, key_rows=m.layers * m.kv_heads,
                                           head_dim=m.head_dim), Stream.H2D)

    def _attention(self, t, resident, nvalid):
        m = self.m
        q = self.trace.query_vector(t, m.layers, m.kv_heads, m.head_dim) \
            if self.backend.moves_data else None
        flops = 4.0 * m.layers * m.kv_heads * m.head_dim * float(nvalid.sum())
        return self.mover.attention(resident, nvalid, "default", q, flops, self.kv.shape.layout)

    # -- checks against dense attention (hardware backends) ---------------------------------
    def _mean_v_of(self, pos: int, n_valid: int) -> np.ndarray:
        if n_valid == self.trace.bt and pos in self._mean_v:
            return self._mean_v[pos]
        kv = self._payload(pos)
        mean = kv[:n_valid, 1].astype(np.float64).mean(axis=0)
        if n_valid == self.trace.bt:  # a DMA'd ingest never filled it: keep it for the next check
            self._mean_v[pos] = mean
        return mean

    def _check_output(self, t, att, pos, nvalid, fmts):
        tr = self.trace
        out, lse = self.backend.result(att)
        live = int(np.ceil(tr._tokens[t] / tr.bt))
        all_pos = np.arange(live)
        mass = tr.masses(t, all_pos)
        nv_all = tr.n_valid(t, all_pos)
        dense = np.zeros_like(out, dtype=np.float64)
        for p, w, nv in zip(all_pos.tolist(), mass.tolist(), nv_all.tolist()):
            if w > 1e-12:
                dense += w * self._mean_v_of(p, nv)
        err = float(np.linalg.norm(out - dense) / np.linalg.norm(dense))
        self.errors.append((t, err))
        # The kernel's own per-block masses against the model the policy observed.
        lse = np.asarray(lse, np.float64)
        k_mass = np.exp(lse - lse.max(axis=-1, keepdims=True))
        k_mass /= k_mass.sum(axis=-1, keepdims=True)
        model = tr.masses(t, pos)
        fp16_blocks = fmts == Fmt.FP16
        if fp16_blocks.any():
            diff = np.abs(k_mass[..., fp16_blocks] - model[fp16_blocks]).max()
            self.score_err = max(self.score_err, float(diff))

    # -- results --------------------------------------------------------------------------
    def metrics(self) -> dict:
        q_err = next((e for t, e in self.errors if t == self.trace.question_step), None)
        out = {
            "needle_retained": self.needle_tier == "L1",
            "needle_tier_at_question": self.needle_tier,
            "output_rel_error": q_err,
            "output_rel_error_mean": float(np.mean([e for _, e in self.errors])) if self.errors else None,
            "score_model_max_abs_err": self.score_err if self.errors else None,
        }
        return out

    def decisions(self):
        return self.mgr.log.entries

    def lost_blocks(self) -> int:
        # Dropped blocks left on purpose (counted as drops); nothing else may be missing.
        ids = self.pos2id[self.pos2id >= 0]
        state = self.table.state[ids]
        from ..blocks import State
        return int((state != State.LIVE).sum()) - self.table.num_dropped
