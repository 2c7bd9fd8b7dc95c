"""Weight streaming of a torch module through the skip-end ring (issue 3, item 4).

Every streamable layer's parameters are packed into one host buffer (page-locked on
CUDA), each parameter at a 256-byte aligned offset inside its layer's span. A device
``uint8`` buffer of ``ring_bytes`` is the ring; ``SkipEndRing`` gives each layer its slot
once, at set-up, together with a ``uint8`` view per slot and a typed view per parameter,
so a forward pass allocates nothing. Hooks do the rest:

- forward pre-hook of layer i: if its slot does not hold it yet, copy it now (a demand
  fetch); make the compute stream wait for the copy's event; point each parameter's
  ``.data`` at its view in the slot; issue copies of layers i+1..i+k (k = prefetch depth,
  capped by ``ring.max_lookahead()``, cyclic so the next pass's first layers come early)
  on a dedicated high-priority copy stream, each after the events of the reads
  ``ring.blockers(j)`` names (the layers whose slots it overwrites);
- forward hook of layer i: record the compute stream's event and ``ring.mark_read(i)``;
  point the parameters back at their host copies (so ``state_dict`` stays readable).

Synchronisation is by events only: no ``synchronize`` in the hot path. On CPU the same
code runs with a CPU ring and synchronous copies, so tests check outputs exactly.
Parameters not in a streamed layer (embeddings, final norm, head, tied weights) are
resident on the device and count against the budget: ``ring_bytes = vram_budget -
resident bytes``. ``restore()`` puts every parameter's original tensor back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import CapacityError, ScenarioError
from ..units import fmt_bytes
from .ring import SkipEndRing

ALIGN = 256


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class NoStreamableLayers(ScenarioError):
    """The module has no layers to stream (no nn.Sequential, no nn.ModuleList of layers)."""


def find_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The streaming units: the children of an ``nn.Sequential``, else the largest
    ``nn.ModuleList`` (by parameter bytes) whose children all have parameters (a
    transformers model's decoder layers)."""
    if isinstance(model, torch.nn.Sequential):
        units = [m for m in model if any(True for _ in m.parameters())]
        if units:
            return units
    best, best_bytes = None, 0
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0:
            if not all(any(True for _ in c.parameters()) for c in m):
                continue
            n = sum(p.numel() * p.element_size() for p in m.parameters())
            if n > best_bytes:
                best, best_bytes = m, n
    if best is None:
        raise NoStreamableLayers(
            f"{type(model).__name__}: no streamable layers found; expected an nn.Sequential of "
            f"modules with parameters, or a module holding an nn.ModuleList of layers (the "
            f"decoder layers of a transformers model)")
    return list(best)


@dataclass
class ForwardStats:
    wall_s: float
    streamed_bytes: int
    stall_s: float | None


@dataclass
class StreamStats:
    forwards: int = 0
    streamed_bytes: int = 0
    fetches: int = 0          # demand copies (the slot did not hold the layer)
    prefetches: int = 0
    l1_hits: int = 0          # the layer was still in its slot
    stall_s: float = 0.0
    per_forward: list = field(default_factory=list)


class StreamHandle:
    """A model streaming through the ring; ``restore()`` (or leaving ``with``) undoes it."""

    def __init__(self, model: torch.nn.Module, vram_budget, prefetch_depth: int = 2,
                 device=None, pin_embeddings: bool = True, layers=None) -> None:
        from ..units import parse_bytes
        self.model = model
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        units = list(layers) if layers is not None else find_layers(model)
        if not pin_embeddings and layers is None:
            units = self._with_embeddings(model, units)
        # a parameter shared by two units, or by a unit and the rest, stays resident
        owner: dict[int, int] = {}
        for i, u in enumerate(units):
            for p in u.parameters():
                owner[id(p)] = -1 if id(p) in owner and owner[id(p)] != i else i
        inside = {id(x) for u in units for x in u.modules()}
        for m in model.modules():
            if id(m) in inside:
                continue
            for p in m.parameters(recurse=False):
                owner[id(p)] = -1
        self.units = units
        self.params: list[list[torch.nn.Parameter]] = [
            [p for p in u.parameters() if owner.get(id(p)) == i] for i, u in enumerate(units)]
        seen, self.resident = set(), []
        for p in model.parameters():
            if owner.get(id(p), -1) == -1 and id(p) not in seen:
                seen.add(id(p))
                self.resident.append(p)
        self.offsets = []
        layer_bytes = []
        for ps in self.params:
            off, offs = 0, []
            for p in ps:
                offs.append(off)
                off = _align(off + p.numel() * p.element_size())
            self.offsets.append(offs)
            layer_bytes.append(max(off, ALIGN))
        self.layer_bytes = layer_bytes
        self.resident_bytes = sum(p.numel() * p.element_size() for p in self.resident)
        self.model_bytes = sum(layer_bytes) + self.resident_bytes
        budget = parse_bytes(vram_budget) if not isinstance(vram_budget, float) or vram_budget > 1 \
            else int(vram_budget * self.model_bytes)
        ring_bytes = budget - self.resident_bytes
        largest = max(layer_bytes)
        if ring_bytes < largest:
            i = layer_bytes.index(largest)
            raise CapacityError(
                f"vram_budget {fmt_bytes(budget)} ({budget} bytes): resident parameters "
                f"(embeddings, norms, head, shared weights) take {fmt_bytes(self.resident_bytes)}, "
                f"leaving {fmt_bytes(max(ring_bytes, 0))} for the ring, below the largest layer "
                f"(layer {i}: {fmt_bytes(largest)}, {largest} bytes); the budget must be at least "
                f"{fmt_bytes(self.resident_bytes + largest)}")
        self.budget_bytes = budget
        self.ring = SkipEndRing(ring_bytes, layer_bytes, ALIGN)
        self.depth = max(0, min(prefetch_depth, self.ring.max_lookahead()))
        self.stats_ = StreamStats()
        self._restored = False
        self._build()

    @staticmethod
    def _with_embeddings(model, units):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        out = ([emb] if emb is not None else []) + units
        if head is not None and (emb is None or head.weight is not emb.weight):
            out.append(head)
        return out

    # -- set-up ---------------------------------------------------------------------------
    def _build(self) -> None:
        dev, L = self.device, len(self.units)
        self.orig: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        for ps in self.params:
            for p in ps:
                self.orig[id(p)] = (p, p.data)
        for p in self.resident:
            self.orig[id(p)] = (p, p.data)
        self.buf_orig = []
        total = sum(self.layer_bytes)
        self.host = torch.empty(total, dtype=torch.uint8, pin_memory=self.cuda)
        self.host_base = []
        base = 0
        self.host_views: list[list[torch.Tensor]] = []
        for ps, offs, n in zip(self.params, self.offsets, self.layer_bytes):
            self.host_base.append(base)
            views = []
            for p, o in zip(ps, offs):
                nb = p.numel() * p.element_size()
                v = self.host[base + o: base + o + nb].view(p.dtype).view(p.shape)
                v.copy_(p.data)
                views.append(v)
            self.host_views.append(views)
            base += n
        self.ring_buf = torch.empty(self.ring.capacity_bytes, dtype=torch.uint8, device=dev)
        self.slot_bytes, self.slot_host, self.dev_views = [], [], []
        for i, (ps, offs) in enumerate(zip(self.params, self.offsets)):
            off, n = self.ring.slot(i)
            self.slot_bytes.append(self.ring_buf[off: off + n])
            self.slot_host.append(self.host[self.host_base[i]: self.host_base[i] + n])
            self.dev_views.append([
                self.ring_buf[off + o: off + o + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
                for p, o in zip(ps, offs)])
        # resident parameters and every buffer go to the device for the whole session
        for p in self.resident:
            p.data = p.data.to(dev)
        self._track_resident()
        for m in self.model.modules():
            for name, b in list(m._buffers.items()):
                if b is not None and b.device != dev:
                    self.buf_orig.append((m, name, b))
                    m._buffers[name] = b.to(dev)
        for i in range(L):
            for p, v in zip(self.params[i], self.host_views[i]):
                p.data = v
        self.loaded = [False] * L     # the slot holds layer i (copy issued, not overwritten)
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device=dev, priority=-1)
            # a fresh timing event per copy: a prefetch issued at the end of one pass for
            # the next must not overwrite the event the previous pass's stall is read from
            self.copy_done: list = [None] * L
            self.read_done = [torch.cuda.Event() for _ in range(L)]
            self.fwd_start = torch.cuda.Event(enable_timing=True)
            self.fwd_end = torch.cuda.Event(enable_timing=True)
        self._issued_in_fwd = [False] * L  # copied during the current pass (hit counting)
        self._fresh = [False] * L  # a copy was issued since layer i last ran
        self._waits: list = []     # (arrival, copy landed) event pairs of the current pass
        self._fwd_bytes = 0
        self._fwd_stall = 0.0
        self._pending_harvest = False
        self._t0 = 0.0
        self.hooks = []
        for i, u in enumerate(self.units):
            self.hooks.append(u.register_forward_pre_hook(self._pre(i)))
            self.hooks.append(u.register_forward_hook(self._post(i)))
        self.hooks.append(self.model.register_forward_pre_hook(self._model_pre))
        self.hooks.append(self.model.register_forward_hook(self._model_post))

    def _track_resident(self) -> None:
        """Host copies, the ring and the resident parameters, for the allocation tracker."""
        from ..monitor.tracker import track_tensor
        self.tracked = [track_tensor(self.host, "stream_host_weights", owner="synapse.stream"),
                        track_tensor(self.ring_buf, "ring", owner="synapse.stream")]
        self.tracked += [track_tensor(p.data, "stream_resident_weights", owner="synapse.stream")
                         for p in self.resident]

    def _untrack_memory(self) -> None:
        from ..monitor.tracker import release
        for h in self.tracked:
            release(h)
        self.tracked = []

    # -- the hot path -----------------------------------------------------------------------
    def _issue(self, j: int, purpose: str) -> None:
        ring, s = self.ring, self.stats_
        for k in ring.overlaps(j):
            if k != j:
                self.loaded[k] = False
        if self.cuda:
            cs = self.copy_stream
            for ev in ring.blockers(j):
                cs.wait_event(ev)
            with torch.cuda.stream(cs):
                self.slot_bytes[j].copy_(self.slot_host[j], non_blocking=True)
                done = torch.cuda.Event(enable_timing=True)
                done.record(cs)
                self.copy_done[j] = done
            self._fresh[j] = True  # the compute stream must wait on it at layer j's next use
        else:
            t0 = time.perf_counter()
            self.slot_bytes[j].copy_(self.slot_host[j])
            self._fwd_stall += time.perf_counter() - t0
        self.loaded[j] = True
        self._issued_in_fwd[j] = True
        n = self.layer_bytes[j]
        s.streamed_bytes += n
        self._fwd_bytes += n
        if purpose == "prefetch":
            s.prefetches += 1
        else:
            s.fetches += 1

    def _pre(self, i: int):
        L = len(self.units)

        def hook(_mod, _args):
            if self.loaded[i]:
                if not self._issued_in_fwd[i]:
                    self.stats_.l1_hits += 1
            else:
                self._issue(i, "fetch")
            if self.cuda and self._fresh[i]:
                cur = torch.cuda.current_stream(self.device)
                arrive = torch.cuda.Event(enable_timing=True)
                arrive.record(cur)
                cur.wait_event(self.copy_done[i])
                self._waits.append((arrive, self.copy_done[i]))
                self._fresh[i] = False
            for p, v in zip(self.params[i], self.dev_views[i]):
                p.data = v
            for d in range(1, self.depth + 1):
                j = (i + d) % L
                if not self.loaded[j]:
                    self._issue(j, "prefetch")
        return hook

    def _post(self, i: int):
        def hook(_mod, _args, _out):
            if self.cuda:
                ev = self.read_done[i]
                ev.record(torch.cuda.current_stream(self.device))
                self.ring.mark_read(i, ev)
            else:
                self.ring.mark_read(i, True)
            for p, v in zip(self.params[i], self.host_views[i]):
                p.data = v
        return hook

    def _model_pre(self, _mod, _args):
        if self._pending_harvest:
            self._harvest(block=False)
        self._issued_in_fwd = [False] * len(self.units)
        self._waits = []
        self._fwd_bytes, self._fwd_stall = 0, 0.0
        self._t0 = time.perf_counter()
        if self.cuda:
            self.fwd_start.record(torch.cuda.current_stream(self.device))

    def _model_post(self, _mod, _args, _out):
        s = self.stats_
        s.forwards += 1
        if self.cuda:
            self.fwd_end.record(torch.cuda.current_stream(self.device))
            self._pending = (self._fwd_bytes, self._waits)
            self._pending_harvest = True
        else:
            wall = time.perf_counter() - self._t0
            s.stall_s += self._fwd_stall
            s.per_forward.append(ForwardStats(wall, self._fwd_bytes, self._fwd_stall))

    def _harvest(self, block: bool) -> None:
        """Per-forward device timings from the last pass's events (CUDA), without blocking
        unless asked: stall = how long the compute stream reached a layer before its copy
        had landed, summed over the layers that waited on a copy in that pass."""
        if not self._pending_harvest:
            return
        if not block and not self.fwd_end.query():
            self._pending_harvest = False  # still running: this pass goes unmeasured
            self.stats_.per_forward.append(ForwardStats(None, self._pending[0], None))
            return
        self.fwd_end.synchronize()
        # every copy this pass waited on had landed before the pass could end
        nbytes, waits = self._pending
        stall = sum(max(0.0, arrive.elapsed_time(done) * 1e-3) for arrive, done in waits)
        wall = self.fwd_start.elapsed_time(self.fwd_end) * 1e-3
        self.stats_.stall_s += stall
        self.stats_.per_forward.append(ForwardStats(wall, nbytes, stall))
        self._pending_harvest = False

    # -- results ------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Per-forward effective bandwidth and stall time, and totals (synchronises on CUDA)."""
        if self.cuda:
            self._harvest(block=True)
        s = self.stats_
        timed = [f for f in s.per_forward if f.wall_s]
        span = sum(f.wall_s for f in timed)
        nbytes = sum(f.streamed_bytes for f in timed)
        return {
            "forwards": s.forwards, "model_bytes": self.model_bytes,
            "resident_bytes": self.resident_bytes, "ring_bytes": self.ring.capacity_bytes,
            "budget_bytes": self.budget_bytes, "layers": len(self.units),
            "prefetch_depth": self.depth, "streamed_bytes": s.streamed_bytes,
            "fetches": s.fetches, "prefetches": s.prefetches, "l1_hits": s.l1_hits,
            "l2_hits": s.fetches + s.prefetches, "misses": 0,
            "effective_gb_per_s": nbytes / span / 1e9 if span > 0 else None,
            "stall_s": s.stall_s, "stream_span_s": span,
            "per_forward": [{"wall_s": f.wall_s, "streamed_bytes": f.streamed_bytes,
                             "stall_s": f.stall_s,
                             "effective_gb_per_s": (f.streamed_bytes / f.wall_s / 1e9)
                             if f.wall_s else None} for f in s.per_forward],
        }

    def result(self, name: str = "torch-stream") -> dict:
        from ..hf.result import make_result
        st = self.stats
        metrics = {k: v for k, v in st.items() if k != "per_forward"}
        metrics.update({"bytes_h2d": st["streamed_bytes"], "bytes_d2h": 0, "evictions": 0,
                        "demotions": 0, "drops": 0, "latency": {}})
        timeline = {"step": list(range(len(st["per_forward"]))),
                    "wall_s": [f["wall_s"] for f in st["per_forward"]],
                    "streamed_bytes": [f["streamed_bytes"] for f in st["per_forward"]],
                    "stall_s": [f["stall_s"] for f in st["per_forward"]]}
        config = {"model": type(self.model).__name__, "device": str(self.device),
                  "vram_budget_bytes": self.budget_bytes, "prefetch_depth": self.depth,
                  "layer_bytes": self.layer_bytes}
        return make_result(name, "torch_stream", "cuda" if self.cuda else "cpu", "ring", config,
                           metrics, timeline)

    def dump(self, path, name: str = "torch-stream"):
        from ..hf.result import dump
        return dump(self.result(name), [], path)

    # -- undo ----------------------------------------------------------------------------------
    def restore(self) -> None:
        """Remove the hooks and give every parameter and buffer its original tensor back."""
        if self._restored:
            return
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            torch.cuda.synchronize(self.device)
        for h in self.hooks:
            h.remove()
        for p, data in self.orig.values():
            p.data = data
        for m, name, b in self.buf_orig:
            m._buffers[name] = b
        self._restored = True
        self._untrack_memory()
        self.ring_buf = self.host = None
        self.slot_bytes = self.slot_host = self.dev_views = self.host_views = []

    def __enter__(self) -> "StreamHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
