"""The weight-streaming driver: a model larger than its VRAM budget, layer by layer.

Weights live in pinned host memory (L2). A skip-end ring of ``vram_budget`` bytes on the
device holds the layers in flight; layer i+1..i+k are copied on the H2D stream while
layer i computes (k = the prefetch depth, capped by how many layers the ring holds at
once), and a copy into a slot waits for the compute that last read the slot. Without
prefetch, each layer's copy waits for the previous layer's compute, so copy and compute
serialise, as in hook-based offloading. After the timed passes, the hardware backends run
the same passes from a fully resident copy and compare outputs.
"""

from __future__ import annotations

import numpy as np

from ..errors import CapacityError, ScenarioError
from ..hw.ring import SkipEndRing
from ..manager import Counters, DecisionLog
from ..ops import Copy, Ingest, LayerCompute, Region, Stream
from ..policy import LayerPrefetch
from ..telemetry import Recorder
from .kv_common import resolve_budget


class StreamingDriver:
    def __init__(self, scenario, backend, profile, source: str = "scenario"):
        s, w = scenario, scenario.workload
        self.s, self.w, self.backend = s, w, backend
        self.ffn = w.hidden * w.ffn_mult
        self.layer_bytes = 2 * w.hidden * self.ffn * 2  # W1 [h, f] and W2 [f, h], fp16
        self.model_bytes = self.layer_bytes * w.layers
        vram = resolve_budget(w.vram_budget, self.model_bytes, "workload.vram_budget", source,
                              profile.hbm_bytes, f"the HBM of profile {profile.name}")
        try:
            self.ring = SkipEndRing(vram, [self.layer_bytes] * w.layers)
        except CapacityError as e:
            raise ScenarioError(f"{source}: workload.vram_budget: got {w.vram_budget!r}: {e}") from None
        depth = s.policy.prefetch_depth if s.policy.prefetch else 0
        self.depth = LayerPrefetch(depth).effective_depth(self.ring.max_lookahead())
        self.host = backend.memory("l2", self.model_bytes, "pinned_host")
        if backend.moves_data:
            backend.warm_up_compute(w.batch_tokens, w.hidden, self.ffn)
        if s.checks.data:
            backend.reserve_staging(self.layer_bytes)  # the resident reference's ingests
        self.dev = backend.memory("ring", self.ring.capacity_bytes, "device")
        self.counters = Counters()
        self.log = DecisionLog()
        self.rec = Recorder()
        self.num_steps = w.passes * w.layers
        self.outputs: list[np.ndarray] = []
        self.reference: list[np.ndarray] = []
        self.streamed_bytes = 0
        self._pool = None
        if backend.moves_data:
            for i in range(w.layers):
                self.host.view(i * self.layer_bytes, self.layer_bytes)[:] = self._weights(i)

    # -- data ---------------------------------------------------------------------------
    def _weights(self, i: int) -> np.ndarray:
        """Layer i's W1 [h, f] then W2 [f, h], fp16, scaled so activations stay O(1)."""
        if self._pool is None:
            from ..workloads.payload import PayloadPool
            self._pool = PayloadPool(self.s.seed)
        h, f = self.w.hidden, self.ffn
        w = self._pool.take((self.s.seed, 0x7773, i), 2 * h * f)
        w[: h * f] *= np.float16(1 / np.sqrt(h))
        w[h * f:] *= np.float16(1 / np.sqrt(f))
        return w.view(np.uint8)

    def _input(self, p: int) -> np.ndarray:
        rng = np.random.default_rng([self.s.seed, 0x78, p])
        return rng.standard_normal((self.w.batch_tokens, self.w.hidden), np.float32).astype(np.float16)

    def _layer_op(self, i: int, region: Region, act, purpose: str = "forward") -> LayerCompute:
        w = self.w
        return LayerCompute(purpose=purpose, layer=i, weights=region, act=act,
                            hidden=w.hidden, ffn=self.ffn,
                            flops=2.0 * w.batch_tokens * 2 * w.hidden * self.ffn,
                            weight_bytes=self.layer_bytes)

    # -- the process --------------------------------------------------------------------
    def process(self):
        be, ring, w, c = self.backend, self.ring, self.w, self.counters
        total, nl = w.passes * w.layers, w.layers
        copies: dict[int, object] = {}
        last_compute = None

        def issue(g: int, purpose: str, after=()):
            i = g % nl
            if ring.resident_all and g >= nl:
                copies[g] = None  # still in its slot from the first pass
                c.l1_hits += 1
                return
            off, n = ring.slot(i)
            src = Region("l2", i * self.layer_bytes, n)
            dst = Region("ring", off, n)
            deps = list(ring.blockers(i)) + list(after)
            copies[g] = be.submit(Copy.between(purpose, "h2d", src, dst), Stream.H2D, deps)
            self.streamed_bytes += n
            c.l2_hits += 1
            (c.__setattr__("prefetches", c.prefetches + 1) if purpose == "prefetch"
             else c.__setattr__("fetches", c.fetches + 1))
            self.log.add(g, purpose, [i])

        act = None
        for g in range(total):
            i, p = g % nl, g // nl
            if i == 0:
                act = be.activation(self._input(p)) if be.moves_data else None
            if g not in copies:
                # Demand load; without prefetch it also waits for the previous layer.
                issue(g, "fetch", [last_compute] if self.depth == 0 and last_compute else [])
            off, n = ring.slot(i)
            comp = be.submit(self._layer_op(i, Region("ring", off, n), act), Stream.COMPUTE,
                             [copies.pop(g)])
            ring.mark_read(i, comp)
            last_compute = comp
            for h in range(g + 1, min(total, g + 1 + self.depth)):
                if h not in copies:
                    issue(h, "prefetch")
            if i == nl - 1:
                yield be.wait([comp])  # a forward pass ends: its output goes to the host
                if be.moves_data:
                    self.outputs.append(be.read_activation(act))
            self.rec.step(g, be.now(), ring_bytes=ring.capacity_bytes,
                          streamed_bytes=self.streamed_bytes)
        self.run_end_s = be.now()
        if be.moves_data and self.s.checks.data:
            yield from self._resident_reference()

    def _resident_reference(self):
        """The same passes from a fully resident copy of the weights (not timed)."""
        be, w = self.backend, self.w
        res = be.memory("resident", self.model_bytes, "device")
        regions = tuple(Region("resident", i * self.layer_bytes, self.layer_bytes)
                        for i in range(w.layers))
        for i, r in enumerate(regions):  # one op per layer: staging holds one layer at a time
            t = be.submit(Ingest(purpose="reference", dst=(r,),
                                 source=lambda _, i=i: self._weights(i)), Stream.H2D)
        for p in range(w.passes):
            act = be.activation(self._input(p))
            last = t
            for i in range(w.layers):
                last = be.submit(self._layer_op(i, regions[i], act, "reference"), Stream.COMPUTE, [last])
            yield be.wait([last])
            self.reference.append(be.read_activation(act))

    # -- results --------------------------------------------------------------------------
    @property
    def mgr(self):
        return self

    def metrics(self) -> dict:
        recs = [r for r in self.backend.records() if r.purpose in ("forward", "fetch", "prefetch")]
        comp = sorted((r for r in recs if r.kind == "layer"), key=lambda r: r.start_s)
        stall = sum(max(0.0, b.start_s - a.end_s) for a, b in zip(comp, comp[1:]))
        t0 = min((r.start_s for r in recs), default=0.0)
        t1 = max((r.end_s for r in recs), default=0.0)
        span = t1 - t0
        out = {
            "model_bytes": self.model_bytes,
            "ring_bytes": self.ring.capacity_bytes,
            "prefetch_depth": self.depth,
            "streamed_bytes": self.streamed_bytes,
            "effective_gb_per_s": self.streamed_bytes / span / 1e9 if span > 0 else None,
            "stall_s": stall,
            "stream_span_s": span,
            "tokens_per_s": self.w.passes * self.w.batch_tokens / span if span > 0 else None,
        }
        if self.outputs and self.reference:
            errs = [float(np.linalg.norm(a.astype(np.float64) - b) / max(1e-30, np.linalg.norm(b)))
                    for a, b in zip(self.outputs, self.reference)]
            out["output_rel_error"] = max(errs)
            out["output_equal"] = all(np.array_equal(a, b) for a, b in zip(self.outputs, self.reference))
        return out

    def decisions(self):
        return self.log.entries

    def lost_blocks(self) -> int:
        return 0
