"""The ``Backend`` that moves torch tensors: the data plane of ``synapse.hf.TieredCache``.

The same seam as the simulator and the cuda backend: the tier manager plans moves, the
mover turns them into ``Copy`` / ``Quantize`` / ``Dequantize`` / ``Zero`` ops with columns
of offsets, and this backend carries each op out in a handful of torch calls, whatever
the number of blocks (gather, one copy, scatter), on the current torch stream.

Memory is laid out in *planes* (``synapse.kv.shape``): a space of ``n`` bytes is a tensor
``[P, n / P]`` of bytes, plane ``p = 2 * layer + (0 for K, 1 for V)``, and a block at
byte offset ``o`` (in the manager's units, a multiple of the slot size) owns bytes
``[o / P, (o + size) / P)`` of every plane. A plane of L1 reinterpreted as the model's
dtype is ``[tokens, kv_heads, head_dim]``, so a layer's keys are a view of the arena's
front (``synapse.kv.slots`` keeps the live blocks there). L1 is device memory (CUDA
virtual memory where available: ``synapse.kv.vmm``), L2 pinned host memory (plain host
memory on a CPU-only machine), and INT4 staging holds the tensors in flight between a
``Quantize`` and its D2H copy (or an H2D copy and its ``Dequantize``), keyed by the
staging offsets the manager allocated, which bound how many INT4 moves are in flight.

Copies between device and host run on the current stream with ``non_blocking``; a D2H
copy's scatter into L2 is host work done when its ticket is waited for. Op times are
host wall times around the calls (``OpRecord``), not device times.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch

from ..backend import Backend, _Wait, run_sync
from ..errors import KernelError
from ..ops import Copy, Dequantize, Op, OpRecord, Quantize, Stream, Zero
from ..hf.int4 import dequantize_rows, quantize_rows
from .shape import KVShape


class PlaneMemory:
    """One space as ``[planes, nbytes / planes]`` bytes (see the module docstring)."""

    def __init__(self, space: str, nbytes: int, kind: str, planes: int, device: torch.device,
                 tensor: torch.Tensor | None = None, arena=None):
        if nbytes % planes:
            raise ValueError(f"{space}: {nbytes} bytes do not split into {planes} planes")
        self.space, self.nbytes, self.kind, self.planes = space, nbytes, kind, planes
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

    def zero(self, offset: int, nbytes: int) -> None:
        p = self.planes
        lo, hi = offset // p, (offset + nbytes) // p
        if self.arena is not None:  # only mapped pages may be touched
            hi = min(hi, len(self.arena.mapped[0]) * self.arena.page_bytes)
        if hi > lo:
            self.t[:, lo:hi].zero_()

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

    def __init__(self, device, shape: KVShape, dtype: torch.dtype, vmm: bool | None = None):
        self.device = torch.device(device)
        self.shape = shape
        self.dtype = dtype
        self.planes = shape.planes
        # offsets must split into planes on 16-byte boundaries (vector loads)
        self.alignment_bytes = 256 * self.planes // math.gcd(256, self.planes)
        self._mem: dict[str, PlaneMemory] = {}
        self._staged: dict[tuple, torch.Tensor] = {}
        self._records: list[OpRecord] = []
        self._t0 = time.perf_counter()
        self.cuda = self.device.type == "cuda"
        self.vmm_requested = vmm
        self.vmm_status = "not used (CPU)" if not self.cuda else "not requested"
        self.bytes_moved = {"h2d": 0, "d2h": 0, "d2d": 0, "h2h": 0}
        self._q_err: list[torch.Tensor] = []  # INT4 reconstruction error of what was demoted
        self.q_count = 0

    # -- memory -----------------------------------------------------------------------
    def memory(self, space: str, nbytes: int, kind: str) -> PlaneMemory:
        if space == "staging":  # tensors in flight, keyed by offset (see module docstring)
            mem = PlaneMemory(space, self.planes, kind, self.planes, self.device,
                              tensor=torch.zeros((self.planes, 1), dtype=torch.uint8))
            mem.nbytes = nbytes
        else:
            mem = PlaneMemory(space, nbytes, kind, self.planes, self.device)
        self._mem[space] = mem
        return mem

    def paged_memory(self, space: str, nbytes: int) -> PlaneMemory:
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
            p, k, per = x.shape
            rows = x.reshape(p * k, per).view(self.dtype)
            g = self.shape.int4_group
            q = torch.empty((p * k, self.shape.plane_int4_bytes), dtype=torch.uint8,
                            device=rows.device)
            err = torch.zeros(2, dtype=torch.float64, device=rows.device)
            # in pieces: the float32 temporaries of a whole round (a tenth of L1 demoted
            # at once) were a third of the device memory a 32k-token decode held
            step = max(1, (16 << 20) // (4 * rows.shape[1]))
            for lo in range(0, rows.shape[0], step):
                part = rows[lo:lo + step]
                q[lo:lo + step] = quantize_rows(part, g)
                back = dequantize_rows(q[lo:lo + step], part.shape[1], g, torch.float32)
                ref = part.to(torch.float32)
                err += torch.stack((((back - ref) ** 2).sum(), (ref * ref).sum())).double()
            # kept on the device (no sync per demotion); read by ``int4_error``
            self._q_err.append(err)
            self.q_count += rows.numel()
            self._staged[tuple(op.dst_offsets.tolist())] = q.view(p, k, -1)
            return None
        if isinstance(op, Dequantize):
            q = self._staged.pop(tuple(op.src_offsets.tolist()))
            dst = self._mem[op.dst_space]
            size = int(op.dst_sizes[0])
            p, k, _ = q.shape
            rows = q.reshape(p * k, -1)
            x = torch.empty((p * k, self.shape.plane_numel), dtype=self.dtype, device=rows.device)
            step = max(1, (16 << 20) // (4 * self.shape.plane_numel))  # bounded temporaries
            for lo in range(0, p * k, step):
                dequantize_rows(rows[lo:lo + step], self.shape.plane_numel,
                                self.shape.int4_group, self.dtype, out=x[lo:lo + step])
            idx = self._index(op.dst_offsets, size).to(dst.t.device)
            dst.slots(size)[:, idx] = x.view(torch.uint8).view(p, k, -1)
            return None
        if isinstance(op, Zero):
            for r in op.regions:
                self._mem[r.space].zero(r.offset, r.nbytes)
            return None
        raise KernelError(f"the torch backend cannot run {type(op).__name__}")

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
