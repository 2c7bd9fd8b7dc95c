"""The cuda backend: the drivers' ops on an NVIDIA GPU through PyCUDA and cuda-bindings.

Memory: each device space (L1 arena, INT4 staging, weight ring) is one ``cuMemAlloc`` made
at set-up (no device allocation on the hot path); each pinned space (L2 pool, staging for
ingest and small tables) is one ``pagelocked_empty`` array, checked against the memlock
limit first. Streams: compute (a PyCUDA stream, so PyCUDA can launch our kernels and
PyTorch can join it through ``torch.cuda.ExternalStream``), and H2D and D2H copy streams
created at the highest priority through cuda-bindings. Every op gets a start and an end
event on its stream; ``after`` tickets become ``cuStreamWaitEvent``; the synchronous
executor blocks on end events, and a failure surfaces as ``KernelError`` naming the op,
delivered at the driver's yield so the mover can abort its moves. Op times are read from
the events after the run (device time, not host time).

Context: the device's primary context, shared with PyTorch; pushed here and popped in
``close`` (a context left pushed at exit aborts the interpreter).
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Sequence

import numpy as np

from ..backend import Backend, _Wait, run_sync
from ..errors import BackendUnavailable, CapacityError, KernelError
from ..ops import (PINNED_ZERO_BEFORE, ZERO_PAGE_BYTES, ZERO_STREAM, Attention, Copy, Dequantize,
                   DiskIO, Ingest, LayerCompute, Op, OpRecord, PinnedZero, Quantize, Region,
                   Stream, Zero, merged_ranges)
from . import driver_api as drv
from .disk_queue import DiskQueue
from .pinned_pool import check_pinnable
from ..monitor.tracker import purpose_for_space, release as _untrack, track as _track

try:
    import pycuda.driver as cuda
except (ImportError, OSError) as e:  # no PyCUDA, or no libcuda
    raise ImportError(f"PyCUDA is not usable here: {e}") from None

_FMT_CODE = {0: 0, 1: 0, 2: 1}  # blocks.Fmt -> kernel table code (fp16 0, int4 1)
_FMT_LUT = np.array([_FMT_CODE[i] for i in range(3)], np.int32)


def _pad256(n: int) -> int:
    return (n + 255) // 256 * 256


class DeviceMemory:
    """One device allocation; ``zero`` queues a memset on the stream that next writes it."""

    kind = "device"

    def __init__(self, backend: "CudaBackend", space: str, nbytes: int):
        self.backend, self.space, self.nbytes = backend, space, nbytes
        self.base = drv.mem_alloc(max(nbytes, 256))
        self.tracked = _track(self.base, max(nbytes, 256), "device", purpose_for_space(space),
                              owner="cuda_backend")

    def address(self, offset: int) -> int:
        return self.base + offset

    def zero(self, offset: int, nbytes: int) -> None:
        self.backend.queue_zero(self, offset, nbytes)

    def free(self) -> None:
        if self.base:
            _untrack(self.tracked)
            drv.mem_free(self.base)
            self.base = 0


class VmmDeviceMemory:
    """The L1 arena on CUDA virtual memory (``synapse.kv.vmm``): one plane whose pages
    are mapped as the live prefix of the compacted arena grows; the budget is what can be
    mapped. Unmapping waits for ``CudaBackend.step_done`` (queued copies read past the
    end); ``zero`` touches mapped pages only."""

    kind = "device"

    def __init__(self, backend: "CudaBackend", space: str, nbytes: int, arena):
        self.backend, self.space, self.nbytes, self.arena = backend, space, nbytes, arena
        self.base = arena.base

    def address(self, offset: int) -> int:
        return self.base + offset

    def extent(self, live_bytes: int) -> None:
        self.arena.extent(live_bytes)

    def zero(self, offset: int, nbytes: int) -> None:
        end = min(offset + nbytes, self.arena.mapped_pages() * self.arena.page_bytes)
        if end > offset:
            self.backend.queue_zero(self, offset, end - offset)

    def free(self) -> None:
        if self.arena is not None:
            self.arena.close()
            self.arena = None


class PinnedMemory:
    """One page-locked host array (PyCUDA ``pagelocked_empty``). With a ``backend``, a
    freed range is zeroed by a copy engine (``queue_zero``: a D2H copy from a device page
    of zeros on the stream that next writes the space), and a host view waits for the
    zeroing queued so far; without one (staging), on the host."""

    kind = "pinned_host"

    def __init__(self, space: str, nbytes: int, backend: "CudaBackend | None" = None):
        check_pinnable(nbytes)
        try:
            self.array = cuda.pagelocked_empty(max(nbytes, 256), np.uint8)
        except cuda.Error as e:
            raise CapacityError(f"page-locking {nbytes} bytes for {space} failed ({e}); check "
                                f"`ulimit -l` and free host memory") from None
        self.space, self.nbytes, self.backend = space, nbytes, backend
        self.zero_owed = False  # ranges freed whose zeroing is not done yet
        self.zeroing = None  # the ticket of the last zeroing copy queued into it
        self.base = int(self.array.ctypes.data)
        self.tracked = _track(self.base, self.array.nbytes, "pinned_host",
                              purpose_for_space(space), owner="cuda_backend")

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        if self.zero_owed:  # the host must not see (or write) what a copy is to clear
            self.backend.settle_zero(self)
        return self.array[offset: offset + nbytes]

    def address(self, offset: int) -> int:
        return self.base + offset

    def zero(self, offset: int, nbytes: int) -> None:
        # Freed at a commit, after the step's ops completed: nothing reads it any more.
        if self.backend is None:
            self.array[offset: offset + nbytes] = 0
        else:
            self.zero_owed = True
            self.backend.queue_zero(self, offset, nbytes)

    def free(self) -> None:
        _untrack(self.tracked)
        base = getattr(self.array, "base", None)
        if base is not None and hasattr(base, "free"):
            base.free()
        self.array = None


class _Staging:
    """A pinned host ring mirrored by a device ring, for per-op small data (block tables,
    queries, outputs) and ingest payloads.

    A slice is reused only once the op that used it has completed. Slices are handed out
    in ring order and kept in a deque in that order, so the slices a new one overlaps are
    always at the front: ``take`` costs O(slices it overwrites), not O(slices alive) (a
    list scanned on every take made the tsunami scenario spend 11 s of 36 in here).
    """

    def __init__(self, nbytes: int, finish):
        self.nbytes = nbytes
        self.host = PinnedMemory("staging_host", nbytes)
        self.dev = drv.mem_alloc(nbytes)
        self.tracked = _track(self.dev, nbytes, "device", "staging", owner="cuda_backend")
        self.head = 0
        self.finish = finish  # completes a ticket (waits, then copies its results out)
        # [offset, size, ticket or None (the op being prepared)], in ring order
        self.live: deque[list] = deque()

    def _retire(self, entry) -> None:
        if entry[2] is None:
            # The op being prepared has not launched yet, so its earlier slices cannot be
            # waited for; ``reserve`` makes this unreachable.
            raise KernelError(f"staging ring of {self.nbytes} bytes wrapped onto the op "
                              f"being prepared (reserve() was not called)")
        self.finish(entry[2])

    def take(self, size: int, stream: int) -> int:
        size = (size + 255) // 256 * 256
        if size > self.nbytes:
            raise CapacityError(f"an op needs {size} bytes of staging; the staging ring has "
                                f"{self.nbytes}")
        live = self.live
        if self.head + size > self.nbytes:
            # skip the tail: the previous lap's slices there are the oldest, retire them
            while live and live[0][0] >= self.head:
                self._retire(live.popleft())
            self.head = 0
        lo, hi = self.head, self.head + size
        while live and live[0][0] < hi and live[0][0] + live[0][1] > lo:
            self._retire(live.popleft())
        live.append([lo, size, None])
        self.head = hi
        return lo

    def reserve(self, total: int) -> None:
        """Make sure one op can take ``total`` bytes without wrapping onto itself.

        Slices of one op span at most ``total`` plus a skipped tail shorter than ``total``,
        so a ring of twice the op's need is enough. Growing waits for everything in flight
        and reallocates pinned memory (about a second per GiB on the H100 host): drivers
        call ``CudaBackend.reserve_staging`` at set-up so this never happens mid-run.
        """
        total = (total + 255) // 256 * 256
        if 2 * total <= self.nbytes:
            return
        while self.live:
            entry = self.live.popleft()
            if entry[2] is not None:
                self.finish(entry[2])
        self.close()
        self.nbytes = 2 * total
        self.host = PinnedMemory("staging_host", self.nbytes)
        self.dev = drv.mem_alloc(self.nbytes)
        self.tracked = _track(self.dev, self.nbytes, "device", "staging", owner="cuda_backend")
        self.head = 0

    def seal(self, ticket) -> None:
        """The op being enqueued recorded its end event: its slices free up after it."""
        for entry in reversed(self.live):
            if entry[2] is not None:
                break
            entry[2] = ticket

    def close(self) -> None:
        if self.dev:
            _untrack(self.tracked)
            drv.mem_free(self.dev)
            self.dev = 0
        self.host.free()


class _Ticket:
    __slots__ = ("op", "stream", "start", "end", "submit_s", "value", "post", "done", "future")

    def __init__(self, op, stream, start, end, submit_s):
        self.op, self.stream, self.start, self.end, self.submit_s = op, stream, start, end, submit_s
        self.value = None
        self.post = None  # host work after completion (copy results out of staging)
        self.done = False
        self.future = None  # disk I/O: its worker's job (no CUDA events)


# Copies of several rows as one cuMemcpyBatchAsync call where the driver has it (CUDA
# 12.8+): a loop of driver calls between an op's start and end events made a many-row op
# last as long as the host took to issue its rows (the H200's small ingests and fetches,
# 2026-12-02), and cost the host a call per row. False: a driver call per row.
BATCH_COPIES = True


class CudaBackend(Backend):
    name = "cuda"
    moves_data = True
    dma_ingest = True
    simulated = False

    def __init__(self, device: int = 0, staging_bytes: int = 256 << 20, vmm: bool | None = None):
        try:
            cuda.init()
            self.device = cuda.Device(device)
            self.device_index = device
        except cuda.Error as e:
            raise BackendUnavailable(f"--backend cuda: no usable NVIDIA GPU ({e})") from None
        self.ctx = self.device.retain_primary_context()
        self.ctx.push()
        self._closed = False
        self.vmm = vmm  # None: L1 on CUDA virtual memory where available; False: cuMemAlloc
        self.l1_arena_kind = "not allocated yet"
        try:
            least, greatest = drv.stream_priority_range()
            self.compute = cuda.Stream()
            self.streams = {
                Stream.COMPUTE: int(self.compute.handle),
                Stream.H2D: drv.stream_create(greatest),
                Stream.D2H: drv.stream_create(greatest),
            }
            self.stream_priority = {"compute": 0, "h2d": greatest, "d2h": greatest}
            self._mem: dict[str, object] = {}
            self._pending_zero: dict[str, list] = {}
            self._tickets: list[_Ticket] = []
            self._base_event = drv.event_create()
            self._fill_events = (drv.event_create(), drv.event_create())
            self._disk = DiskQueue()
            drv.event_record(self._base_event, self.streams[Stream.COMPUTE])
            self._other_blocked_s = 0.0
            self.staging = _Staging(staging_bytes, self._wait_blocked)
            self._t0 = time.perf_counter()
            self._torch = None
            self.fail_next: dict[str, int] = {}  # fault injection for tests: op kind -> count
            why = drv.batch_copy_unavailable() if BATCH_COPIES else "cuda_backend.BATCH_COPIES is off"
            self._batched = why is None
            self.copy_path = ("one cuMemcpyBatchAsync call per op" if why is None
                              else f"a driver call per row ({why})")
        except Exception:
            self.close()
            raise

    # -- memory -------------------------------------------------------------------
    def paged_memory(self, space: str, nbytes: int):
        if self.vmm is False:
            return self.memory(space, nbytes, "device")
        return self._keep(space, self._vmm_memory(space, nbytes))

    def memory(self, space: str, nbytes: int, kind: str):
        if kind == "device":
            return self._keep(space, DeviceMemory(self, space, nbytes))
        if "zeros" not in self._mem:  # the page pinned ranges are zeroed from (set-up)
            zeros = DeviceMemory(self, "zeros", ZERO_PAGE_BYTES)
            drv.memset_d8_async(zeros.base, 0, ZERO_PAGE_BYTES, self.streams[Stream.D2H])
            drv.stream_synchronize(self.streams[Stream.D2H])
            self._mem["zeros"] = zeros
        return self._keep(space, PinnedMemory(space, nbytes, self))

    def _keep(self, space: str, mem):
        old = self._mem.pop(space, None)
        if old is not None:
            old.free()
        self._mem[space] = mem
        return mem

    def _vmm_memory(self, space: str, nbytes: int):
        from ..kv import vmm
        try:
            # Unmapped pages stay in the pool up to the arena's size (the L1 budget): a
            # tsunami run swings L1 by hundreds of pages a step, and releasing then
            # re-creating them cost 7,398 cuMemCreate + cuMemRelease in the run.
            pages = -(-nbytes // (2 << 20))
            arena = vmm.VmmArena(nbytes, 1, self.device_index, prefill_pages=16,
                                 spare_pages=pages)
        except vmm.VmmUnavailable as e:
            if self.vmm:
                raise BackendUnavailable(f"L1 on CUDA virtual memory: {e}") from None
            self.l1_arena_kind = f"one cuMemAlloc (CUDA virtual memory unavailable: {e})"
            return DeviceMemory(self, space, nbytes)
        self.l1_arena_kind = f"CUDA virtual memory, {arena.page_bytes >> 20} MiB pages mapped on demand"
        return VmmDeviceMemory(self, space, nbytes, arena)

    def step_done(self) -> None:
        """A driver finished a step: unmap the L1 pages past the live prefix (once the
        copies compaction queued have read them), so the pages mapped are the step's."""
        mem = self._mem.get("l1")
        if isinstance(mem, VmmDeviceMemory) and mem.arena.trim_pending:
            self._synchronize_all_blocked()
            mem.arena.trim()

    def l1_pages(self) -> int | None:
        arena = self.l1_arena()
        return None if arena is None else arena.pages_mapped

    def l1_arena(self):
        """L1's virtual-memory arena (``kv.vmm.VmmArena``: pages, map and unmap timers),
        or None where L1 is one allocation."""
        mem = self._mem.get("l1")
        return mem.arena if isinstance(mem, VmmDeviceMemory) else None

    def warm_up_compute(self, rows: int = 64, hidden: int = 64, ffn: int = 64) -> None:
        torch = self._torch_mod()
        dev = f"cuda:{self.device_index}"
        with torch.cuda.stream(self._ext):
            w1 = torch.zeros((hidden, ffn), dtype=torch.float16, device=dev)
            w2 = torch.zeros((ffn, hidden), dtype=torch.float16, device=dev)
            x = torch.ones((rows, hidden), dtype=torch.float16, device=dev)
            self._layer_math(x, w1, w2)
        self._ext.synchronize()
        del w1, w2, x
        torch.cuda.empty_cache()  # the scratch weights are not the run's memory

    def reserve_staging(self, op_bytes: int) -> None:
        """Size the staging ring at set-up for ops of up to ``op_bytes`` of payload."""
        self.staging.reserve(op_bytes)

    def queue_zero(self, mem: DeviceMemory, offset: int, nbytes: int) -> None:
        self._pending_zero.setdefault(mem.space, []).append((offset, nbytes))

    def _flush_zero(self, stream: Stream | None = None) -> None:
        """Queue the zeroing owed: device ranges before any op, pinned ranges before an
        op on ``PINNED_ZERO_BEFORE`` (the next to write them) or, with ``stream`` None,
        now; a step frees its L2 slabs at several commits, and one batch clears them."""
        pinned_too = stream is None or stream in PINNED_ZERO_BEFORE
        for space in list(self._pending_zero):
            mem = self._mem[space]
            if isinstance(mem, PinnedMemory):
                if pinned_too:
                    mem.zeroing = self._enqueue(PinnedZero.of(space, self._pending_zero.pop(space)),
                                                ZERO_STREAM.get(space, Stream.D2H), ())
                continue
            ranges = self._pending_zero.pop(space)
            regions = tuple(Region(space, o, n) for o, n in ranges)
            self._enqueue(Zero(purpose="zero_on_free", regions=regions),
                          ZERO_STREAM.get(space, Stream.COMPUTE), ())

    def settle_zero(self, mem: PinnedMemory) -> None:
        """Wait for the zeroing copies queued into ``mem`` (before a host access)."""
        if self._pending_zero.get(mem.space):
            self._flush_zero()
        if mem.zeroing is not None:
            self._wait_blocked(mem.zeroing)
            mem.zeroing = None
        mem.zero_owed = False

    def read_region(self, region: Region) -> np.ndarray:
        mem = self._mem[region.space]
        if isinstance(mem, PinnedMemory):
            return mem.view(region.offset, region.nbytes).copy()
        self._synchronize_all_blocked()
        # one page-locked buffer for every read, grown as needed: with a page-locked
        # allocation and free per read, the tenants scenario's data checks spent 1.3 s of
        # host time in 1,845 reads (cProfile on the H200, about 0.7 ms a read)
        buf = getattr(self, "_read_buf", None)
        if buf is None or buf.nbytes < region.nbytes:
            buf = self._read_buf = cuda.pagelocked_empty(max(region.nbytes, 1 << 20), np.uint8)
        drv.memcpy_dtoh_async(int(buf.ctypes.data), mem.address(region.offset), region.nbytes,
                              self.streams[Stream.D2H])
        t0 = time.perf_counter()
        drv.stream_synchronize(self.streams[Stream.D2H])
        self._other_blocked_s += time.perf_counter() - t0  # waiting for the copy: not busy
        return buf[:region.nbytes].copy()

    # -- work -----------------------------------------------------------------------
    def submit(self, op: Op, stream: Stream, after: Sequence = ()) -> _Ticket:
        if self._pending_zero:
            self._flush_zero(stream)
        return self._enqueue(op, stream, after)

    def _enqueue(self, op: Op, stream: Stream, after: Sequence) -> _Ticket:
        left = self.fail_next.get(op.kind, 0)
        if left:
            self.fail_next[op.kind] = left - 1
            raise KernelError(f"{op.kind} ({op.purpose}) failed: injected fault")
        s = self.streams.get(stream)  # none for the disk streams (disk_queue's workers)
        submit_s = time.perf_counter() - self._t0
        ticket = _Ticket(op, stream, None, None, submit_s)
        if isinstance(op, DiskIO):
            # Host I/O on the disk stream's worker (disk_queue): the copies it reads or
            # overwrites complete first (waited for here: CUDA calls stay on this
            # thread); the disk ops it follows are waited for by the worker.
            for t in after:
                if t is not None and t.future is None:
                    self._wait_blocked(t)
            for mem in self._mem.values():  # its thread may touch any pinned space
                if isinstance(mem, PinnedMemory) and mem.zero_owed:
                    self.settle_zero(mem)
            ticket.future = self._disk.submit(stream.value, op.run,
                                              [t.future for t in after if t is not None])
            self._tickets.append(ticket)
            return ticket
        for t in after:  # a disk op it reads or overwrites has completed
            if t is not None and t.future is not None:
                self._wait_blocked(t)
        # Host-side preparation (filling pinned staging, building block tables) happens
        # before the start event is recorded: on an idle stream the start event fires at
        # once, so host work inside the window would be timed as device time (the first
        # needle run on an H100 showed ingest copies of 3-7 ms that were mostly numpy).
        try:
            launch = self._prepare(op, s, ticket)
            for t in after:
                if t is not None and t.future is None:
                    drv.stream_wait_event(s, t.end)
            start, end = drv.event_create(), drv.event_create()
            ticket.start, ticket.end = start, end
            drv.event_record(start, s)
            launch()
        except KernelError as e:
            raise KernelError(f"{op.kind} ({op.purpose}): {e}") from None
        except cuda.Error as e:
            raise KernelError(f"{op.kind} ({op.purpose}) failed to launch: {e}") from None
        drv.event_record(end, s)
        self.staging.seal(ticket)
        self._tickets.append(ticket)
        return ticket

    def _addr(self, space: str, offset: int) -> int:
        return self._mem[space].address(offset)

    def _prepare(self, op: Op, s: int, ticket: _Ticket):
        """Do the op's host work now; return the callable that enqueues its device work."""
        if isinstance(op, Copy):
            return self._copy(op, s)
        if isinstance(op, Ingest):
            return self._ingest(op, s)
        if isinstance(op, (Quantize, Dequantize)):
            from . import kernels
            kernel = kernels.quantize_int4 if isinstance(op, Quantize) else kernels.dequantize_int4
            args = (op.numel, op.group_size)
            if op.int4_keys == "channel":  # keys per channel, values per token (kv_layout)
                kernel = kernels.quantize_kv_block_int4 if isinstance(op, Quantize) \
                    else kernels.dequantize_kv_block_int4
                args = (op.block_tokens, op.numel // (2 * op.block_tokens), op.group_size)
            src = (self._mem[op.src_space].base + op.src_offsets).tolist()
            dst = (self._mem[op.dst_space].base + op.dst_offsets).tolist()

            def launch():
                for a, b in zip(src, dst):
                    kernel(a, b, *args, stream=self.compute)
            return launch
        if isinstance(op, Attention):
            return self._attention(op, s, ticket)
        if isinstance(op, LayerCompute):
            return lambda: self._layer(op)
        if isinstance(op, Zero):
            regions = [(self._addr(sp, o), n) for sp, o, n in merged_ranges(op.regions)]

            def launch():
                for a, n in regions:
                    drv.memset_d8_async(a, 0, n, s)
            return launch
        raise KernelError(f"the cuda backend cannot run {type(op).__name__}")

    def _ingest(self, op: Ingest, s: int):
        """Regions whose bytes sit in pinned memory are DMA'd from there (their keys, if
        any, written by one kernel after); the others are filled into staging first."""
        srcs = [op.pinned(i) for i in range(len(op.dst))] if op.pinned else [None] * len(op.dst)
        keyed = [(self._addr(r.space, r.offset), src[1], r.nbytes)
                 for r, src in zip(op.dst, srcs) if src is not None and src[1] is not None]
        host = self.staging.host
        table_bytes = 0
        if keyed:
            kd = len(keyed[0][1])
            n = len(keyed)
            table_bytes = _pad256(8 * n) + _pad256(2 * kd * n) + _pad256(4 * n)
        self.staging.reserve(table_bytes + sum(_pad256(r.nbytes) for r, src in zip(op.dst, srcs)
                                               if src is None))
        pairs = []
        for i, (r, src) in enumerate(zip(op.dst, srcs)):
            d = self._addr(r.space, r.offset)
            if src is not None:
                pairs.append((d, src[0], r.nbytes))
                continue
            off = self.staging.take(r.nbytes, s)
            try:
                op.write_into(i, host.view(off, r.nbytes))
            except ValueError as e:
                raise KernelError(str(e)) from None
            pairs.append((d, host.address(off), r.nbytes))
        table = None
        if keyed:
            token_bytes = 4 * op.key_rows * op.head_dim
            off = self.staging.take(table_bytes, s)
            buf = host.view(off, table_bytes)
            p_ptr, p_key = _pad256(8 * n), _pad256(2 * kd * n)
            buf[:8 * n].view(np.int64)[:] = [d for d, _, _ in keyed]
            buf[p_ptr:p_ptr + 2 * kd * n].view(np.float16).reshape(n, kd)[:] = \
                [k for _, k, _ in keyed]
            buf[p_ptr + p_key:p_ptr + p_key + 4 * n].view(np.int32)[:] = \
                [nb // token_bytes for _, _, nb in keyed]
            dev = self.staging.dev + off
            table = (off, dev, dev + p_ptr, dev + p_ptr + p_key, n, kd)

        rows = self._rows(pairs, "h2d", s)

        def launch():
            rows()
            if table is not None:
                from . import kernels
                off, ptrs, keys, ntok, n, kd = table
                drv.memcpy_htod_async(ptrs, host.address(off), table_bytes, s)
                # kernels run on the compute stream: order it after this stream's copies,
                # and this stream's end event after the kernel
                drv.event_record(self._fill_events[0], s)
                drv.stream_wait_event(self.streams[Stream.COMPUTE], self._fill_events[0])
                kernels.key_prefix(ptrs, keys, ntok, n, kd, op.key_rows, op.head_dim,
                                   stream=self.compute)
                drv.event_record(self._fill_events[1], self.streams[Stream.COMPUTE])
                drv.stream_wait_event(s, self._fill_events[1])
        return launch

    def _rows(self, triples, direction: str, s: int):
        """A callable queuing the copies ``(dst, src, nbytes)`` on stream ``s``: one
        batched driver call for two or more where it can (``BATCH_COPIES``), else a call
        per row."""
        copy = {"h2d": drv.memcpy_htod_async, "d2h": drv.memcpy_dtoh_async,
                "d2d": drv.memcpy_dtod_async}[direction]

        def launch():
            for d, so, n in triples:
                copy(d, so, n, s)
        if not (self._batched and len(triples) > 1):
            return launch
        dsts, srcs, sizes = (list(col) for col in zip(*triples))

        def batched():
            if self._batched:
                try:
                    drv.memcpy_batch_async(dsts, srcs, sizes, s, self.device_index, direction)
                    return
                except KernelError as e:  # the loop does the same work; the run says why
                    self._batched = False
                    self.copy_path = f"a driver call per row (after {e})"
            launch()
        return batched

    def _copy(self, op: Copy, s: int):
        src, dst = self._mem[op.src_space], self._mem[op.dst_space]
        triples = list(zip((dst.base + op.dst_offsets).tolist(),
                           (src.base + op.src_offsets).tolist(), op.sizes.tolist()))
        if op.direction in ("h2d", "d2h"):
            return self._rows(triples, op.direction, s)
        if op.direction != "d2d":
            raise KernelError(f"the cuda backend cannot copy {op.direction}")
        if not set(op.src_offsets.tolist()) & set(op.dst_offsets.tolist()):
            return self._rows(triples, "d2d", s)
        # rows that take each other's places: gather every source first, then scatter
        total = int(op.sizes.sum())
        scratch = self._scratch(total)
        offs = np.concatenate([[0], np.cumsum(op.sizes)[:-1]]).tolist()
        gather = self._rows([(scratch + o, so, n) for (_, so, n), o in zip(triples, offs)], "d2d", s)
        scatter = self._rows([(d, scratch + o, n) for (d, _, n), o in zip(triples, offs)], "d2d", s)

        def launch():
            gather()
            scatter()
        return launch

    def _scratch(self, nbytes: int) -> int:
        """Device scratch for a gather-then-scatter copy (grown rarely, at a sync)."""
        have = getattr(self, "_scratch_mem", None)
        if have is None or have[1] < nbytes:
            self._synchronize_all_blocked()
            if have is not None:
                drv.mem_free(have[0])
            size = max(nbytes, 4 << 20)
            self._scratch_mem = (drv.mem_alloc(size), size)
        return self._scratch_mem[0]

    def _attention(self, op: Attention, s: int, ticket: _Ticket):
        if op.segments is not None:
            return self._attention_segments(op, s, ticket)
        from . import kernels
        lay = op.layout
        nb = len(op.offsets)
        L, H, D = lay.layers, lay.kv_heads, lay.head_dim
        q = op.query
        if q.dtype != np.float32 or not q.flags.c_contiguous:
            q = np.ascontiguousarray(q, np.float32)
        # One staging slice: the table (ptrs u64, fmts i32, n_valid i32) and q go up in
        # one copy; out and the per-block lse come back in one. The host side of an op is
        # most of a scenario step's time on the GPU, so this avoids NumPy temporaries.
        p_ptr, p_fmt, p_nv, p_q = _pad256(8 * nb), _pad256(4 * nb), _pad256(4 * nb), _pad256(q.nbytes)
        o_bytes, l_bytes = 4 * L * H * D, 4 * L * H * max(nb, 1)
        up = p_ptr + p_fmt + p_nv + p_q
        total = up + _pad256(o_bytes) + l_bytes
        self.staging.reserve(total)
        off = self.staging.take(total, s)
        host = self.staging.host
        buf = host.view(off, up)
        o = self._stage_table(op, buf, p_ptr, p_fmt) + p_nv
        buf[o:o + q.nbytes] = q.reshape(-1).view(np.uint8)
        dev = self.staging.dev + off
        o_off, l_off = off + up, off + up + _pad256(o_bytes)
        upload = up - p_q + q.nbytes
        readback = op.readback
        if readback:
            ticket.post = ("attention", o_off, l_off, (L, H, D), (L, H, nb))
        launch_attention = kernels.attention_launcher(L, H, D, lay.block_tokens, op.group_size,
                                                      nb)

        def launch():
            drv.memcpy_htod_async(dev, host.address(off), upload, s)
            launch_attention(dev + up - p_q, dev, dev + p_ptr, dev + p_ptr + p_fmt,
                             op.softmax_scale, self.staging.dev + o_off,
                             self.staging.dev + l_off, self.compute)
            if readback:
                drv.memcpy_dtoh_async(host.address(o_off), self.staging.dev + o_off,
                                      total - up, s)
        return launch

    def _stage_table(self, op: Attention, buf: np.ndarray, p_ptr: int, p_fmt: int) -> int:
        """An attention op's block table into ``buf``: block addresses (u64) at 0, kernel
        format codes (i32) at ``p_ptr``, valid tokens (i32) after; returns where those are."""
        nb = len(op.offsets)
        np.add(op.offsets, self._mem[op.space].base, out=buf[:8 * nb].view(np.int64),
               casting="unsafe")
        np.take(_FMT_LUT, op.fmts, out=buf[p_ptr:p_ptr + 4 * nb].view(np.int32))
        o = p_ptr + p_fmt
        buf[o:o + 4 * nb].view(np.int32)[:] = op.n_valid
        return o

    def _attention_segments(self, op: Attention, s: int, ticket: _Ticket):
        """All of a step's requests in one launch (``kernels.SegmentsLauncher``): one
        staging slice holds the block table, the segment and work-item tables and the S
        queries (one upload); outputs [S, L, H, D] and every segment's lse come back in
        one copy when read back."""
        from . import kernels
        lay = op.layout
        nb, S = len(op.offsets), op.num_segments
        L, H, D = lay.layers, lay.kv_heads, lay.head_dim
        launcher = kernels.segments_launcher(L, H, D, lay.block_tokens, op.group_size)
        bps, items = launcher.plan(op.segments)
        q_bytes = 4 * L * H * D
        p_ptr, p_fmt, p_nv = _pad256(8 * nb), _pad256(4 * nb), _pad256(4 * nb)
        p_seg = _pad256(8 * (S + 1))  # seg_starts then item_starts, i32 each
        up = p_ptr + p_fmt + p_nv + p_seg + _pad256(S * q_bytes)
        o_bytes, l_bytes = S * q_bytes, 4 * L * H * max(nb, 1)
        total = up + _pad256(o_bytes) + l_bytes
        self.staging.reserve(total)
        off = self.staging.take(total, s)
        host = self.staging.host
        buf = host.view(off, up)
        o_seg = self._stage_table(op, buf, p_ptr, p_fmt) + p_nv
        seg = buf[o_seg:o_seg + 8 * (S + 1)].view(np.int32)
        seg[:S + 1] = op.segments
        seg[S + 1:] = items
        o_q = o_seg + p_seg
        qs = buf[o_q:o_q + S * q_bytes].view(np.float32).reshape(S, L, H, D)
        for i in range(S):  # each request's query straight into staging (no stacked copy)
            qs[i] = op.query[i]
        dev = self.staging.dev + off
        o_off, l_off = off + up, off + up + _pad256(o_bytes)
        upload = o_q + S * q_bytes
        readback = op.readback
        if readback:
            ticket.post = ("segments", o_off, l_off, (S, L, H, D), op.segments.tolist())
        num_items = int(items[-1])

        def launch():
            drv.memcpy_htod_async(dev, host.address(off), upload, s)
            launcher.launch(dev + o_q, dev, dev + p_ptr, dev + p_ptr + p_fmt, dev + o_seg,
                            dev + o_seg + 4 * (S + 1), S, num_items, bps, op.softmax_scale,
                            self.staging.dev + o_off, self.staging.dev + l_off, self.compute)
            if readback:
                drv.memcpy_dtoh_async(host.address(o_off), self.staging.dev + o_off,
                                      total - up, s)
        return launch

    def _torch_mod(self):
        if self._torch is None:
            try:
                import torch
            except ImportError:
                raise BackendUnavailable("weight streaming on --backend cuda computes layers with "
                                         "PyTorch; install synapse-tiers[torch]") from None
            self._torch = torch
            self._ext = torch.cuda.ExternalStream(self.streams[Stream.COMPUTE])
        return self._torch

    def _tensor(self, addr: int, shape, dtype: str):
        torch = self._torch_mod()

        class _CAI:
            __cuda_array_interface__ = {"shape": tuple(shape), "typestr": dtype,
                                        "data": (addr, False), "version": 3, "strides": None}
        return torch.as_tensor(_CAI(), device=f"cuda:{self.device_index}")

    def _layer(self, op: LayerCompute) -> None:
        torch = self._torch_mod()
        h, f = op.hidden, op.ffn
        base = self._addr(op.weights.space, op.weights.offset)
        w1 = self._tensor(base, (h, f), "<f2")
        w2 = self._tensor(base + 2 * h * f, (f, h), "<f2")
        with torch.cuda.stream(self._ext):
            self._layer_math(op.act, w1, w2)

    @staticmethod
    def _layer_math(x, w1, w2) -> None:
        import torch
        x.add_(torch.nn.functional.gelu(x @ w1, approximate="tanh") @ w2)
        x.mul_(torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype))

    def activation(self, x0):
        torch = self._torch_mod()
        with torch.cuda.stream(self._ext):
            return torch.as_tensor(np.asarray(x0, np.float16)).to("cuda", non_blocking=False)

    def read_activation(self, act):
        self._torch_mod()
        with self._torch.cuda.stream(self._ext):
            out = act.float().cpu().numpy()
        return out

    def wait(self, tickets: Sequence) -> _Wait:
        return _Wait([t for t in tickets if t is not None])

    def _synchronize(self, t: _Ticket) -> None:
        if t.done:
            return
        if t.future is not None:
            t.future.result()  # a failed disk op raises its own error (KernelError)
            t.done = True
            return
        try:
            drv.event_synchronize(t.end)
        except KernelError as e:
            raise KernelError(f"{t.op.kind} ({t.op.purpose}) failed on the GPU: {e}") from None
        t.done = True
        if t.post is not None:  # results leave the staging ring before it is reused
            kind, o_off, l_off, oshape, lshape = t.post
            host = self.staging.host
            out = host.view(o_off, 4 * math.prod(oshape)).view(np.float32).reshape(oshape)
            if kind == "attention":
                lse = host.view(l_off, 4 * math.prod(lshape)).view(np.float32).reshape(lshape)
                t.value = (out.copy(), lse.copy())
                return
            # segments: lshape holds the segment bounds; segment i's lse [L, H, nb_i]
            # starts at element L*H*bounds[i]
            S, L, H, _ = oshape
            bounds = lshape
            lse = host.view(l_off, 4 * L * H * max(bounds[-1], 1)).view(np.float32)
            t.value = [(out[i].copy(),
                        lse[L * H * lo:L * H * hi].reshape(L, H, hi - lo).copy())
                       for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]

    def _wait_blocked(self, t: _Ticket) -> None:
        # The host waits for the device or the disk outside the driver's own waits (staging
        # reuse, an op that follows a disk op): blocked, not busy.
        t0 = time.perf_counter()
        self._synchronize(t)
        self._other_blocked_s += time.perf_counter() - t0

    def synchronize_all(self) -> None:
        for s in self.streams.values():
            drv.stream_synchronize(s)

    def _synchronize_all_blocked(self) -> None:
        # A wait for every stream inside the run (the VMM trim at a step's end, a data
        # check's read, growing scratch): the host waits for the device, blocked, not busy
        # (counted as busy, it made the trim's wait part of the host's time).
        t0 = time.perf_counter()
        self.synchronize_all()
        self._other_blocked_s += time.perf_counter() - t0

    def result(self, ticket):
        self._synchronize(ticket)
        return ticket.value

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def run(self, process) -> None:
        from . import kernels
        kernels.preload()  # nvcc and module loading are set-up, not run time
        self.synchronize_all()
        self._t0 = time.perf_counter()
        self._other_blocked_s = 0.0
        drv.event_record(self._base_event, self.streams[Stream.COMPUTE])
        self._blocked_s = run_sync(process, self._synchronize)
        self._run_wall_s = time.perf_counter() - self._t0
        self._blocked_s += self._other_blocked_s  # waits after the run are not the run's
        self.synchronize_all()

    def host_busy_s(self) -> float | None:
        wall = getattr(self, "_run_wall_s", None)
        if wall is None:
            return None
        return max(0.0, wall - self._blocked_s)

    def records(self) -> list[OpRecord]:
        self.synchronize_all()
        out = []
        for t in self._tickets:
            if t.future is not None:  # disk I/O: its worker's clock
                if not t.future.done() or t.future.exception() is not None:
                    continue
                t0, t1 = (x - self._t0 for x in t.future.result())
                out.append(OpRecord(t.op.kind, t.op.purpose, t.stream.value, t.submit_s, t0,
                                    t1, t.op.nbytes, t.op.count))
                continue
            t0 = drv.event_elapsed_ms(self._base_event, t.start) * 1e-3
            t1 = drv.event_elapsed_ms(self._base_event, t.end) * 1e-3
            out.append(OpRecord(t.op.kind, t.op.purpose, t.stream.value, t.submit_s, t0, t1,
                                t.op.nbytes, t.op.count))
        return out

    # -- audits -------------------------------------------------------------------------
    def residency(self, table):
        from .residency import audit
        return audit(table, self._mem, drv.memory_type, drv.is_managed)

    def environment(self) -> dict:
        env = {"device": str(self.device.name()), "l1_arena": self.l1_arena_kind,
               "copies": self.copy_path,
               "compute_capability": "%d.%d" % self.device.compute_capability(),
               "driver": cuda.get_driver_version(),
               "cuda_runtime_headers": ".".join(map(str, cuda.get_version())),
               "stream_priority": self.stream_priority}
        try:
            import pycuda
            env["pycuda"] = str(pycuda.VERSION_TEXT)
        except Exception:
            pass
        try:
            import torch
            env["torch"] = str(torch.__version__)
        except ImportError:
            pass
        return env

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self.synchronize_all()
            except Exception:
                pass
            if getattr(self, "_disk", None) is not None:
                self._disk.close()
            for t in getattr(self, "_tickets", []):
                for ev in (t.start, t.end):
                    if ev is None:
                        continue
                    try:
                        drv.event_destroy(ev)
                    except Exception:
                        pass
            for mem in getattr(self, "_mem", {}).values():
                mem.free()
            if getattr(self, "staging", None) is not None:
                self.staging.close()
            if getattr(self, "_scratch_mem", None) is not None:
                drv.mem_free(self._scratch_mem[0])
            buf = getattr(self, "_read_buf", None)
            if buf is not None:
                self._read_buf = None
                buf.base.free()  # before the context goes (PyCUDA's host allocation)
            for key in (Stream.H2D, Stream.D2H):
                if key in getattr(self, "streams", {}):
                    drv.stream_destroy(self.streams[key])
            from . import kernels
            kernels.forget_context()
        finally:
            self.ctx.pop()
