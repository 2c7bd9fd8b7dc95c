"""The SimPy backend: HBM, the host link and the GPU's streams as a discrete-event model.

Streams execute ops in submission order; ``after`` tickets of other streams gate an op's
start (the CUDA stream/event model). The host is modelled too: every ``submit`` costs host
time, and so does each step's safe point (the driver's Python around its ops), and an op
cannot start before the host has issued it, so launch-bound regimes are visible. Every
duration comes from one ``Predictor`` (``sim/predictor.py``, chosen by the profile);
copies over the host link share it through ``LinkModel``. Nothing here moves bytes: ops'
payload sources are never called.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Sequence

import simpy
from simpy.events import PENDING, URGENT

from ..backend import Backend
from ..ops import (PINNED_ZERO_BEFORE, ZERO_STREAM, Attention, Copy, Op, OpRecord, PinnedZero,
                   Stream, Zero)
from .link import LinkModel
from .predictor import attention_requests, is_link_op, predictor_for
from .profile import Profile


class SimMemory:
    """Bookkeeping-only memory: zeroing a freed device range costs a memset on the stream
    that next writes the space; zeroing pinned host memory a ``PinnedZero`` there (a D2H
    copy from a device page of zeros, as the cuda backend does it; host memset time where
    the profile's host runs the ops itself, as the cpu backend does)."""

    def __init__(self, backend: "SimBackend", space: str, nbytes: int, kind: str):
        self.backend, self.space, self.nbytes, self.kind = backend, space, nbytes, kind

    def zero(self, offset: int, nbytes: int) -> None:
        self.backend.queue_zero(self, offset, nbytes)

    def zero_ranges(self, ranges: list) -> None:
        """``zero`` of each (offset, nbytes), in order (nothing happens until a submit)."""
        self.backend.queue_zero_ranges(self, ranges)

    def address(self, offset: int) -> int:
        return offset


class SimPagedMemory(SimMemory):
    """The L1 arena as the cuda backend builds it where CUDA virtual memory is available
    (``hw.cuda_backend.VmmDeviceMemory``, ``kv.vmm.VmmArena``), as bookkeeping: pages
    are mapped as the live prefix grows (host time per page), unmapped down to it at the
    step's safe point (host time per page), and only mapped bytes are zeroed."""

    def __init__(self, backend: "SimBackend", space: str, nbytes: int, page_bytes: int):
        super().__init__(backend, space, nbytes, "device")
        self.page_bytes = page_bytes
        self.mapped = self.target = 0

    def extent(self, live_bytes: int) -> None:
        need = -(-max(0, live_bytes) // self.page_bytes)
        self.target = need
        if need > self.mapped:
            self.backend.map_pages(need - self.mapped)
            self.mapped = need

    def trim(self) -> None:
        if self.mapped > self.target:
            self.backend.unmap_pages(self.mapped - self.target)
            self.mapped = self.target

    def zero(self, offset: int, nbytes: int) -> None:
        end = min(offset + nbytes, self.mapped * self.page_bytes)
        if end > offset:
            self.backend.queue_zero(self, offset, end - offset)

    def zero_ranges(self, ranges: list) -> None:
        for offset, nbytes in ranges:
            self.zero(offset, nbytes)


@dataclass(frozen=True, eq=False)
class _ZeroRanges(Zero):
    """A ``Zero`` op as the simulator needs it: byte counts of (offset, nbytes) ranges in
    one space, without a ``Region`` object per range (thousands per step when blocks
    ping-pong between tiers)."""

    space: str = ""
    ranges: list = field(default_factory=list)

    @property
    def nbytes(self):
        return sum(n for _, n in self.ranges)

    @property
    def count(self):
        return len(self.ranges)


class _AllDone(simpy.Event):
    """``simpy.AllOf`` as the simulator waits on tickets: triggered where AllOf is (by
    the last of its events to be processed, or by the first to fail, whose error it
    carries), so every event of a run keeps its place; without the condition's value
    (a dict of the events, which nothing here reads) or the callback that builds it."""

    def __init__(self, env: simpy.Environment, events: list):
        self.env = env  # simpy.Event.__init__, inline (as simpy's own Process does)
        self.callbacks = []
        self._left = len(events)
        if not events:  # nothing to wait for: done at once, as AllOf([])
            self.succeed()
        for event in events:
            if event.callbacks is None:  # processed already
                self._check(event)
            else:
                event.callbacks.append(self._check)

    def _check(self, event) -> None:
        if self._value is not PENDING:
            return
        self._left -= 1
        if not event._ok:
            event._defused = True
            self.fail(event._value)
        elif not self._left:
            self.succeed()


class _OpRun(simpy.Event):
    """One op on its stream, and its ticket: triggered when the op has finished. It
    runs as a simpy process of the op would (started by an urgent event at submit; then
    its dependencies, the host's launch time, the op's own time or its copy over the
    link; then triggered), scheduling the same events in the same order, as callbacks
    rather than a generator driven by ``simpy.Process`` (a few microseconds per op, and
    a run submits thousands). An error in a step fails the ticket, as it would fail the
    process, and reaches whatever waits on it."""

    def __init__(self, backend: "SimBackend", op: Op, stream: Stream, deps: list,
                 launch_s: float, submit_s: float):
        env = self.env = backend.env  # simpy.Event.__init__, inline
        self.callbacks = []
        self.backend, self.op, self.stream, self.deps = backend, op, stream, deps
        self.launch_s, self.submit_s = launch_s, submit_s
        self.start = self.nbytes = 0
        self._engine = None  # the copy engine's grant while a link copy holds it
        begin = simpy.Event(env)  # what simpy.Process schedules to start (Initialize)
        begin._ok, begin._value = True, None
        self._then = self._begin  # the step to run when the awaited event is processed
        begin.callbacks.append(self._resume)
        env.schedule(begin, URGENT)

    def _await(self, event, then) -> None:
        self._then = then
        event.callbacks.append(self._resume)

    def _resume(self, event) -> None:
        if not event._ok:  # a process waiting on it gets a copy of its error, and fails
            event._defused = True
            error = type(event._value)(*event._value.args)
            error.__cause__ = event._value
            self._failed(error)
            return
        try:
            self._then()
        except BaseException as e:  # as a process whose generator raised
            self._failed(e)

    def _failed(self, error: BaseException) -> None:
        if self._engine is not None:  # as the process's ``with`` on the engine would
            self.backend.link.engines.release(self._engine)
            self._engine = None
        self._ok, self._value = False, error
        self.env.schedule(self)

    def _begin(self) -> None:
        pending = [d for d in self.deps if d.callbacks is not None]  # not processed yet
        if len(pending) == 1:
            self._await(pending[0], self._launch)
        elif pending:
            self._await(_AllDone(self.env, pending), self._launch)
        else:
            self._launch()

    def _launch(self) -> None:
        env = self.env
        if self.launch_s > env.now:
            self._await(env.timeout(self.launch_s - env.now), self._execute)
        else:
            self._execute()

    def _execute(self) -> None:
        backend, op = self.backend, self.op
        self.start = self.env.now
        self.nbytes = op.nbytes  # a sum over the op's rows: once per op
        if backend._ops_on_host:  # it ran inside submit: its time was the host's
            self.start -= backend.predictor.uncontended_seconds(op)
            self._finish()
        elif is_link_op(op):  # an engine, its fixed cost, then the bytes (sim.link)
            self._engine = backend.link.engines.request()
            self._await(self._engine, self._granted)
        else:
            self._await(self.env.timeout(backend.predictor.op_seconds(op)), self._finish)

    def _granted(self) -> None:
        link, op = self.backend.link, self.op
        fixed = link.fixed_seconds(op.count, self.backend.predictor.link_fixed_seconds(op))
        if op.count and fixed:
            self._await(self.env.timeout(fixed), self._flow)
        else:
            self._flow()

    def _flow(self) -> None:
        if self.nbytes > 0:
            self._await(self.backend.link.start_flow(self._direction(), self.nbytes),
                        self._moved)
        else:
            self._moved()

    def _moved(self) -> None:
        link = self.backend.link
        link.engines.release(self._engine)
        self._engine = None
        link.moved(self._direction(), self.nbytes)
        self._finish()

    def _direction(self) -> str:
        op = self.op
        return op.direction if isinstance(op, Copy) else "h2d"

    def _finish(self) -> None:
        op = self.op
        self.backend._records.append(OpRecord(op.kind, op.purpose, self.stream.value,
                                              self.submit_s, self.start, self.env.now,
                                              self.nbytes, op.count))
        self._ok, self._value = True, None
        self.env.schedule(self)


class SimBackend(Backend):
    name = "sim"
    simulated = True
    moves_data = False

    def __init__(self, profile: Profile, predictor=None):
        self.profile = profile
        self.predictor = predictor or predictor_for(profile)
        self._ops_on_host = profile.host.runs_ops
        self.env = simpy.Environment()
        self.link = LinkModel(self.env, profile.link)
        self._tail: dict[Stream, simpy.Event | None] = {s: None for s in Stream}
        self._records: list[OpRecord] = []
        self._host_s = 0.0
        self._host_busy = 0.0
        self._pending_zero: dict[str, list] = {}
        self._paged: SimPagedMemory | None = None
        # what the host was charged for, counted (calibrate fits the costs to these)
        self.host_counts = {"steps": 0, "decisions": 0, "pages_mapped": 0,
                            "pages_unmapped": 0, "pinned_zero_bytes": 0, "requests": 0}
        self._pending_pinned: dict[str, list] = {}  # pinned host ranges (PinnedZero)

    # -- memory -------------------------------------------------------------------
    def memory(self, space: str, nbytes: int, kind: str) -> SimMemory:
        return SimMemory(self, space, nbytes, kind)

    def paged_memory(self, space: str, nbytes: int):
        page = self.profile.host.page_bytes
        if not page:
            return self.memory(space, nbytes, "device")
        self._paged = SimPagedMemory(self, space, nbytes, page)
        return self._paged

    def l1_pages(self) -> int | None:
        return None if self._paged is None else self._paged.mapped

    def decision_done(self) -> None:
        """The manager finished a planning call (the policy's and the manager's own host
        work, which the simulator runs too: counted, not timed)."""
        self.host_counts["decisions"] += 1
        seconds = self.predictor.decision_seconds()
        if seconds:
            self.host_work(seconds)

    def map_pages(self, n: int) -> None:
        self.host_counts["pages_mapped"] += n
        seconds = self.predictor.page_map_seconds(n)
        if seconds:
            self.host_work(seconds)

    def unmap_pages(self, n: int) -> None:
        self.host_counts["pages_unmapped"] += n
        seconds = self.predictor.page_unmap_seconds(n)
        if seconds:
            self.host_work(seconds)

    def queue_zero(self, mem: SimMemory, offset: int, nbytes: int) -> None:
        self.queue_zero_ranges(mem, [(offset, nbytes)])

    def queue_zero_ranges(self, mem: SimMemory, ranges: list) -> None:
        if mem.kind == "pinned_host":
            if self._ops_on_host:  # zeroed by a host memset there; a D2H copy elsewhere
                self.host_counts["pinned_zero_bytes"] += sum(n for _, n in ranges)
            pending = self._pending_pinned
        else:
            pending = self._pending_zero
        pending.setdefault(mem.space, []).extend(ranges)

    def _flush_zero(self, stream: Stream) -> None:
        if self._pending_zero:
            pending, self._pending_zero = self._pending_zero, {}
            for space, ranges in pending.items():
                self._enqueue(_ZeroRanges(purpose="zero_on_free", space=space, ranges=ranges),
                              ZERO_STREAM.get(space, Stream.COMPUTE), ())
        if self._pending_pinned and stream in PINNED_ZERO_BEFORE:
            # as on the cuda backend: pinned ranges wait for an op that writes them
            pending, self._pending_pinned = self._pending_pinned, {}
            for space, ranges in pending.items():
                self._enqueue(PinnedZero.of(space, ranges), ZERO_STREAM.get(space, Stream.D2H),
                              ())

    # -- work ---------------------------------------------------------------------
    def submit(self, op: Op, stream: Stream, after: Sequence = ()) -> simpy.Event:
        if self._pending_zero or self._pending_pinned:
            self._flush_zero(stream)
        return self._enqueue(op, stream, after)

    def _enqueue(self, op: Op, stream: Stream, after: Sequence) -> simpy.Event:
        now = self.env.now
        if isinstance(op, Attention):
            self.host_counts["requests"] += attention_requests(op)
        cost = self.predictor.submit_seconds(op)
        self._host_s = max(self._host_s, now) + cost
        self._host_busy += cost
        deps = [t for t in after if t is not None]
        prev = self._tail[stream]
        if prev is not None:
            deps.append(prev)
        ticket = _OpRun(self, op, stream, deps, self._host_s, now)
        self._tail[stream] = ticket
        return ticket

    def wait(self, tickets: Sequence) -> simpy.Event:
        tickets = [t for t in tickets if t is not None]
        return tickets[0] if len(tickets) == 1 else _AllDone(self.env, tickets)

    def now(self) -> float:
        return max(self.env.now, self._host_s)

    def host_work(self, seconds: float) -> None:
        self._host_s = max(self._host_s, self.env.now) + seconds
        self._host_busy += seconds

    def delay(self, seconds: float) -> simpy.Event:
        return self.env.timeout(max(0.0, max(self._host_s, self.env.now) + seconds - self.env.now))

    def host_busy_s(self) -> float:
        return self._host_busy

    def step_done(self) -> None:
        self.host_counts["steps"] += 1
        if self._paged is not None:  # as CudaBackend.step_done: unmap past the live prefix
            self._paged.trim()
        step_s = self.predictor.step_seconds()
        if step_s:
            self.host_work(step_s)

    def run(self, process) -> None:
        # The hardware backends' clocks start here (``CudaBackend.run``): host work charged
        # while the driver was built (zeroing a new pinned L2 pool: 12 GiB is 1.4 s at the
        # H200 host's memset rate) is set-up, not run time, and was never in their figures.
        self._host_s = self._host_busy = 0.0
        self.host_counts = dict.fromkeys(self.host_counts, 0)
        proc = self.env.process(process)
        # A run makes hundreds of thousands of short-lived objects (moves, handles, events)
        # and no cyclic garbage as it goes (benchmarks/sim_speed.py counts what the cyclic
        # collector finds after each run: a few dozen objects; with Belady, the run's own
        # object graph, which the policy's reference to the driver holds in one cycle), so
        # the collector is paused: its passes over the live handles cost about 5%.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self.env.run()
        finally:
            if collecting:
                gc.enable()
        if not proc.processed:
            raise RuntimeError("the driver process never finished (a wait on an op that "
                               "can never complete)")
        if not proc.ok:
            raise proc.value

    def records(self) -> list[OpRecord]:
        return self._records

    def environment(self) -> dict:
        return {"profile": self.profile.name, "profile_device": self.profile.device,
                "predictor": self.predictor.name}
