"""The host execution mode (``--backend cpu``): the hardware path with NumPy arrays.

Every space (L1 arena, INT4 staging, L2 pool, weight ring) is a NumPy byte array, and
every op really moves or transforms bytes through the same slab offsets, INT4 layout and
ring slots the GPU uses: copies are slice assignments, quantisation is the INT4
reference, attention is the reference decode over the blocks' bytes. Ops run
synchronously at submit, except disk I/O, which runs on a worker per disk stream as the
simulator models it (``disk_queue``): an op that depends on one waits for it first;
times are wall clock. It exists so CI can run the scenarios end to end with real data and check outputs;
it is a reference, not a performance path.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..backend import Backend, _Wait, run_sync
from ..errors import KernelError
from ..ops import (Attention, Copy, Dequantize, DiskIO, Ingest, LayerCompute, Op, OpRecord,
                   Quantize, Region, Stream, Zero)
from .attention_ref import BlockRef, attention_decode_ref
from .disk_queue import DiskQueue
from .kv_layout import FMT_FP16, FMT_INT4, pack_int4_block, unpack_int4_block
from .memory import HostMemory

_FMT_NAME = {0: "fp16", 1: "fp16", 2: "int4"}  # blocks.Fmt values -> layout formats


class _Ticket:
    __slots__ = ("value", "future")

    def __init__(self, value=None, future=None):
        self.value, self.future = value, future


class HostBackend(Backend):
    name = "cpu"
    moves_data = True
    simulated = False

    def __init__(self):
        self._mem: dict[str, HostMemory] = {}
        self._tracked: dict[str, int] = {}  # space -> allocation tracker handle
        self._records: list[OpRecord] = []
        self._t0 = time.perf_counter()
        self.fail_next: dict[str, int] = {}  # fault injection for tests: op kind -> count
        self._disk = DiskQueue()
        self._disk_blocked_s = 0.0

    # -- memory -------------------------------------------------------------------
    def memory(self, space: str, nbytes: int, kind: str) -> HostMemory:
        # "device" spaces are host memory here; the memory says so ("host"), so a
        # residency audit can never mistake them for HBM.
        mem = HostMemory(nbytes, "host" if kind == "device" else "host")
        self._mem[space] = mem
        self._track(space, mem)
        return mem

    def _track(self, space: str, mem: HostMemory) -> None:
        from ..monitor.tracker import TRACKER, purpose_for_space
        TRACKER.release(self._tracked.pop(space, None))
        self._tracked[space] = TRACKER.track(mem.address(0), mem.nbytes, "host",
                                             purpose_for_space(space), owner="host_backend")

    def close(self) -> None:
        from ..monitor.tracker import TRACKER
        self._disk.close()
        for handle in self._tracked.values():
            TRACKER.release(handle)
        self._tracked = {}

    def view(self, region: Region) -> np.ndarray:
        return self._mem[region.space].view(region.offset, region.nbytes)

    def read_region(self, region: Region) -> np.ndarray:
        return self.view(region).copy()

    # -- work -----------------------------------------------------------------------
    def submit(self, op: Op, stream: Stream, after: Sequence = ()) -> _Ticket:
        start = self.now()
        left = self.fail_next.get(op.kind, 0)
        if left:
            self.fail_next[op.kind] = left - 1
            raise KernelError(f"{op.kind} ({op.purpose}) failed: injected fault")
        if isinstance(op, DiskIO):
            future = self._disk.submit(stream.value, op.run,
                                       [t.future for t in after if t is not None])
            ticket = _Ticket(None, future)
            self._records.append((op, stream, start, future))  # timed when it completes
            return ticket
        for t in after:  # a disk op it reads or overwrites completes first
            if t is not None and t.future is not None:
                self._wait_disk(t)
        value = self._execute(op)
        self._records.append(OpRecord(op.kind, op.purpose, stream.value, start, start,
                                      self.now(), op.nbytes, op.count))
        return _Ticket(value)

    def _wait(self, ticket) -> None:
        if ticket.future is not None:
            ticket.future.result()

    def _wait_disk(self, ticket) -> None:
        t0 = time.perf_counter()
        self._wait(ticket)
        self._disk_blocked_s += time.perf_counter() - t0

    def _execute(self, op: Op):
        if isinstance(op, Copy):
            src, dst = self._mem[op.src_space], self._mem[op.dst_space]
            rows = list(zip(op.src_offsets.tolist(), op.dst_offsets.tolist(), op.sizes.tolist()))
            # every source is read before any destination is written (compaction's rows
            # may take each other's places)
            data = [src.view(s, n).copy() for s, _, n in rows]
            for (_, d, n), b in zip(rows, data):
                dst.view(d, n)[:] = b
        elif isinstance(op, Ingest):
            for i, r in enumerate(op.dst):
                try:
                    op.write_into(i, self.view(r))
                except ValueError as e:
                    raise KernelError(f"ingest ({op.purpose}): {e}") from None
        elif isinstance(op, Quantize):
            src, dst = self._mem[op.src_space], self._mem[op.dst_space]
            for s, d, ns, nd in zip(op.src_offsets.tolist(), op.dst_offsets.tolist(),
                                    op.src_sizes.tolist(), op.dst_sizes.tolist()):
                x = src.view(s, op.numel * 2).view(np.float16)
                pack_int4_block(x, op.block_tokens, op.group_size, op.int4_keys, dst.view(d, nd))
        elif isinstance(op, Dequantize):
            src, dst = self._mem[op.src_space], self._mem[op.dst_space]
            for s, d, ns, nd in zip(op.src_offsets.tolist(), op.dst_offsets.tolist(),
                                    op.src_sizes.tolist(), op.dst_sizes.tolist()):
                x = unpack_int4_block(src.view(s, ns), op.numel, op.block_tokens,
                                      op.group_size, op.int4_keys, np.float16)
                dst.view(d, nd)[:] = x.view(np.uint8)
        elif isinstance(op, Attention):
            return self._attention(op)
        elif isinstance(op, LayerCompute):
            self._layer(op)
        elif isinstance(op, Zero):
            for r in op.regions:
                self._mem[r.space].zero(r.offset, r.nbytes)
        else:
            raise KernelError(f"the cpu backend cannot run {type(op).__name__}")
        return None

    def _attention(self, op: Attention):
        mem = self._mem[op.space]
        lay = op.layout
        blocks = []
        for off, fmt, nv in zip(op.offsets.tolist(), op.fmts.tolist(), op.n_valid.tolist()):
            name = _FMT_NAME[fmt]
            blocks.append(BlockRef(mem.view(off, lay.nbytes(name)), name, int(nv)))
        if op.segments is None:
            return attention_decode_ref(op.query, blocks, lay, op.softmax_scale)
        # each request its own reference pass over its own blocks: batching changes how
        # the work is launched, not what any request computes
        bounds = op.segments.tolist()
        return [attention_decode_ref(op.query[i], blocks[lo:hi], lay, op.softmax_scale)
                for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]

    def _layer(self, op: LayerCompute) -> None:
        h, f = op.hidden, op.ffn
        w = self._mem[op.weights.space].view(op.weights.offset, op.weights.nbytes).view(np.float16)
        w1 = w[: h * f].reshape(h, f).astype(np.float32)
        w2 = w[h * f: 2 * h * f].reshape(f, h).astype(np.float32)
        x = op.act.value
        u = x @ w1
        g = 0.5 * u * (1.0 + np.tanh(0.7978845608 * (u + 0.044715 * u ** 3)))
        y = x + g @ w2
        op.act.value = (y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + 1e-6)).astype(np.float32)

    def activation(self, x0):
        return _Ticket(np.asarray(x0, np.float32).copy())

    def read_activation(self, act):
        return act.value.copy()

    def wait(self, tickets: Sequence) -> _Wait:
        return _Wait([t for t in tickets if t is not None])

    def result(self, ticket):
        if ticket.future is not None:
            self._wait_disk(ticket)
        return ticket.value

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def run(self, process) -> None:
        self._t0 = time.perf_counter()
        self._disk_blocked_s = 0.0
        self._blocked_s = run_sync(process, self._wait)
        self._run_wall_s = time.perf_counter() - self._t0

    def host_busy_s(self) -> float | None:
        wall = getattr(self, "_run_wall_s", None)
        return None if wall is None else max(0.0, wall - self._blocked_s - self._disk_blocked_s)

    def records(self) -> list[OpRecord]:
        out = []
        for r in self._records:
            if isinstance(r, tuple):  # a disk op: its worker's clock
                op, stream, submit_s, future = r
                if not future.done():  # in order: the rest once it has completed
                    break
                if future.exception() is not None:  # failed: the run reports it, no time
                    continue
                t0, t1 = future.result()
                r = OpRecord(op.kind, op.purpose, stream.value, submit_s, t0 - self._t0,
                             t1 - self._t0, op.nbytes, op.count)
            out.append(r)
        return out

    def environment(self) -> dict:
        return {"device": "host (NumPy reference execution)"}
