"""The ``Backend`` that moves torch tensors: the data plane of ``synapse.hf.TieredCache``.

The same seam as the simulator and the cuda backend: the tier manager plans moves, the
mover turns them into ``Copy`` / ``Quantize`` / ``Dequantize`` / ``Zero`` ops with columns
of offsets, and this backend carries each op out in a handful of torch calls, whatever
the number of blocks (gather, one copy, scatter), on the current torch stream. On CUDA
with fp16 and PyCUDA, a ``Quantize`` on torch's default stream is one
fused kernel (``kv_quantize_layer_rows_int4`` in cuda/int4.cu: the layer rows of every
layer's blocks and their squared error) instead of about 140 aten ops per 16 MiB of
blocks, for either key format (``FUSED_CHANNEL_KEYS`` holds per-channel keys back).

Memory is laid out in *planes* (``synapse.kv.shape``): a space of ``n`` bytes is a tensor
``[P, n / P]`` of bytes, plane ``p = 2 * layer + (0 for K, 1 for V)``, and a block at
byte offset ``o`` (in the manager's units, a multiple of the slot size) owns bytes
``[o / P, (o + size) / P)`` of every plane. A plane of L1 reinterpreted as the model's
dtype is ``[tokens, kv_heads, head_dim]``, so a layer's keys are a view of the arena's
front (``synapse.kv.slots`` keeps the live blocks there). The INT4 spaces (staging, and
L2 when it holds INT4) have ``L`` planes instead, one per layer: a block's bytes in plane
``l`` are its *layer row*, the layer's key row then its value row
(``synapse.hf.int4.quantize_layer_rows``; keys per channel or per token,
``KVShape.int4_keys``), so rows of unequal size keep the plane split and a layer's L2
run is one contiguous copy. L1 is device memory (CUDA
virtual memory where available: ``synapse.kv.vmm``), L2 pinned host memory (plain host
memory on a CPU-only machine), and INT4 staging holds the tensors in flight between a
``Quantize`` and its D2H copy (or an H2D copy and its ``Dequantize``), keyed by the
staging offsets the manager allocated, which bound how many INT4 moves are in flight.

Copies between device and host run on the current stream with ``non_blocking``; a D2H
copy's scatter into L2 is host work done when its ticket is waited for. Op times are
host wall times around the calls (``OpRecord``), not device times.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from ..backend import Backend, _Wait, run_sync
from ..errors import KernelError
from ..ops import (Copy, Dequantize, Op, OpRecord, Quantize, Stream, Zero, merged_byte_ranges,
                   merged_ranges)
from ..hf.int4 import dequantize_layer_rows, quantize_layer_rows
from .shape import KVShape

# Whether a TorchBackend quantizes demotions with the fused CUDA kernel where it can
# (``TorchBackend._quantize_kernel``); False: always torch ops.
FUSED_QUANTIZE = True
# Per-channel keys (the default key format) on the kernel too. Held back in the seventh
# session, when its tests' per-channel cases failed on the H200: the difference was the
# torch ops' on CUDA, not the kernel's (a division by a Python scalar there multiplies by
# its reciprocal; synapse.hf.int4._quantize_groups now divides by a device tensor).
FUSED_CHANNEL_KEYS = True
CHANNEL_KEYS_HELD_BACK = ("per-channel keys are held back from the fused kernel "
                          "(torch_backend.FUSED_CHANNEL_KEYS = False): torch ops quantize them")


class PlaneMemory:
    """One space as ``[planes, nbytes / planes]`` bytes (see the module docstring)."""

    def __init__(self, space: str, nbytes: int, kind: str, planes: int, device: torch.device,
                 tensor: torch.Tensor | None = None, arena=None, planes_per_layer: int = 2):
        if nbytes % planes:
            raise ValueError(f"{space}: {nbytes} bytes do not split into {planes} planes")
        self.space, self.nbytes, self.kind, self.planes = space, nbytes, kind, planes
        self.planes_per_layer = planes_per_layer  # 2: K and V planes; 1: INT4 layer rows
        self.plane_bytes = nbytes // planes
        self.arena = arena  # the VMM arena behind a device space, if any
        if tensor is None:
            pin = kind == "pinned_host" and torch.cuda.is_available()
            dev = device if kind == "device" else torch.device("cpu")
            tensor = torch.zeros((planes, self.plane_bytes), dtype=torch.uint8, device=dev,
                                 pin_memory=pin)
        self.t = tensor

    def slots(self, slot_bytes: int) -> torch.Tensor:
        """``[planes, slots, slot_bytes / planes]`` view (slot ``i`` at offset ``i * slot_bytes``)."""
        per = slot_bytes // self.planes
        n = self.plane_bytes // per
        return self.t[:, : n * per].view(self.planes, n, per)

    def typed(self, dtype: torch.dtype, kv_heads: int, head_dim: int) -> torch.Tensor:
        """``[planes, tokens, kv_heads, head_dim]`` of ``dtype``: what attention reads."""
        item = torch.empty(0, dtype=dtype).element_size()
        per_token = kv_heads * head_dim * item
        n = self.plane_bytes // per_token
        return self.t[:, : n * per_token].view(dtype).view(self.planes, n, kv_heads, head_dim)

    def layer_runs(self, layer: int, count: int, slot_bytes: int) -> torch.Tensor:
        """The bytes of slots ``[0, count)`` of ``layer``: ``[runs, count, per]``, each run
        contiguous: its K and V planes (2 planes a layer), or its layer rows (1)."""
        k = self.planes_per_layer
        return self.slots(slot_bytes)[k * layer: k * (layer + 1), :count]

    def zero(self, offset: int, nbytes: int) -> None:
        p = self.planes
        lo, hi = offset // p, (offset + nbytes) // p
        if self.arena is not None:  # only mapped pages may be touched
            hi = min(hi, self.arena.mapped_pages() * self.arena.page_bytes)
        if hi > lo:
            self.t[:, lo:hi].zero_()

    def zero_ranges(self, ranges) -> None:
        """Zero ``(offset, nbytes)`` ranges, merged first: a slab allocator's batch of
        frees (the staging of a step's demotions) is one op, not one per block."""
        for offset, nbytes in merged_byte_ranges(ranges):
            self.zero(offset, nbytes)

    def extent(self, live_bytes: int) -> None:
        if self.arena is not None:
            self.arena.extent(live_bytes)

    def resize(self, nbytes: int) -> None:
        """Grow to ``nbytes`` keeping the bytes (a growing L2: pinned memory costs about a
        second per GiB to allocate, so it is taken as the sequence needs it)."""
        if self.arena is not None:
            raise ValueError(f"{self.space}: a virtual-memory arena does not resize")
        old = self.t
        new = torch.zeros((self.planes, nbytes // self.planes), dtype=torch.uint8,
                          device=old.device, pin_memory=old.is_pinned())
        new[:, : old.shape[1]] = old
        self.t, self.nbytes, self.plane_bytes = new, nbytes, nbytes // self.planes

    def address(self, offset: int) -> int:
        return int(self.t.data_ptr()) + offset // self.planes


class _Ticket:
    __slots__ = ("event", "post", "done")

    def __init__(self, event=None, post=None):
        self.event, self.post, self.done = event, post, False


class TorchBackend(Backend):
    """Ops on torch tensors (CPU, or CUDA on the current stream); see the module docstring."""

    name = "torch"
    moves_data = True
    simulated = False

    def __init__(self, device, shape: KVShape, dtype: torch.dtype, vmm: bool | None = None,
                 l2_int4: bool = False):
        """``l2_int4``: L2 holds INT4 blocks (layer rows, ``L`` planes: module docstring)."""
        self.device = torch.device(device)
        self.l2_int4 = l2_int4
        self.shape = shape
        self.dtype = dtype
        self.planes = shape.planes
        self._mem: dict[str, PlaneMemory] = {}
        self._staged: dict[tuple, torch.Tensor] = {}
        self._records: list[OpRecord] = []
        self._t0 = time.perf_counter()
        self.cuda = self.device.type == "cuda"
        self.vmm_requested = vmm
        self.vmm_status = "not used (CPU)" if not self.cuda else "not requested"
        self.bytes_moved = {"h2d": 0, "d2h": 0, "d2d": 0, "h2h": 0}
        self._q_err: list[torch.Tensor] = []  # INT4 reconstruction error of what was demoted
        # the fused quantize kernel where it can serve (``_quantize_kernel``); False: torch ops
        self.fused_quantize = FUSED_QUANTIZE
        self.fused_quantize_reason = ""
        self._fused_quantize = None  # resolved at the first Quantize: a launcher or False
        self.q_count = 0
        # where L1's planes come from when not allocated here: a callable (nbytes, planes,
        # device) -> uint8 [planes, nbytes / planes] tensor or None (synapse.hf.batch: the
        # sequences of a batch share one tensor, so a layer's op covers all of them)
        self.l1_source = None

    # -- memory -----------------------------------------------------------------------
    def memory(self, space: str, nbytes: int, kind: str) -> PlaneMemory:
        layers = self.shape.layers
        if space == "staging":  # tensors in flight, keyed by offset (see module docstring)
            mem = PlaneMemory(space, layers, kind, layers, self.device,
                              tensor=torch.zeros((layers, 1), dtype=torch.uint8),
                              planes_per_layer=1)
            mem.nbytes = nbytes
        elif space == "l2" and self.l2_int4:
            mem = PlaneMemory(space, nbytes, kind, layers, self.device, planes_per_layer=1)
        else:
            mem = PlaneMemory(space, nbytes, kind, self.planes, self.device)
        self._mem[space] = mem
        return mem

    def paged_memory(self, space: str, nbytes: int) -> PlaneMemory:
        if self.l1_source is not None and self.vmm_requested is not True:
            t = self.l1_source(nbytes, self.planes, self.device)
            if t is not None:
                mem = self._mem[space] = PlaneMemory(space, nbytes, "device", self.planes,
                                                     self.device, tensor=t)
                return mem
        if not self.cuda or self.vmm_requested is False:
            return self.memory(space, nbytes, "device")
        mem = self._mem[space] = self._vmm_memory(space, nbytes)
        return mem

    def _vmm_memory(self, space: str, nbytes: int) -> PlaneMemory:
        from . import vmm
        torch.cuda.init()  # the primary context must exist before the driver calls
        try:
            arena = vmm.VmmArena(nbytes, self.planes, self.device.index or 0,
                                 prefill_pages=min(2 * self.planes, 64))
        except vmm.VmmUnavailable as e:
            if self.vmm_requested:
                raise
            self.vmm_status = f"fallback to one allocation: {e}"
            return PlaneMemory(space, nbytes, "device", self.planes, self.device)
        self.vmm_status = f"CUDA virtual memory, {arena.page_bytes >> 20} MiB pages"
        return PlaneMemory(space, nbytes, "device", self.planes, self.device,
                           tensor=arena.tensor(self.device), arena=arena)

    def safe_point(self) -> None:
        """Unmap the L1 pages past the live prefix, once nothing queued still reads them
        (compaction's copies read past the new end): a sync, only when there is any."""
        for mem in self._mem.values():
            if mem.arena is not None and mem.arena.trim_pending:
                torch.cuda.current_stream(self.device).synchronize()
                mem.arena.trim()

    def space(self, name: str) -> PlaneMemory:
        return self._mem[name]

    # -- work -------------------------------------------------------------------------
    def submit(self, op: Op, stream: Stream, after: Sequence = ()) -> _Ticket:
        for mem in self._mem.values():  # a lazy arena (a cache's step) maps all for an op
            if mem.arena is not None and mem.arena.lazy:
                mem.arena.ensure()
        t0 = time.perf_counter() - self._t0
        try:
            post = self._execute(op)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            raise KernelError(f"{op.kind} ({op.purpose}) failed: {e}") from None
        ticket = _Ticket(post=post)
        if self.cuda and post is not None:
            ticket.event = torch.cuda.Event()
            ticket.event.record()
        t1 = time.perf_counter() - self._t0
        self._records.append(OpRecord(op.kind, op.purpose, stream.value, t0, t0, t1,
                                      op.nbytes, op.count))
        return ticket

    def _index(self, offsets: np.ndarray, slot_bytes: int) -> torch.Tensor:
        return torch.as_tensor(offsets // slot_bytes, dtype=torch.long)

    def _execute(self, op: Op):
        if isinstance(op, Copy):
            return self._copy(op)
        if isinstance(op, Quantize):
            src = self._mem[op.src_space]
            size = int(op.src_sizes[0])
            x = src.slots(size)[:, self._index(op.src_offsets, size).to(src.t.device)]
            sh, k = self.shape, x.shape[1]
            q = torch.empty((sh.layers * k, sh.layer_int4_bytes), dtype=torch.uint8,
                            device=x.device)
            err = torch.zeros(2, dtype=torch.float64, device=x.device)
            launch = self._quantize_kernel()
            if launch is None:
                self._quantize_torch(x, q, err)
            elif k:  # the gathered [L, 2, k, n] as it is: keys at 0, values k rows on
                x = x.contiguous()
                row = sh.plane_numel
                launch(x.data_ptr(), x.data_ptr() + k * row * sh.itemsize,
                       q.data_ptr(), err.data_ptr(), sh.layers * k, k, 2 * k * row)
            # kept on the device (no sync per demotion); read by ``int4_error``
            self._q_err.append(err)
            self.q_count += 2 * sh.layers * k * sh.plane_numel
            self._staged[tuple(op.dst_offsets.tolist())] = q.view(sh.layers, k, -1)
            return None
        if isinstance(op, Dequantize):
            q = self._staged.pop(tuple(op.src_offsets.tolist()))
            dst = self._mem[op.dst_space]
            size = int(op.dst_sizes[0])
            sh, (layers, k, _) = self.shape, q.shape
            rows = q.reshape(layers * k, -1)
            bt, c = sh.block_tokens, sh.kv_heads * sh.head_dim
            bk = torch.empty((layers * k, bt * c), dtype=self.dtype, device=rows.device)
            bv = torch.empty_like(bk)
            step = max(1, (16 << 20) // (4 * bt * c))  # bounded temporaries
            for lo in range(0, layers * k, step):
                pk, pv = dequantize_layer_rows(rows[lo:lo + step], bt, c, sh.int4_keys,
                                               sh.int4_group, self.dtype)
                bk[lo:lo + step] = pk.reshape(pk.shape[0], -1)
                bv[lo:lo + step] = pv.reshape(pv.shape[0], -1)
            x = torch.stack((bk.view(layers, k, -1), bv.view(layers, k, -1)), dim=1)
            idx = self._index(op.dst_offsets, size).to(dst.t.device)
            dst.slots(size)[:, idx] = x.view(2 * layers, k, -1).view(torch.uint8)
            return None
        if isinstance(op, Zero):
            for space, offset, nbytes in merged_ranges(op.regions):
                self._mem[space].zero(offset, nbytes)
            return None
        raise KernelError(f"the torch backend cannot run {type(op).__name__}")

    def _quantize_torch(self, x: torch.Tensor, q: torch.Tensor, err: torch.Tensor) -> None:
        """Gathered L1 blocks ``x`` [planes, k, slot / planes] -> layer rows ``q``, with the
        squared reconstruction error and squared values added to ``err`` (torch ops)."""
        sh, k = self.shape, x.shape[1]
        layers, bt, c = sh.layers, sh.block_tokens, sh.kv_heads * sh.head_dim
        kv = x.view(self.dtype).view(layers, 2, k, bt, c)
        keys = kv[:, 0].reshape(layers * k, bt, c)
        values = kv[:, 1].reshape(layers * k, bt, c)
        # in pieces: the float32 temporaries of a whole round (a tenth of L1 demoted
        # at once) were a third of the device memory a 32k-token decode held
        step = max(1, (16 << 20) // (4 * bt * c))
        for lo in range(0, layers * k, step):
            pk, pv = keys[lo:lo + step], values[lo:lo + step]
            q[lo:lo + step] = quantize_layer_rows(pk, pv, sh.int4_keys, sh.int4_group)
            bk, bv = dequantize_layer_rows(q[lo:lo + step], bt, c, sh.int4_keys,
                                           sh.int4_group, torch.float32)
            rk = pk.reshape(bk.shape).to(torch.float32)
            rv = pv.reshape(bv.shape).to(torch.float32)
            err += torch.stack((((bk - rk) ** 2).sum() + ((bv - rv) ** 2).sum(),
                                (rk * rk).sum() + (rv * rv).sum())).double()

    def _quantize_kernel(self):
        """The fused quantize (``kv_quantize_layer_rows_int4`` in cuda/int4.cu) as a
        launcher, when it serves this backend: CUDA, fp16, PyCUDA present, a shape within
        its contracts, torch on its default stream (the kernel launches there); else None
        and torch ops quantize (``_quantize_torch``: about 140 aten ops per 16 MiB piece and
        float32 temporaries). The same bytes either way (tests/test_layer_rows_cuda.py on
        the GPU); ``FUSED_CHANNEL_KEYS = False`` holds per-channel keys back; why not:
        ``fused_quantize_reason``."""
        launch = self._fused_quantize
        if launch is None:
            launch = False
            sh = self.shape
            if not self.fused_quantize:
                self.fused_quantize_reason = "fused_quantize is off"
            elif not self.cuda or self.dtype != torch.float16:
                self.fused_quantize_reason = f"{self.device.type}, {self.dtype}: fp16 on CUDA only"
            elif sh.int4_keys == "channel" and not FUSED_CHANNEL_KEYS:
                self.fused_quantize_reason = CHANNEL_KEYS_HELD_BACK
            else:
                try:
                    from ..hw import kernels
                    kernels.use_primary_context(self.device.index or 0)
                    launch = kernels.kv_quantize_layer_rows_launcher(
                        sh.block_tokens, sh.kv_heads * sh.head_dim, sh.int4_group, sh.int4_keys)
                except Exception as e:  # noqa: BLE001 (no PyCUDA, no driver, a shape outside
                    # the kernel's contracts: torch ops)
                    self.fused_quantize_reason = f"{type(e).__name__}: {e}"
                    launch = False
            self._fused_quantize = launch
        if launch is False or torch.cuda.current_stream(self.device).cuda_stream != 0:
            return None
        return launch

    def _copy(self, op: Copy):
        size = int(op.sizes[0]) if len(op.sizes) else 0
        if not size:
            return None
        self.bytes_moved[op.direction] += op.nbytes
        if op.direction in ("d2d", "h2h"):
            mem = self._mem[op.src_space]
            if op.direction == "h2h" and self.cuda:
                torch.cuda.current_stream(self.device).synchronize()  # no DMA still on L2
            v = mem.slots(size)
            dev = v.device
            v[:, self._index(op.dst_offsets, size).to(dev)] = \
                v[:, self._index(op.src_offsets, size).to(dev)]
            return None
        if op.direction == "d2h":
            if op.src_space == "staging":
                data = self._staged.pop(tuple(op.src_offsets.tolist()))
            else:
                src = self._mem[op.src_space]
                data = src.slots(size)[:, self._index(op.src_offsets, size).to(src.t.device)]
            dst = self._mem[op.dst_space]
            host = torch.empty(data.shape, dtype=torch.uint8, pin_memory=self.cuda)
            host.copy_(data, non_blocking=self.cuda)
            idx = self._index(op.dst_offsets, size)
            slots = dst.slots(size)

            def post():
                slots[:, idx] = host
            return post
        # h2d: gather on the host into pinned memory, one copy, scatter on the device
        src = self._mem[op.src_space]
        host = src.slots(size)[:, self._index(op.src_offsets, size)]
        if self.cuda:
            pinned = torch.empty(host.shape, dtype=torch.uint8, pin_memory=True)
            pinned.copy_(host)
            host = pinned
        data = host.to(self.device, non_blocking=self.cuda)
        if op.dst_space == "staging":
            self._staged[tuple(op.dst_offsets.tolist())] = data
            return None
        dst = self._mem[op.dst_space]
        dst.slots(size)[:, self._index(op.dst_offsets, size).to(self.device)] = data
        return None

    def int4_error(self) -> tuple[float, float]:
        """(sum of squared errors, sum of squares) over every element quantized so far."""
        if not self._q_err:
            return 0.0, 0.0
        self._q_err = [torch.stack(self._q_err).sum(0)]
        err, ref = self._q_err[0].tolist()
        return err, ref

    def wait(self, tickets: Sequence) -> _Wait:
        return _Wait([t for t in tickets if t is not None])

    def synchronize(self, ticket: _Ticket) -> None:
        if ticket.done:
            return
        if ticket.event is not None:
            ticket.event.synchronize()
        if ticket.post is not None:
            ticket.post()
        ticket.done = True

    def drive(self, process) -> float:
        """Run a mover generator to completion (``mover.execute``): seconds blocked."""
        return run_sync(process, self.synchronize)

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def run(self, process) -> None:
        self.drive(process)

    def records(self) -> list[OpRecord]:
        return self._records

    def environment(self) -> dict:
        return {"device": str(self.device), "l1_arena": self.vmm_status}

    def close(self) -> None:
        for mem in self._mem.values():
            if mem.arena is not None:
                mem.arena.close()
        self._mem.clear()
