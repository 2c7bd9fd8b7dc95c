"""A restored prefix's KV moved to the device layer by layer, overlapped with the forward
pass of the new tokens.

    load = LayerwiseLoad(chunks, device, dtype)   # copies issued on side streams
    load.into(cache)                               # DynamicCache: deferred; others: update()
    with load.waits(model):                        # layer i's attention waits for layer i
        out = model(input_ids=new, past_key_values=cache)
    phases = load.finish()                         # seconds: to_device, into_cache, forward

On CUDA, per layer, on side streams: one host-to-device copy per chunk (a chunk's layer
slice, keys and values, is contiguous in its pinned buffer) into a staging buffer, then
one strided copy from there into the layer's head-major ``[2, heads, tokens, head_dim]``
planes on a second stream, then an event; two staging buffers alternate, so the copy
engine moves layer i+1 while layer i is scattered. A layer's chunk copies go to the
driver in one ``cuMemcpyBatchAsync`` call where the driver has it (CUDA 12.8+) and every
chunk is pinned: issued one by one through PyTorch, a 32k prompt's 3,840 copies of 1 MiB
cost 68 ms of host time on the H200, about as long as moving them, and the copy engines
waited on the host (37.5 GB/s against 55 for large copies). Elsewhere, one torch copy
per chunk (``copy_path`` says which ran). The compute stream never waits on the host:
the attention module of layer i waits on layer i's event (``wait_event``) when its
forward starts, so the copy of layer i runs while layers before it compute. For a
``DynamicCache`` the copies are queued ``ISSUE_AHEAD`` layers ahead of that wait, not all
before the forward: queuing a 32-layer prompt's costs the host about 10 ms, which then
runs while the device computes instead of before it starts.

A ``DynamicCache`` (plain ``DynamicLayer``s) takes the planes as its layers' tensors
before the forward, so it reports the prefix's length to the mask and position code, and
its own ``update`` in the forward concatenates prefix and new tokens (the one copy
``DynamicCache`` makes anyway). Any other cache (``TieredCache``) takes the prefix through
its ``update`` before the forward, in steps, layer i's first step waiting on its event:
there the copies overlap the cache's admission of earlier layers, not the forward. On the
CPU every copy is done when it is issued and nothing waits.
"""

from __future__ import annotations

import time

import torch

ISSUE_AHEAD = 3  # layers whose copies are queued before the attention of the layer waiting


class LayerwiseLoad:
    def __init__(self, chunks, device, dtype, room: int = 0):
        """``chunks``: host tensors ``[layers, 2, heads, chunk_tokens, head_dim]`` of the
        model's ``dtype`` (pinned where CUDA is used); they must stay unchanged until
        ``finish`` (or ``wait_all``) returns. ``room``: tokens the planes hold behind the
        prefix, for a plain ``DynamicCache``'s next updates (the prompt's rest)."""
        self.device, self.chunks = device, chunks
        layers, _, heads, c, d = chunks[0].shape
        self.num_layers, self.tokens = layers, len(chunks) * c
        self.room = room
        self._behind: list = []  # the layers whose update writes behind the prefix
        self.cuda = device.type == "cuda"
        self.copy_path = "on the host" if not self.cuda else None
        self.deferred = False
        self.phases: dict[str, float] = {}
        self._marks: dict[str, object] = {}
        t0 = time.perf_counter()
        # each layer's planes: [2, heads, tokens, head_dim], head-major like DynamicCache's
        self.planes = [torch.empty((2, heads, self.tokens + room, d), device=device, dtype=dtype)
                       for _ in range(layers)]
        if not self.cuda:
            for i in range(layers):
                self._fill(i, torch.stack([ch[i] for ch in chunks]))
            self.events = None
            self.phases["to_device"] = time.perf_counter() - t0
            return
        compute = torch.cuda.current_stream(device)
        # host-to-device copies on one stream, the strided fills into the planes on another,
        # through two stages: layer i+1's copy runs while layer i's fill does
        self.stream, self._fill_stream = (torch.cuda.Stream(device=device),
                                          torch.cuda.Stream(device=device))
        # the planes and stages may reuse memory the compute stream freed: start after it
        self.stream.wait_stream(compute)
        self._fill_stream.wait_stream(compute)
        self._stages = [torch.empty((len(chunks),) + tuple(chunks[0].shape[1:]),
                                    device=device, dtype=dtype) for _ in range(2)]
        self._copied = [torch.cuda.Event() for _ in range(layers)]
        self.events = [torch.cuda.Event() for _ in range(layers)]  # layer i's planes filled
        self._batch = _batch_copier(chunks, device)
        self.copy_path = "cuMemcpyBatchAsync" if self._batch else "torch copy per chunk"
        self._issued = 0
        self._marks["copy_start"] = _timing_event(self.stream)
        self.phases["copy_issue"] = time.perf_counter() - t0
        self._issue_through(ISSUE_AHEAD - 1)

    def _issue_through(self, last: int) -> None:
        """Queue the copies of every layer up to ``last`` not queued yet. Layers are issued
        a few ahead of the forward's attention (``_wait``), so the host's time queuing
        them (about 10 ms for a 32k prompt of 32 layers) runs while the device computes
        earlier layers instead of before the forward starts."""
        if not self.cuda or self._issued > min(last, self.num_layers - 1):
            return  # queued already (all of them, once the last layer is)
        t0 = time.perf_counter()
        fill = self._fill_stream
        while self._issued <= min(last, self.num_layers - 1):
            i = self._issued
            stage = self._stages[i % 2]
            if i >= 2:  # the stage is free once layer i-2's fill has read it
                self.stream.wait_event(self.events[i - 2])
            with torch.cuda.stream(self.stream):
                if self._batch:
                    self._batch(stage, i, self.stream.cuda_stream)
                else:
                    for j, ch in enumerate(self.chunks):
                        stage[j].copy_(ch[i], non_blocking=True)
                self._copied[i].record(self.stream)
            fill.wait_event(self._copied[i])
            with torch.cuda.stream(fill):
                self._fill(i, stage)
                self.events[i].record(fill)
            self._issued += 1
        if self._issued == self.num_layers:
            self._marks["copy_end"] = _timing_event(fill)
            for t in self._stages + self.planes:
                t.record_stream(self.stream)
                t.record_stream(fill)
            self._stages = None
        self.phases["copy_issue"] += time.perf_counter() - t0

    def _fill(self, i: int, stacked) -> None:
        """``stacked`` [chunks, 2, heads, c, d] into layer i's planes (one strided copy)."""
        nc, _, heads, c, d = stacked.shape
        self.planes[i][:, :, :self.tokens].view(2, heads, nc, c, d).copy_(
            stacked.permute(1, 2, 0, 3, 4))

    # -- into the cache -------------------------------------------------------------------------
    def into(self, cache, step_tokens: int | None = None) -> None:
        """Put the prefix into ``cache``: deferred for a plain ``DynamicCache`` (its layers
        hold the planes being filled; ``waits`` must cover the first forward), otherwise
        through ``cache.update`` in steps, each layer waiting for its copy."""
        t0 = time.perf_counter()
        if plain_dynamic(cache, self.num_layers):
            p = self.tokens
            for layer, planes in zip(cache.layers, self.planes):
                k, v = planes[0, :, :p].unsqueeze(0), planes[1, :, :p].unsqueeze(0)
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
                if self.room:
                    _write_behind(layer, planes, p)
                    self._behind.append(layer)
            self.deferred = self.cuda
            self.phases["into_cache"] = 0.0  # the forward's own update concatenates
            return
        # the cache's admission runs on the compute stream before any forward: nothing
        # would hide the copies' queuing, and queued a few layers ahead of it they kept
        # pace with the admission (30% of pinned H2D on the H200, against 96% queued at once)
        self._issue_through(self.num_layers - 1)
        self._mark("into_start")
        _update_in_steps(cache, [pl[:, :, :self.tokens] for pl in self.planes], step_tokens,
                         self._wait)
        self._mark("into_end")
        if not self.cuda:
            self.phases["into_cache"] = time.perf_counter() - t0

    def _wait(self, layer: int) -> None:
        if self.cuda:
            self._issue_through(layer + ISSUE_AHEAD)
            torch.cuda.current_stream(self.device).wait_event(self.events[layer])

    def wait_all(self) -> None:
        """The compute stream waits for every layer (nothing waits on the host)."""
        for i in range(self.num_layers):
            self._wait(i)
        self.deferred = False

    # -- the forward pass ---------------------------------------------------------------------
    def waits(self, model) -> "_Waits":
        """A context for the forward pass: with a deferred load, layer i's attention
        waits for layer i's copy; the forward is timed (``phases["forward"]``)."""
        return _Waits(self, model)

    def finish(self) -> dict:
        """Wait (on the host) until the copies and a timed forward are done, release the
        host chunks, and return the phases in seconds."""
        if self.cuda:
            self._issue_through(self.num_layers - 1)
            m = self._marks
            last = m.get("forward_end") or m.get("into_end") or m["copy_end"]
            last.synchronize()
            m["copy_end"].synchronize()
            self.phases["to_device"] = m["copy_start"].elapsed_time(m["copy_end"]) * 1e-3
            if "into_start" in m:
                self.phases["into_cache"] = m["into_start"].elapsed_time(m["into_end"]) * 1e-3
            if "forward_start" in m:
                self.phases["forward"] = (m["forward_start"].elapsed_time(m["forward_end"])
                                          * 1e-3)
                # > 0: the copies were still running when the forward began (the overlap)
                self.phases["copy_end_after_forward_start"] = (
                    m["forward_start"].elapsed_time(m["copy_end"]) * 1e-3)
        self.chunks = None
        return dict(self.phases)

    def _mark(self, name: str) -> None:
        if self.cuda:
            self._marks[name] = _timing_event(torch.cuda.current_stream(self.device))


class _Waits:
    def __init__(self, load: LayerwiseLoad, model):
        self.load, self.model, self.hooks = load, model, []

    def __enter__(self):
        load = self.load
        if load.deferred:
            attn = _attention_modules(self.model, load.num_layers)
            if attn is None:  # layers we cannot find: wait for all before the forward
                load.wait_all()
            else:
                for i, mod in enumerate(attn):
                    self.hooks.append(mod.register_forward_pre_hook(self._hook(i)))
        self.t0 = time.perf_counter()
        load._mark("forward_start")
        return self

    def _hook(self, i: int):
        def wait_once(module, args):  # the first forward only: decode steps need nothing
            self.load._wait(i)
            self.hooks[i].remove()
        return wait_once

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        for layer in self.load._behind:  # DynamicLayer's own update from here on
            layer.__dict__.pop("update", None)
        self.load._behind = []
        self.load.deferred = False  # the forward's updates consumed the planes
        self.load._mark("forward_end")
        if not self.load.cuda:
            self.load.phases["forward"] = time.perf_counter() - self.t0


def _write_behind(layer, planes, start: int) -> None:
    """Until ``planes`` (``[2, heads, start + room, head_dim]``, the prefix in its first
    ``start`` tokens) are full, ``layer``'s update writes the new keys and values behind
    the prefix and returns views of the planes, where ``DynamicLayer.update``
    concatenates: a 32k prompt's concatenation copies every layer's whole cache again
    (13 ms of a 139 ms forward on the H200, 30k tokens saved of 32k). The same tensors
    as the concatenation, bit for bit; the layer's own ``update`` (an instance attribute
    set here hides it) is back when the planes are full, or for an update that does not
    fit."""
    filled = start
    total = planes.shape[2]

    def update(key_states, value_states, *args, **kwargs):
        nonlocal filled
        n = key_states.shape[-2]
        if (key_states.shape[0] != 1 or filled + n > total or key_states.dtype != planes.dtype
                or key_states.shape[1:2] + key_states.shape[3:] != planes.shape[1:2] + planes.shape[3:]
                or value_states.shape != key_states.shape):
            layer.__dict__.pop("update", None)
            return layer.update(key_states, value_states, *args, **kwargs)
        planes[0, :, filled:filled + n].copy_(key_states[0])
        planes[1, :, filled:filled + n].copy_(value_states[0])
        filled += n
        layer.keys = planes[0, :, :filled].unsqueeze(0)
        layer.values = planes[1, :, :filled].unsqueeze(0)
        if filled == total:
            layer.__dict__.pop("update", None)
        return layer.keys, layer.values

    layer.update = update


def _attention_modules(model, layers: int):
    """The attention module of each cache layer (by its ``layer_idx``), or None unless
    every layer has exactly one."""
    found: dict[int, object] = {}
    for name, mod in model.named_modules():
        idx = getattr(mod, "layer_idx", None)
        if isinstance(idx, int) and type(mod).__name__.endswith("Attention"):
            if idx in found:
                return None
            found[idx] = mod
    if sorted(found) != list(range(layers)):
        return None
    return [found[i] for i in range(layers)]


def plain_dynamic(cache, layers: int) -> bool:
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    return (type(cache) is DynamicCache and len(cache.layers) == layers
            and all(type(layer) is DynamicLayer and not layer.is_initialized
                    for layer in cache.layers))


def _update_in_steps(cache, planes, step_tokens, wait) -> None:
    """The prefix as prefill steps through ``cache.update`` (a ``TieredCache``'s in steps
    its L1 budget admits, with its scores off: no queries exist for these tokens)."""
    n = planes[0].shape[-2]
    step = step_tokens or n
    tiered = hasattr(cache, "l1_budget_tokens")
    if tiered:
        bt = cache.block_tokens
        step = min(step, max(bt, (cache.l1_budget_tokens // bt - 1) * bt))  # new + the tail
    scores = getattr(cache, "needs_scores", False)
    if tiered:
        cache.needs_scores = False
    try:
        for s in range(0, n, step):
            for i, p in enumerate(planes):
                if s == 0:
                    wait(i)
                cache.update(p[0, :, s:s + step].unsqueeze(0), p[1, :, s:s + step].unsqueeze(0), i)
    finally:
        if tiered:
            cache.needs_scores = scores


def _batch_copier(chunks, device):
    """A function ``(stage, layer, stream)`` queuing every chunk's ``layer`` slice into
    ``stage`` as one batched driver call, or None where that cannot run (the reason is
    not an error: the torch copies do the same work)."""
    from ..hw import driver_api
    if not all(ch.is_pinned() and ch.is_contiguous() for ch in chunks):
        return None
    if driver_api.batch_copy_unavailable() is not None:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    nbytes = chunks[0][0].nbytes
    layer_stride = chunks[0].stride(0) * chunks[0].element_size()
    bases = [ch.data_ptr() for ch in chunks]

    def copy(stage, layer: int, stream: int) -> None:
        dst0, step = stage.data_ptr(), stage.stride(0) * stage.element_size()
        driver_api.memcpy_batch_async([dst0 + j * step for j in range(len(bases))],
                                      [b + layer * layer_stride for b in bases],
                                      [nbytes] * len(bases), stream, index)
    return copy


def _timing_event(stream):
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(stream)
    return ev
