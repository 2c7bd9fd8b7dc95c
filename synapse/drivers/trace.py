"""The trace driver: a captured attention trace replayed on any backend (the simulator for
what-if studies), with the same block bookkeeping as the live ``synapse.hf.TieredCache``.

Per step (one forward pass of the captured run), as in the live cache:
1. reads: every live block is read by dense attention (L1 hits, L2 hits read through),
   a dropped one is a miss;
2. room and insertion of the step's new blocks (forced eviction with the scores so far);
3. attention over the L1-resident blocks (compute time on the simulator);
4. the policy observes the trace's masses of the live blocks (renormalised over them
   when blocks were dropped: a what-if, since the captured model saw them all);
5. background demotion and prefetch, overlapping the attention; then commit.

With lossless tiers (demote ``l2``, nothing dropped), the masses are exactly those the
live cache computes, so the decisions are identical (tests/test_trace.py). The simulator
charges the tier moves and the attention over L1; reading L2 blocks through for dense
attention is not modelled yet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..blocks import Tier
from ..kv.planner import SequencePlanner
from ..telemetry import Recorder
from ..workloads.trace import Trace
from .kv_common import audit_residency, build_kv, finish_step, shape_of


def _resolve(path: str, source: str) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    base = Path(source.split(" with --set")[0]).parent
    return base / p if (base / p).exists() else p


class TraceDriver:
    def __init__(self, scenario, backend, profile, source: str = "scenario"):
        s = scenario
        self.s, self.backend = s, backend
        self.trace = Trace.load(_resolve(s.workload.trace, source))
        m = s.model
        self.trace.check_shape(m.layers, m.kv_heads, m.head_dim, s.memory.block_tokens,
                               f"{source}: workload.trace")
        working = self.trace.num_blocks * shape_of(s).fp16_bytes
        self.kv = build_kv(s, backend, profile, working, 2, source)
        self.mgr, self.mover, self.table = self.kv.manager, self.kv.mover, self.kv.table
        if self.mgr.policy.needs_future:
            self.mgr.policy.bind_future(self._next_use)
        self.planner = SequencePlanner(self.mgr, s.memory.block_tokens, s.workload.access_factor)
        self.planner.check_step(int(np.diff(self.trace.tokens, prepend=0).max()))
        self.rec = Recorder()
        self.num_steps = self.trace.steps
        self._used = None

    def _next_use(self, ids: np.ndarray, step: int) -> np.ndarray:
        """Belady: the next step at which each block is used (mass >= factor x uniform)."""
        if self._used is None:
            tr = self.trace
            live = np.maximum(1, -(-tr.tokens // tr.block_tokens))
            used = tr.mass >= (self.s.workload.access_factor / live)[:, None]
            nxt = np.full(used.shape, 2**30, np.int64)
            row = np.full(used.shape[1], 2**30, np.int64)
            for t in range(used.shape[0] - 1, -1, -1):
                nxt[t] = row
                row = np.where(used[t], t, row)
            self._used = nxt
        return self._used[step, ids]

    def process(self):
        tr, pl, mgr, mover, table, be = (self.trace, self.planner, self.mgr, self.mover,
                                         self.table, self.backend)
        bt, m = tr.block_tokens, self.s.model
        prev = 0
        for t in range(tr.steps):
            q = int(tr.tokens[t]) - prev
            prev = int(tr.tokens[t])
            pl.begin(t)
            for moves in pl.admit(t, q):
                yield from mover.execute(moves, t)
            live = pl.live_ids()
            resident = mgr.resident()
            nvalid = np.minimum(bt, pl.tokens - resident * bt)
            flops = 4.0 * m.layers * m.kv_heads * m.head_dim * float(nvalid.sum()) * q
            att = mover.attention(resident, nvalid, "default", None, flops, self.kv.shape.layout)
            mass = tr.mass[t, live]
            if len(live) < -(-pl.tokens // bt):  # some were dropped: renormalise (what-if)
                total = mass.sum(dtype=np.float32)
                mass = mass / total if total > 0 else mass
            moves = pl.observe(t, live, mass.astype(np.float32).astype(np.float64))
            bg = mover.submit(moves)
            yield from mover.finish(moves, [att] + bg, t)
            audit_residency(self)
            if self.s.checks.invariants:
                mgr.check()
            c = mgr.counters
            extra = finish_step(self)
            self.rec.step(t, be.now(), **extra, l1_bytes=table.bytes_in(Tier.L1),
                          l2_bytes=table.bytes_in(Tier.L2), resident_blocks=len(resident),
                          tokens=pl.tokens, l1_hits=c.l1_hits, l2_hits=c.l2_hits,
                          misses=c.misses)

    def metrics(self) -> dict:
        h = self.trace.header
        return {"trace_steps": self.trace.steps, "trace_model": h["model"],
                "trace_tokens": int(self.trace.tokens[-1]) if self.trace.steps else 0}

    def decisions(self):
        return self.mgr.log.entries

    def lost_blocks(self) -> int:
        return 0  # blocks leave only by a counted drop
