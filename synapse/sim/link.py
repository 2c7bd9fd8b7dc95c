"""The host link as a fluid model: two directions, a shared duplex cap, copy engines.

Each copy first holds a copy engine for its fixed cost (``copy_latency_us`` per call),
then its bytes flow. Copies in one direction share that direction's bandwidth equally;
when both directions are busy the two together are capped at ``duplex_gb_per_s`` (on an
H100 both directions reach about 83 GB/s together, not 2 x 55), split in proportion to
the directions' own bandwidths. Rates are recomputed whenever a copy starts or ends, so
a copy's time is exact for piecewise-constant sharing, with one SimPy event per change.
"""

from __future__ import annotations

import functools

import simpy

from .profile import Link


class _Flow:
    __slots__ = ("direction", "remaining", "rate", "done", "tol")

    def __init__(self, direction: str, nbytes: float, done: simpy.Event):
        self.direction = direction
        self.remaining = float(nbytes)
        self.rate = 0.0
        self.done = done
        self.tol = 1e-9 * nbytes + 1e-6


class _Engines:
    """The copy engines as ``simpy.Resource`` grants them, event for event, without its
    request and release classes (a few microseconds per copy, two copies a step):
    a request joins the queue and the queue's head is granted if an engine is free; a
    release frees the engine at once and schedules an event that grants the head then.
    The resource's other callbacks (``_trigger_get`` when a request is processed) do
    nothing for a resource whose releases always succeed, so none is kept."""

    __slots__ = ("env", "capacity", "users", "queue")

    def __init__(self, env: simpy.Environment, capacity: int):
        self.env, self.capacity = env, capacity
        self.users = 0
        self.queue: list[simpy.Event] = []  # requests not granted yet, oldest first

    def request(self) -> simpy.Event:
        req = simpy.Event(self.env)
        self.queue.append(req)
        self._grant_head()
        return req

    def _grant_head(self, _event=None) -> None:
        if self.queue and self.users < self.capacity:  # the head only, as simpy's loop
            self.users += 1
            self.queue.pop(0).succeed()

    def release(self, req: simpy.Event) -> None:
        if req.triggered:
            self.users -= 1
        else:
            self.queue.remove(req)
        done = simpy.Event(self.env)
        done.callbacks.append(self._grant_head)
        done.succeed()


class LinkModel:
    def __init__(self, env: simpy.Environment, link: Link):
        self.env = env
        self.bw = {"h2d": link.h2d_gb_per_s * 1e9, "d2h": link.d2h_gb_per_s * 1e9}
        self.duplex = link.duplex_gb_per_s * 1e9
        self.latency_s = link.copy_latency_us * 1e-6
        self.engines = _Engines(env, link.copy_engines)
        self.flows: list[_Flow] = []
        self._last = 0.0
        self._version = 0
        self.bytes_moved = {"h2d": 0, "d2h": 0}

    def fixed_seconds(self, calls: int, fixed_s: float | None = None) -> float:
        """What a copy holds its engine for before its bytes flow: ``calls *
        copy_latency_us``, or the predictor's ``fixed_s`` when given."""
        return calls * self.latency_s if fixed_s is None else fixed_s

    def start_flow(self, direction: str, nbytes: int) -> simpy.Event:
        """A copy's bytes start crossing (its engine held, its fixed cost paid); the
        event is triggered once they have. The caller releases the engine, then counts
        the bytes with ``moved``. (The simulator's op runs take these steps, in the
        order a simpy process holding the engine would: ``sim.backend._OpRun``.)"""
        flow = _Flow(direction, nbytes, simpy.Event(self.env))
        self._advance()
        self.flows.append(flow)
        self._reschedule()
        return flow.done

    def moved(self, direction: str, nbytes: int) -> None:
        self.bytes_moved[direction] += nbytes

    def rates(self, n_h2d: int, n_d2h: int) -> dict[str, float]:
        """Per-copy rate in each direction for the given numbers of active copies."""
        share = dict(self.bw)
        if n_h2d and n_d2h:
            total = self.bw["h2d"] + self.bw["d2h"]
            if total > self.duplex:
                share = {d: self.duplex * b / total for d, b in self.bw.items()}
        return {"h2d": share["h2d"] / max(1, n_h2d), "d2h": share["d2h"] / max(1, n_d2h)}

    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0:
            for f in self.flows:
                f.remaining -= f.rate * dt
        self._last = self.env.now

    def _reschedule(self) -> None:
        finished = [f for f in self.flows if f.remaining <= f.tol]
        if finished:
            self.flows = [f for f in self.flows if f.remaining > f.tol]
            for f in finished:
                f.done.succeed()
        if not self.flows:
            return
        n_h = sum(f.direction == "h2d" for f in self.flows)
        r = self.rates(n_h, len(self.flows) - n_h)
        for f in self.flows:
            f.rate = r[f.direction]
        dt = min(f.remaining / f.rate for f in self.flows)
        self._version += 1
        wake = self.env.timeout(dt)
        wake.callbacks.append(functools.partial(self._wake, self._version))

    def _wake(self, version: int, _event) -> None:
        if version != self._version:
            return  # a start or end since then rescheduled
        self._advance()
        self._reschedule()
